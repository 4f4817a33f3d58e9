"""Generative perplexity (MLFM.md, Evaluation protocol): samples scored by a causal LM judge (GPT-2-large), each
counted through its first EOS, with the samples' unigram entropy beside it (a low perplexity bought by repeating
a few tokens shows as a low entropy).

The rules, in order:

1. **First EOS.** A sample is the MLFM's token ids; :func:`cut_at_first_eos` keeps them up to and including the
   first EOS. The text scored is the kept ids decoded without special tokens; when the sample had an EOS, the
   judge's own EOS token is appended to the judge's ids once (``ends_with_eos``), so ending is scored too.
2. **Conditioning.** The judge's ids are preceded by its BOS token (GPT-2's ``<|endoftext|>``), so every token of
   the sample, the first included, is predicted once; ``tokens`` counts these predictions. A judge without a BOS
   token scores from the second token on.
3. **Long samples** (more than the judge's context, 1024 for GPT-2) are scored in sliding windows, not truncated:
   windows of the judge's context advancing by half of it, each predicting only its new tokens, so every token
   is predicted once with at least half a context before it (:func:`score_windows`).
4. **Aggregate.** ``gen_ppl = exp(Σ NLL / Σ tokens)`` over all samples: token-weighted, the perplexity of the
   samples read as one corpus, so a short sample weighs as little as its tokens (a mean of per-sample
   perplexities would let a few short, unlikely samples dominate). Per-sample ``ppl`` is reported beside it.
5. **Entropy.** Per sample, the entropy in nats of the empirical distribution of the judge tokenizer's ids of
   the sample's text (BOS and the appended EOS not included): ``"a a a"`` → 0, ``"a b"`` → log 2 with a
   word-level tokenizer. ``mean_entropy`` is its mean over the samples that have a token.
"""
from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import torch

from mlfm_scale.errors import UserError

DOWNLOAD_HINT = ("download one first, e.g. `huggingface-cli download openai-community/gpt2-large --local-dir DIR`, "
                 "and pass DIR")


def cut_at_first_eos(ids: Sequence[int], eos_id: int) -> list[int]:
    """``ids`` up to and including the first ``eos_id``; all of ``ids`` when there is none."""
    ids = list(ids)
    return ids[: ids.index(eos_id) + 1] if eos_id in ids else ids


