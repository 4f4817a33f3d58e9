"""Samples drawn inside the training process, scored by the synthetic corpus checker (``data_prep.synth``).

Every ``sample.validation.every`` steps, ``TrainingSamples`` copies the current weights (the EMA ones when the
caller swaps them in) into a plain tensor-parallel-size-1 replica of the network on rank 0 — gathering each
ZeRO-3 partition in turn, a collective every rank joins; the replica lives only while sampling — and rank 0
draws ``samples`` unconditional and as many
prompted samples (``Story of NAME.``) with the configured sampler, ``validation.steps`` SDE steps and
``validation.length`` tokens. It returns the validity rates and mean NFE as metrics and appends the texts to
``OUT_DIR/samples.jsonl``. Needs ``parallel.tp=1`` (the replica holds the whole vocabulary); with a larger TP
sample from an export instead.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import torch
from torch import nn

from data_prep.synth import NAMES, check
from mlfm_scale.config import Config
from mlfm_scale.errors import UserError
from mlfm_scale.flow.decision import DecisionWindow
from mlfm_scale.sample.denoiser import ModelDenoiser
from mlfm_scale.sample.sampler import generate


def score_sample(prompt: str, text: str) -> tuple[bool, float]:
    """Score the complete sentences a sample wrote: those of ``text`` (prompt + generation) beyond the prompt's
    own (a prompt's unfinished sentence counts as written). Returns (at least one such sentence and all obey
    the synthetic corpus' rules, the share that do). An unconditional sample may begin inside a document
    (training blocks do), so its text up to the first full stop is not scored."""
    if not prompt:
        text = text.partition(".")[2]
    whole, given = check(text), check(prompt)
    written, valid = whole.sentences - given.sentences, whole.valid - given.valid
    return written > 0 and valid == written, valid / written if written else 0.0


def validation_prompts(count: int) -> list[str]:
    """``count`` story openings, cycling through the corpus' heroes."""
    return [f"Story of {NAMES[i % len(NAMES)]}." for i in range(count)]


class TrainingSamples:
    """``__call__(step, window)`` → metrics (rank 0; {} elsewhere): ``sample_valid_rate`` (all samples),
    ``sample_valid_rate_unconditional``, ``sample_valid_rate_prompted``, ``sample_valid_sentences`` (mean share
    of valid sentences), ``sample_nfe`` (mean), ``sample_s``."""

    def __init__(self, cfg: Config, model: nn.Module, objective, manifest: dict, rank: int):
        """``model``: the training ``MLFMModel`` (its parameters may be ZeRO-3 partitions); ``objective``: the
        ``MLFMObjective`` whose current γ schedule sets the sampling grid; ``manifest``: the shards' manifest."""
        if cfg.parallel.tp != 1:
            raise UserError(f"sample.validation.every needs parallel.tp=1 (got {cfg.parallel.tp}): in-training "
                            "samples use a one-rank copy of the network; set sample.validation.every=0 and sample "
                            "from an export (mlfm export, mlfm sample)")
        from tokenizers import Tokenizer

        from mlfm_scale.data.loader import source_dirs

        tok = manifest["tokenizer"]
        self.cfg, self.model, self.objective = cfg, model, objective
        self.options = cfg.sample.model_copy(update={"steps": cfg.sample.validation.steps,
                                                     "length": cfg.sample.validation.length, "seed": cfg.seed})
        self.tokenizer = Tokenizer.from_file(str(source_dirs(cfg)[0][0] / tok["file"]))
        self.ids = (tok["mask_id"], tok["eos_id"], tok["pad_id"])
        self.rank = rank
        self.log = Path(cfg.out_dir) / "samples.jsonl"

    def _replica(self) -> nn.Module | None:
        """Rank 0: a TP=1 copy of the model's current weights (every rank takes part in each ZeRO-3 gather)."""
        import deepspeed

        from mlfm_scale.model.mlfm import MLFMModel

        replica = None
        if self.rank == 0:
            weight, model = self.model.embedding_table(), self.model
            with torch.random.fork_rng(devices=[]):  # the replica's throwaway init must not move the run's RNG
                replica = MLFMModel(model.cfg, model.vocab_size, 1, weight.dtype, model.backend)
            replica.to(weight.device).eval().requires_grad_(False)
        ours = dict(replica.named_parameters()) if replica is not None else {}
        for name, param in self.model.named_parameters():
            with deepspeed.zero.GatheredParameters([param]):
                if replica is not None:
                    ours[name].copy_(param.detach())
        return replica

    @torch.no_grad()
    def __call__(self, step: int, window: DecisionWindow | None = None) -> dict[str, float]:
        """Samples of the current weights; ``window``: the run's latest decision window (``gamma_min=auto``)."""
        replica = self._replica()
        if replica is None:
            return {}
        started = time.perf_counter()
        mask_id, eos_id, pad_id = self.ids
        denoiser = ModelDenoiser(replica, replica.vocab_size, mask_id, eos_id, pad_id,
                                 self.cfg.objective.sigma, self.cfg.data.seq_len, self.objective.schedule, window)
        n = self.cfg.sample.validation.samples
        prompts = [""] * n + validation_prompts(n)
        ids = [self.tokenizer.encode(p, add_special_tokens=False).ids for p in prompts]
        generated, nfe, size = [], [], self.options.batch_size
        for start in range(0, len(ids), size):
            out = generate(denoiser, ids[start:start + size], self.options)
            generated += out.generated
            nfe.append(out.nfe)
        gamma_min = out.gamma_min
        del denoiser, replica  # the copy lives only while sampling
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        nfe = torch.cat(nfe)
        records = []
        for i, (prompt, tokens) in enumerate(zip(prompts, generated)):
            text = self.tokenizer.decode(ids[i] + tokens, skip_special_tokens=True)
            valid, sentences = score_sample(prompt, text)
            records.append({"step": step, "prompted": bool(prompt), "text": text, "nfe": int(nfe[i]),
                            "gamma_min": gamma_min, "valid": valid, "valid_sentences": sentences})
        with self.log.open("a", encoding="utf-8") as f:
            f.writelines(json.dumps(r) + "\n" for r in records)
        valid = torch.tensor([r["valid"] for r in records], dtype=torch.float64)
        sentences = sum(r["valid_sentences"] for r in records) / len(records)
        return {"sample_valid_rate": float(valid.mean()), "sample_valid_rate_unconditional": float(valid[:n].mean()),
                "sample_valid_rate_prompted": float(valid[n:].mean()), "sample_valid_sentences": sentences,
                "sample_nfe": float(nfe.double().mean()), "sample_gamma_min": gamma_min,
                "sample_s": time.perf_counter() - started}
