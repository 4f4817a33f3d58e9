"""Speed and peak memory of ``mlfm convert smdm`` on an SMDM-1028M-shaped checkpoint (random weights).

    python benchmarks/convert_memory.py [--dtype bf16] [--layers 20] [--out benchmarks/results/convert_memory.json]

Writes a Diff_LLaMA_1028M-shaped safetensors file (20 layers, d 1792, 14 heads, SwiGLU 7168, `transformer.wte`
32001 rows, `lm_head` 32000; the real key names) one tensor at a time, then converts it with
configs/smdm-1028m-lora.yaml (LoRA rank 256 and the output head's delta added) in a fresh process: the peak RSS
minus the RSS once everything is imported (the kernel's high-water mark is reset there: /proc/self/clear_refs),
against the largest converted tensor (the float32 embedding table).
The target: (peak − baseline) ≤ 1.5 × the largest tensor. ``--layers`` shrinks the depth for a quick run (the
largest tensor, hence the bound, does not change).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
D, HEADS, FFN, VOCAB = 1792, 14, 7168, 32000

MEASURE = """
import json, sys
from pathlib import Path
sys.path.insert(0, {repo!r})
import safetensors.torch, torch  # noqa: F401
from mlfm_scale.config import load_config
from mlfm_scale.convert.cli import convert
import mlfm_scale.convert.checkpoint, mlfm_scale.convert.formats  # noqa: F401  (imported before the baseline)
import mlfm_scale.data.loader  # noqa: F401
def status(field):  # kB lines of /proc/self/status
    line = next(l for l in Path("/proc/self/status").read_text().splitlines() if l.startswith(field + ":"))
    return int(line.split()[1]) * 1024
cfg = load_config({config!r}, {overrides!r})
Path("/proc/self/clear_refs").write_text("5")  # the high-water mark restarts here: imports' transients excluded
baseline = status("VmRSS")
summary = convert("smdm", Path({src!r}), Path({out!r}), cfg)
print(json.dumps({{"baseline_rss_bytes": baseline, **summary, "peak_rss_bytes": status("VmHWM")}}))
"""


def write_source(path: Path, layers: int, dtype: torch.dtype) -> int:
    """The SMDM state dict, streamed (each tensor drawn when written); returns its bytes."""
    from mlfm_scale.convert.checkpoint import write_safetensors_streaming
    from mlfm_scale.convert.plan import Entry

    shapes = {"transformer.wte.weight": (VOCAB + 1, D), "lm_head.weight": (VOCAB, D), "transformer.ln_f.weight": (D,)}
    for i in range(layers):
        p = f"transformer.h.{i}."
        shapes |= {p + "norm_1.weight": (D,), p + "attn.attn.weight": (3 * D, D), p + "attn.proj.weight": (D, D),
                   p + "norm_2.weight": (D,), p + "mlp.swiglu.w1.weight": (FFN, D),
                   p + "mlp.swiglu.w2.weight": (FFN, D), p + "mlp.swiglu.w3.weight": (D, FFN)}
    g = torch.Generator().manual_seed(0)
    entries = [Entry(n, s, lambda s=s: torch.randn(s, generator=g) * 0.02) for n, s in shapes.items()]
    write_safetensors_streaming(path, entries, {"format": "pt"}, dtype)
    return path.stat().st_size


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=20)
    parser.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16", help="the source's dtype")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "convert_memory.json"))
    args = parser.parse_args()
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    with tempfile.TemporaryDirectory(dir=REPO / "build") as tmp:
        src = Path(tmp) / "smdm.safetensors"
        started = time.perf_counter()
        source_bytes = write_source(src, args.layers, dtype)
        written = time.perf_counter() - started
        code = MEASURE.format(repo=str(REPO), config=str(REPO / "configs" / "smdm-1028m-lora.yaml"),
                              overrides=[f"model.num_layers={args.layers}", f"out_dir={tmp}/run"], src=str(src),
                              out=str(Path(tmp) / "converted"))
        result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
        if result.returncode:
            raise SystemExit(result.stderr[-3000:])
        row = json.loads(result.stdout.strip().splitlines()[-1])
        out_bytes = sum(p.stat().st_size for p in (Path(tmp) / "converted").rglob("*") if p.is_file())
    largest = (VOCAB + 1 + 127) // 128 * 128 * D * 4  # the float32 embedding table, padded to 128 rows
    extra = row["peak_rss_bytes"] - row["baseline_rss_bytes"]
    report = {"layers": args.layers, "source_dtype": args.dtype, "source_bytes": source_bytes,
              "converted_bytes": out_bytes, "seconds": row["seconds"], "source_write_seconds": written,
              "gb_per_s": out_bytes / row["seconds"] / 1e9, "baseline_rss_bytes": row["baseline_rss_bytes"],
              "peak_rss_bytes": row["peak_rss_bytes"], "largest_tensor_bytes": largest,
              "extra_over_largest": extra / largest, "target": "extra_over_largest <= 1.5",
              "met": extra / largest <= 1.5}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=1))
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
