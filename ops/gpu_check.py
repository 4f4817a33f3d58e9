"""The GPU device check: run on a machine with one CUDA GPU, from the repository root.

    python ops/gpu_check.py [--steps 30]

1. flash-attn varlen vs torch SDPA in bf16 on packed documents (our CoreAttention through both backends); without
   flash-attn installed, SDPA in bf16 on the GPU against float32 on the CPU;
2. `mlfm train` on the tiny preset with NCCL, bf16 and flash attention (when installed) for a few steps, then
   resume (the decision diagnostic of a bf16 network fed float32 z is reported);
3. `mlfm export` of that run, the inference model in bf16 on the GPU against fp32 on the CPU (logits), and
   `mlfm sample` on the GPU;
4. LoRA in bf16: a run started from that checkpoint (`train.init_from`) with adapters, its base weights unchanged,
   exported with the adapters merged;
5. `mlfm distill` in bf16 from that checkpoint (a flow-map student), exported and sampled with `method=flowmap` on
   the GPU;
6. `mlfm eval` (validity and GSM8K) of the first export in bf16 on the GPU: its throughput, and its samples against
   a second run with another batch size;
prints one JSON line per check and exits non-zero on the first failure.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def flash_installed() -> bool:
    from mlfm_scale.model.attention import flash_attn_varlen_func

    return flash_attn_varlen_func is not None


def check_attention() -> dict:
    """Packed documents: flash varlen against SDPA (both bf16 on the GPU), or without flash-attn SDPA in bf16 on
    the GPU against float32 on the CPU."""
    import torch
    from megatron.core.transformer.transformer_config import TransformerConfig

    from mlfm_scale.model.attention import AttentionSegments, CoreAttention

    cfg = TransformerConfig(num_layers=1, hidden_size=128, num_attention_heads=4, use_cpu_initialization=True,
                            attention_dropout=0.0)  # as the model sets it (its default, 0.1, would draw masks)
    seg = torch.tensor([[0] * 100 + [1] * 60 + [2] * 96, [0] * 256])
    q, k, v = (torch.randn(256, 2, 4, 32) for _ in range(3))
    runs = [("flash", "cuda", torch.bfloat16), ("sdpa", "cuda", torch.bfloat16)] if flash_installed() else \
        [("sdpa", "cuda", torch.bfloat16), ("sdpa", "cpu", torch.float32)]
    outs = []
    for backend, device, dtype in runs:
        attn = CoreAttention(cfg, 1, None, "self", backend=backend)
        segments = AttentionSegments.from_segment_ids(seg.to(device), backend)
        args = (t.to(device, dtype) for t in (q, k, v))
        outs.append(attn(*args, segments.mask, packed_seq_params=segments.packed).float().cpu())
    err = (outs[0] - outs[1]).abs().max().item()
    assert err < 2e-2, f"{runs[0]} vs {runs[1]} max error {err}"
    return {"check": "attention", "compared": [f"{b} {d} {str(t)[6:]}" for b, d, t in runs], "max_abs_error": err,
            "flash_attn_installed": flash_installed()}


def check_train(steps: int, tmp: str) -> dict:
    base = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1", "-m",
            "mlfm_scale.cli", "train", "configs/tiny.yaml", f"out_dir={tmp}", "train.dtype=bf16",
            f"model.attention={'flash' if flash_installed() else 'auto'}", "log.every=5", "train.eval_every=10",
            "checkpoint.every=10"]
    subprocess.run([sys.executable, "-m", "mlfm_scale.cli", "prep", "synth", f"{tmp}/c.jsonl",
                    "--documents", "3000"], check=True, cwd=REPO)
    subprocess.run([sys.executable, "-m", "mlfm_scale.cli", "prep", "corpus", f"{tmp}/c.jsonl", "--out",
                    f"{tmp}/data", "--seq-len", "128", "--train-tokenizer", "512", "--no-progress"],
                   check=True, cwd=REPO, stdout=subprocess.DEVNULL)
    subprocess.run([*base, f"train.steps={steps}"], check=True, cwd=REPO)
    subprocess.run([*base, f"train.steps={steps + 10}", "train.resume=auto"], check=True, cwd=REPO)
    rows = [json.loads(line) for line in Path(tmp, "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if "loss" in r]
    assert losses[-1] < losses[0], losses
    profile = [r["decision"] for r in rows if "decision" in r][-1]  # bf16 network, float32 z
    assert all(0.0 <= a <= 1.0 for a in profile["accuracy"]), profile
    return {"check": "train_bf16_flash_nccl", "first_loss": losses[0], "last_loss": losses[-1],
            "tokens_per_s": [r["tokens_per_s"] for r in rows if "tokens_per_s" in r][-1],
            "decision_accuracy": profile["accuracy"], "decision_window": profile["window"]}


def check_export_and_sample(tmp: str) -> dict:
    import torch

    from mlfm_scale.inference import MLFMForInference

    subprocess.run([sys.executable, "-m", "mlfm_scale.cli", "export", f"{tmp}/checkpoints", f"{tmp}/export"],
                   check=True, cwd=REPO)
    cpu = MLFMForInference.from_pretrained(f"{tmp}/export", device="cpu", dtype=torch.float32)
    gpu = MLFMForInference.from_pretrained(f"{tmp}/export", device="cuda", dtype=torch.bfloat16)
    g = torch.Generator().manual_seed(0)
    z = torch.randn(2, 128, cpu.embedding_table().size(1), generator=g)
    gamma, segments = torch.tensor([-3.0, 2.0]), torch.tensor([[0] * 70 + [1] * 58, [0] * 128])
    ref = cpu(z, gamma, segments)
    got = gpu(z.cuda(), gamma.cuda(), segments.cuda()).float().cpu()
    agree = (got.argmax(-1) == ref.argmax(-1)).float().mean().item()
    assert agree > 0.95, f"bf16 GPU and fp32 CPU logits agree on the argmax at only {agree:.3f} of positions"
    out = subprocess.run([sys.executable, "-m", "mlfm_scale.cli", "sample", "--model", f"{tmp}/export",
                          "--unconditional", "4", "--steps", "32", "--device", "cuda", "--dtype", "bf16"],
                         check=True, cwd=REPO, capture_output=True, text=True).stdout
    rows = [json.loads(line) for line in out.splitlines()]
    assert len(rows) == 4 and all(r["token_ids"] for r in rows), out
    return {"check": "export_inference_sample_bf16", "argmax_agreement": agree,
            "max_abs_logit_error": (got - ref).abs().max().item(), "sample_nfe": rows[0]["nfe"],
            "sample_seconds": rows[0]["seconds"]}


def check_lora(tmp: str) -> dict:
    """Adapters in bf16 under NCCL from the first run's checkpoint: the base stays bitwise, the merge exports."""
    import torch
    from safetensors.torch import load_file

    from mlfm_scale.inference import MLFMForInference

    lora = ["model.lora.rank=8", "model.lora.alpha=16", "model.lora.output_rank=8", "model.lora.output_alpha=8"]
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1", "-m",
                    "mlfm_scale.cli", "train", "configs/tiny.yaml", f"out_dir={tmp}/lora", "train.dtype=bf16",
                    f"data.root={tmp}/data", f"train.init_from={tmp}/checkpoints", "train.steps=10",
                    "checkpoint.every=10", "log.every=5", "train.eval_every=10", *lora], check=True, cwd=REPO)
    for run in (tmp, f"{tmp}/lora"):
        subprocess.run([sys.executable, "-m", "mlfm_scale.cli", "reshard", f"{run}/checkpoints"], check=True, cwd=REPO)
    latest = Path(tmp, "checkpoints", "latest").read_text().strip()
    start = load_file(Path(tmp, "checkpoints", latest, "universal", "param.safetensors"))
    after = load_file(Path(tmp, "lora", "checkpoints", "step00000010", "universal", "param.safetensors"))
    # a bf16 run holds its frozen weights in bf16 (only trained ones have fp32 master copies)
    base = [n for n in start if "modulation" not in n and "gamma_embedding" not in n]
    moved = [n for n in base if not torch.equal(after[n], start[n].to(torch.bfloat16).float())]
    assert not moved, f"frozen base weights moved: {moved[:3]}"
    adapters = [n for n in after if n.endswith("lora.b")]
    trained = [n for n in adapters if after[n].abs().sum() > 0]
    assert trained == adapters, f"adapters that did not train: {sorted(set(adapters) - set(trained))}"
    subprocess.run([sys.executable, "-m", "mlfm_scale.cli", "export", f"{tmp}/lora/checkpoints", f"{tmp}/lora-export",
                    "--merge-lora"], check=True, cwd=REPO)
    gpu = MLFMForInference.from_pretrained(f"{tmp}/lora-export", device="cuda", dtype=torch.bfloat16)
    ids = torch.randint(0, gpu.vocab_size, (2, 128), device="cuda")
    logits = gpu(gpu.embed(ids), torch.tensor([-3.0, 1.0], device="cuda"))
    assert torch.isfinite(logits).all()
    return {"check": "lora_bf16_init_from", "adapters_trained": len(trained), "base_tensors_unchanged": len(base),
            "merged_export_logits_finite": True}


