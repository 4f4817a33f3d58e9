"""The GPU device check: run on a machine with one CUDA GPU, from the repository root.

    python ops/gpu_check.py [--steps 30]

1. flash-attn varlen vs torch SDPA in bf16 on packed documents (our CoreAttention through both backends);
2. the MLFM forward/backward in bf16 with flash attention against fp32 SDPA (relative error);
3. `mlfm train` on the tiny preset with NCCL, bf16 and flash attention for a few steps, then resume;
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


def check_attention() -> dict:
    import torch
    from megatron.core.transformer.transformer_config import TransformerConfig

    from mlfm_scale.model.attention import AttentionSegments, CoreAttention

    cfg = TransformerConfig(num_layers=1, hidden_size=128, num_attention_heads=4, use_cpu_initialization=True)
    seg = torch.tensor([[0] * 100 + [1] * 60 + [2] * 96, [0] * 256], device="cuda")
    q, k, v = (torch.randn(256, 2, 4, 32, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    outs = {}
    for backend in ("flash", "sdpa"):
        attn = CoreAttention(cfg, 1, None, "self", backend=backend)
        segments = AttentionSegments.from_segment_ids(seg, backend)
        outs[backend] = attn(q, k, v, segments.mask, packed_seq_params=segments.packed).float()
    err = (outs["flash"] - outs["sdpa"]).abs().max().item()
    assert err < 2e-2, f"flash vs sdpa max error {err}"
    return {"check": "attention", "max_abs_error": err}


def check_train(steps: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        base = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1", "-m",
                "mlfm_scale.cli", "train", "configs/tiny.yaml", f"out_dir={tmp}", "train.dtype=bf16",
                "model.attention=flash", "log.every=5", "train.eval_every=10", "checkpoint.every=10"]
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
    return {"check": "train_bf16_flash_nccl", "first_loss": losses[0], "last_loss": losses[-1],
            "tokens_per_s": [r["tokens_per_s"] for r in rows if "tokens_per_s" in r][-1]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=30)
    args = ap.parse_args()
    import torch

    assert torch.cuda.is_available(), "no CUDA device"
    for result in (check_attention(), check_train(args.steps)):
        print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