def load_judge(path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = torch.float32):
    """``(model, tokenizer)``: the causal LM in the local Hugging Face directory ``path`` (no download), in eval
    mode on ``device`` in ``dtype`` (None: as transformers loads it). A missing directory, or one that does not
    hold a causal LM with its tokenizer, is a UserError."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(path)
    if not path.is_dir():
        raise UserError(f"judge model {path}: no such directory; {DOWNLOAD_HINT}")
    if not (path / "config.json").is_file():
        raise UserError(f"judge model {path} has no config.json: not a Hugging Face model directory; {DOWNLOAD_HINT}")
    try:
        model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True)
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError, KeyError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"judge model {path} is not a causal language model with its tokenizer that transformers "
                        f"can load ({first}); {DOWNLOAD_HINT}") from None
    return model.to(device=device, dtype=dtype).eval(), tokenizer


def context_length(judge) -> int:
    """The judge's context in tokens (``max_position_embeddings``; GPT-2's ``n_positions``)."""
    length = getattr(judge.config, "max_position_embeddings", None)
    if not isinstance(length, int) or length < 2:
        raise UserError(f"the judge's config gives no usable max_position_embeddings ({length!r}): cannot tell how "
                        "long a window it scores")
    return length


def score_windows(length: int, window: int) -> list[tuple[int, int, int]]:
    """How a sequence of ``length`` ids (its first the conditioning BOS) is scored by a judge of context ``window``:
    ``(start, first, end)`` per window, meaning ids ``[start, end)`` go in and the predictions of ids ``[first,
    end)`` count. Every id from 1 on is predicted exactly once; the first window predicts up to ``window − 1``
    ids, each later one the next ``window // 2`` with the ``window − window // 2`` ids before them as context."""
    if window < 2:
        raise ValueError(f"a window of {window} ids predicts nothing")
    spans, first = [], 1
    while first < length:
        end = min(length, window if first == 1 else first + window // 2)
        spans.append((max(0, end - window), first, end))
        first = end
    return spans


def unigram_entropy(ids: Sequence[int]) -> float:
    """Entropy (nats) of the empirical distribution of ``ids``; 0 for an empty sequence."""
    counts, n = Counter(ids), len(ids)
    return -sum(c / n * math.log(c / n) for c in counts.values()) if n else 0.0


@torch.no_grad()
def score_samples(texts: list[str], judge, tokenizer, ends_with_eos: Sequence[bool] | None = None,
                  batch_size: int = 8) -> tuple[list[dict], dict]:
    """Score ``texts`` (samples decoded through their first EOS, without it) under ``judge``; ``ends_with_eos[i]``:
    sample i had an EOS, scored as the judge's EOS after its text. Returns one record per sample ``{"tokens",
    "nll_sum", "ppl", "entropy"}`` (ppl None without tokens) and the aggregate ``{"gen_ppl", "mean_entropy",
    "tokens", "eos_fraction"}`` (the module docstring gives the rules)."""
    ends = [False] * len(texts) if ends_with_eos is None else list(ends_with_eos)
    if len(ends) != len(texts):
        raise ValueError(f"{len(ends)} ends_with_eos flags for {len(texts)} texts")
    eos, bos = tokenizer.eos_token_id, tokenizer.bos_token_id
    if any(ends) and eos is None:
        raise UserError("the judge's tokenizer has no EOS token, so a sample's end cannot be scored: use a judge "
                        "with one (GPT-2's is <|endoftext|>)")
    window = context_length(judge)
    device = next(judge.parameters()).device
    sequences, entropies = [], []
    for text, ended in zip(texts, ends):
        ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
        entropies.append(unigram_entropy(ids) if ids else None)
        sequences.append(([] if bos is None else [bos]) + ids + ([eos] if ended else []))
    # without a BOS the text's first id is score_windows' id 0: it conditions but is not predicted
    pieces = [(i, span) for i, seq in enumerate(sequences) for span in score_windows(len(seq), window)]
    nll, counted = [0.0] * len(texts), [0] * len(texts)
    for start in range(0, len(pieces), batch_size):
        batch = pieces[start:start + batch_size]
        width = max(end - begin for _, (begin, _, end) in batch)
        ids = torch.zeros(len(batch), width, dtype=torch.long)
        attention = torch.zeros(len(batch), width, dtype=torch.long)
        scored = torch.zeros(len(batch), width, dtype=torch.bool)  # positions whose id is predicted
        for row, (i, (begin, first, end)) in enumerate(batch):
            ids[row, : end - begin] = torch.tensor(sequences[i][begin:end])
            attention[row, : end - begin] = 1
            scored[row, first - begin:end - begin] = True
        ids, attention, scored = ids.to(device), attention.to(device), scored.to(device)
        logits = judge(input_ids=ids, attention_mask=attention).logits.float()
        logp = torch.log_softmax(logits[:, :-1], dim=-1).gather(-1, ids[:, 1:, None])[..., 0]
        token_nll = (-logp * scored[:, 1:]).sum(1).tolist()
        for row, (i, _) in enumerate(batch):
            nll[i] += token_nll[row]
            counted[i] += int(scored[row, 1:].sum())
    records = [{"tokens": n, "nll_sum": s, "ppl": math.exp(s / n) if n else None, "entropy": h}
               for n, s, h in zip(counted, nll, entropies)]
    total = sum(counted)
    with_tokens = [h for h in entropies if h is not None]
    return records, {
        "gen_ppl": math.exp(sum(nll) / total) if total else float("nan"),
        "mean_entropy": sum(with_tokens) / len(with_tokens) if with_tokens else float("nan"),
        "tokens": total,
        "eos_fraction": sum(ends) / len(ends) if ends else float("nan"),
    }