def check_distill(tmp: str) -> dict:
    """A flow-map student distilled in bf16 under NCCL from the first run's checkpoint (the teacher held beside the
    engine in bf16), exported and sampled in 4 jumps per promotion round on the GPU."""
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1", "-m",
                    "mlfm_scale.cli", "distill", "configs/tiny.yaml", f"out_dir={tmp}/distill", "train.dtype=bf16",
                    f"data.root={tmp}/data", f"distill.teacher={tmp}/checkpoints", "train.steps=10",
                    "checkpoint.every=10", "log.every=5", "train.eval_every=10"], check=True, cwd=REPO)
    rows = [json.loads(line) for line in Path(tmp, "distill", "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if "loss" in r]
    assert losses and all(abs(x) < float("inf") for x in losses), losses
    subprocess.run([sys.executable, "-m", "mlfm_scale.cli", "export", f"{tmp}/distill/checkpoints",
                    f"{tmp}/distill-export"], check=True, cwd=REPO)
    out = subprocess.run([sys.executable, "-m", "mlfm_scale.cli", "sample", "--model", f"{tmp}/distill-export",
                          "--unconditional", "4", "--method", "flowmap", "--steps", "4", "--device", "cuda",
                          "--dtype", "bf16"], check=True, cwd=REPO, capture_output=True, text=True).stdout
    samples = [json.loads(line) for line in out.splitlines()]
    assert len(samples) == 4 and all(r["nfe"] == 4 * r["rounds"] for r in samples), out
    return {"check": "distill_bf16_flowmap", "losses": losses, "sample_nfe": [r["nfe"] for r in samples],
            "sample_seconds": samples[0]["seconds"]}


def check_eval(tmp: str) -> dict:
    """The evaluation path in bf16 on the GPU: validity and GSM8K (the paper's protocol, 8 steps) of the first
    export; a second run with another batch size must write the same samples (per-prompt seeds)."""
    results = []
    for batch in (4, 1):
        subprocess.run([sys.executable, "-m", "mlfm_scale.cli", "eval", "validity", "gsm8k", "--model",
                        f"{tmp}/export", "--out", f"{tmp}/eval{batch}", "--limit", "4", "--steps", "8",
                        "--batch-size", str(batch)], check=True, cwd=REPO)
        results.append(json.loads(Path(tmp, f"eval{batch}", "steps8", "validity", "metrics.json").read_text()))
    assert results[0]["samples"] == results[1]["samples"], "the batch size changed the samples on the GPU"
    gsm8k = json.loads(Path(tmp, "eval4", "steps8", "gsm8k", "metrics.json").read_text())
    return {"check": "eval_bf16", "validity_prompts_per_s": results[0]["prompts_per_s"],
            "validity_nfe_per_s": results[0]["nfe_per_s"], "gsm8k_n": gsm8k["n"], "gsm8k_too_long": gsm8k["too_long"],
            "samples_identical_across_batch_sizes": True}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=30)
    args = ap.parse_args()
    import torch

    assert torch.cuda.is_available(), "no CUDA device"
    print(json.dumps(check_attention()), flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        print(json.dumps(check_train(args.steps, tmp)), flush=True)
        print(json.dumps(check_export_and_sample(tmp)), flush=True)
        print(json.dumps(check_lora(tmp)), flush=True)
        print(json.dumps(check_distill(tmp)), flush=True)
        print(json.dumps(check_eval(tmp)), flush=True)


if __name__ == "__main__":
    main()
