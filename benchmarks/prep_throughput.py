"""Prep throughput (tokens/s) and peak memory, as ratios measured in one run on this machine.

    python benchmarks/prep_throughput.py [--mb 50] [--big-mb 200] [--out benchmarks/results/prep.json]

Tokens/s are over the processing (after the interpreter has imported torch and streaming, ~4 s here, paid
once per run whatever the corpus); end-to-end figures are printed beside them.
Runs, on a generated corpus of ``--mb`` MB with one tokenizer trained beforehand:
  naive     one process, one ``encode`` call per document, the same packing and MDSWriter
  workers=1 ``prepare_shards`` (JSONL parsed and pieces encoded in one worker process)
  workers=2 the same with two workers
and ``workers=1`` again on a ``--big-mb`` corpus to compare peak memory (RSS summed over the process tree,
sampled every 50 ms). Each run is a fresh subprocess timed end to end, start-up included.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parent.parent
SEQ_LEN = 1024

NAIVE = textwrap.dedent("""
    import json, sys, time
    import numpy as np
    from streaming import MDSWriter
    from tokenizers import Tokenizer
    from data_prep.packing import pack_documents
    from data_prep.shards import mds_columns
    corpus, tok_path, out, seq = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    started = time.perf_counter()
    tok = Tokenizer.from_file(tok_path)
    eos = tok.token_to_id("<|eos|>")
    tokens, buffer = 0, []
    with MDSWriter(out=out, columns=mds_columns("pretrain", seq, "uint16"), compression="zstd") as w:
        def flush(docs):
            blocks = pack_documents(docs, seq, eos, eos, np.uint16)
            for i in range(len(blocks)):
                w.write({"tokens": blocks.tokens[i], "doc_starts": blocks.doc_starts[i],
                         "length": int(blocks.lengths[i]), "block_id": i})
        with open(corpus) as f:
            for line in f:
                ids = tok.encode(json.loads(line)["text"], add_special_tokens=False).ids
                tokens += len(ids) + 1
                buffer.append(ids)
                if len(buffer) == 4096:
                    flush(buffer); buffer = []
        flush(buffer)
    print(tokens, time.perf_counter() - started)
""")

PREP = textwrap.dedent("""
    import sys, time
    import streaming
    from data_prep.shards import prepare_shards
    from mlfm_scale.config import PrepSection
    corpus, tok_dir, out, seq, workers = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
    started = time.perf_counter()
    m = prepare_shards([corpus], out, PrepSection(tokenizer=tok_dir, workers=workers, val_fraction=0.01), seq,
                       progress=False)
    print(sum(s["tokens"] for s in m["splits"].values()), time.perf_counter() - started)
""")


def measure(code: str, *args: str) -> dict:
    """Run ``code`` in a fresh interpreter: wall seconds (start-up included), processing seconds and token count
    (both printed by the code, after its imports), and peak RSS summed over the process tree (MB)."""
    started = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-c", code, *args], stdout=subprocess.PIPE, text=True, cwd=REPO)
    ps, peak = psutil.Process(proc.pid), 0
    while proc.poll() is None:
        try:
            tree = [ps, *ps.children(recursive=True)]
            peak = max(peak, sum(p.memory_info().rss for p in tree if p.is_running()))
        except psutil.Error:
            pass
        time.sleep(0.05)
    seconds = time.perf_counter() - started
    if proc.returncode:
        raise SystemExit(f"benchmark run failed ({proc.returncode}): {args}")
    tokens, processing = proc.stdout.read().split()[-2:]
    tokens, processing = int(tokens), float(processing)
    return {"seconds": round(seconds, 2), "processing_s": round(processing, 2), "tokens": tokens,
            "tokens_per_s": round(tokens / processing), "end_to_end_tokens_per_s": round(tokens / seconds),
            "peak_rss_mb": round(peak / 2**20)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mb", type=float, default=50)
    ap.add_argument("--big-mb", type=float, default=200)
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "prep.json"))
    args = ap.parse_args()

    sys.path.insert(0, str(REPO))
    from data_prep.synth import synth_documents, write_synth_jsonl
    from data_prep.tokenizer import ensure_special_tokens, train_bpe

    work = Path(tempfile.mkdtemp(prefix="mlfm-bench-"))
    docs_per_mb = 1e6 / 236  # JSONL bytes per synthetic document, measured
    small, big = work / "small.jsonl", work / "big.jsonl"
    write_synth_jsonl(small, int(args.mb * docs_per_mb), seed=0)
    write_synth_jsonl(big, int(args.big_mb * docs_per_mb), seed=1)
    tok = train_bpe(synth_documents(20000, seed=99), args.vocab)
    ensure_special_tokens(tok)
    (work / "tok").mkdir()
    tok.save(str(work / "tok" / "tokenizer.json"))
    print(f"corpora: {small.stat().st_size / 1e6:.0f} MB and {big.stat().st_size / 1e6:.0f} MB in {work}")

    runs = {
        "naive": measure(NAIVE, str(small), str(work / "tok" / "tokenizer.json"), str(work / "o_naive"),
                         str(SEQ_LEN)),
        "workers=1": measure(PREP, str(small), str(work / "tok"), str(work / "o_w1"), str(SEQ_LEN), "1"),
        "workers=2": measure(PREP, str(small), str(work / "tok"), str(work / "o_w2"), str(SEQ_LEN), "2"),
        f"workers=1 ({args.big_mb:.0f} MB)": measure(PREP, str(big), str(work / "tok"), str(work / "o_big"),
                                                     str(SEQ_LEN), "1"),
    }
    ratios = {
        "workers=2 / workers=1 (tokens/s)": runs["workers=2"]["tokens_per_s"] / runs["workers=1"]["tokens_per_s"],
        "workers=1 / naive (tokens/s)": runs["workers=1"]["tokens_per_s"] / runs["naive"]["tokens_per_s"],
        f"peak RSS {args.big_mb:.0f} MB / {args.mb:.0f} MB corpus": (
            runs[f"workers=1 ({args.big_mb:.0f} MB)"]["peak_rss_mb"] / runs["workers=1"]["peak_rss_mb"]),
    }
    for name, r in runs.items():
        print(f"{name:<22} {r['tokens']:>11,} tokens  processing {r['processing_s']:>6.1f} s {r['tokens_per_s']:>10,} "
              f"tok/s  end to end {r['seconds']:>6.1f} s {r['end_to_end_tokens_per_s']:>10,} tok/s  "
              f"peak RSS {r['peak_rss_mb']:>5} MB")
    for name, value in ratios.items():
        print(f"{name:<40} {value:.2f}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"runs": runs, "ratios": ratios}, indent=2))
    subprocess.run(["rm", "-rf", str(work)])


if __name__ == "__main__":
    main()
