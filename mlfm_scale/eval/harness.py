"""lm-evaluation-harness adapter: an exported MLFM as lm-eval's model ``mlfm``, and the paper's GSM8K protocol as
the local task ``gsm8k_mlfm`` (``lm_eval_tasks/gsm8k_mlfm.yaml``; no download).

    from mlfm_scale.eval.harness import run_harness
    out = run_harness("out/export", ["gsm8k_mlfm"], limit=20, model_args={"steps": 64})
    out["results"]["gsm8k_mlfm"]["exact_match,flexible-extract"]

lm-eval's own command line finds no model outside its package, so import this module before it runs::

    python -c "import mlfm_scale.eval.harness, lm_eval.__main__ as m; m.cli_evaluate()" run --model mlfm \\
        --model_args pretrained=out/export,steps=64 --tasks gsm8k_mlfm --include_path mlfm_scale/eval/lm_eval_tasks

**Generation** (``generate_until``). Each request's context is the prompt text, encoded with the export's tokenizer.
Its row is the prompt then ``seq_len − prompt`` positions to fill (the protocol's fixed-length row), or
``max_gen_toks`` when a task gives fewer; a prompt that leaves no position gets "" (warned), as in ``mlfm eval``.
The generated text (cut at EOS, decoded without special tokens) is cut at the earliest ``until`` string. Request
``doc_id`` i is sampled from ``prompt_seed(seed, i)`` (a repeat k ≥ 1 from ``prompt_seed(prompt_seed(seed, i),
k)``), so a completion depends on neither the batch nor the ``limit``, and equals ``mlfm eval``'s for problem i
when the seeds agree (``seed`` here, from the export's generation config unless model_args give it; ``eval.seed``
there; both 0 by default).

**Sampler settings**, later over earlier: the export's ``generation_config.json``; a task's ``generation_kwargs``
that name SampleSection fields (its protocol: ``gsm8k_mlfm`` sets the paper's 256 steps, CFG 1.0, temperature
0.1, ...); the model's ``model_args`` (any SampleSection field, e.g. ``steps=64``, ``seed=3``, ``batch_size=16``).
lm-eval's ``do_sample`` and ``temperature: 0`` ask for greedy decoding, which the MLFM sampler has no form of:
they and other keys that are not sampler settings are ignored, with a warning.

**Likelihoods** (``loglikelihood``, ``loglikelihood_rolling``: multiple-choice and perplexity tasks) raise
:class:`NoLikelihood`: an MLFM defines no tractable per-token likelihood here.
"""
from __future__ import annotations

import math
import sys
from collections import Counter, defaultdict
from collections.abc import Iterable
from pathlib import Path

import torch
from pydantic import ValidationError

from mlfm_scale.config import ConfigError, SampleSection, explain
from mlfm_scale.errors import UserError
from mlfm_scale.eval.gsm8k import GSM8K_FILE, extract_flexible, extract_strict, is_correct, load_problems

try:
    import lm_eval.models  # noqa: F401  lm-eval's own models (lazy), which its registry skips once ours is in
    from lm_eval.api.model import LM
    from lm_eval.api.registry import register_model
except ImportError:  # the optional `eval` extra
    raise UserError("mlfm_scale.eval.harness needs lm-evaluation-harness: pip install -e '.[eval]'") from None

TASKS_DIR = Path(__file__).resolve().parent / "lm_eval_tasks"
SAMPLER_FIELDS = frozenset(SampleSection.model_fields)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


class NoLikelihood(UserError, NotImplementedError):
    """A likelihood request to the ``mlfm`` model."""


NO_LIKELIHOOD = (
    "the mlfm model answers generate_until requests only: an MLFM generates by a flow over token embeddings with "
    "confidence-ordered promotion, and defines no tractable per-token log-likelihood, so lm-eval's {request} "
    "requests (multiple-choice and perplexity tasks) have no answer here. Evaluate generative tasks (gsm8k_mlfm), "
    "and measure perplexity as `mlfm eval`'s genppl task does: samples scored by a causal LM")


@register_model("mlfm")
class MLFMHarnessLM(LM):
    """An ``mlfm export`` directory (``pretrained``) on ``device`` (default, or cuda without a GPU: the cpu) in
    ``dtype`` (fp32 | bf16; default: bf16 on cuda, else as exported); every other argument is a sampler setting
    over the export's (``steps``, ``seed``, ``batch_size``, ...)."""

    def __init__(self, pretrained: str | Path, device: str | None = None, dtype: str | None = None,
                 **sampler) -> None:
        super().__init__()
        from mlfm_scale.inference import MLFMForInference

        unknown = sorted(set(sampler) - SAMPLER_FIELDS)
        if unknown:
            raise UserError(f"model_args {', '.join(unknown)}: not settings of the mlfm model; give pretrained, "
                            f"device, dtype and sampler settings ({', '.join(sorted(SAMPLER_FIELDS))})")
        if dtype not in (None, *DTYPES):
            raise UserError(f"model_args dtype={dtype}: choose fp32 or bf16")
        device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        if device.type == "cuda" and not torch.cuda.is_available():  # lm-eval's command line asks for cuda:0
            print(f"WARNING: device {device} asked for, but no GPU is visible: running on the CPU", file=sys.stderr)
            device = torch.device("cpu")
        chosen = DTYPES[dtype] if dtype else (torch.bfloat16 if device.type == "cuda" else None)
        self.model = MLFMForInference.from_pretrained(pretrained, device=device, dtype=chosen)
        self.tokenizer = self.model.tokenizer()
        self.overrides = sampler
        self.sampler_for({})  # bad settings fail here, before any request
        self._device = device
        self._warned: set[str] = set()

    # ------------------------------------------------------------------------------------------ settings
    def sampler_for(self, protocol: dict) -> SampleSection:
        """The export's sampler settings, a task's ``protocol`` over them, the model_args over both."""
        from mlfm_scale.eval.runner import protocol_for

        config = self.model.generation_config
        try:
            protocol = protocol_for(protocol, config.get("method", "mlfm"), self.model.config)
            return SampleSection.model_validate({**config, **protocol, **self.overrides})
        except ValidationError as e:
            raise ConfigError("sampler settings of the mlfm model (generation_config.json, then the task's "
                              f"generation_kwargs, then model_args): {explain(e)}") from None

    def read_gen_kwargs(self, gen_kwargs: dict) -> tuple[tuple[str, ...], int | None, SampleSection]:
        """A request's ``(until, max_gen_toks, sampler)``; keys that are not sampler settings are warned of once."""
        gen_kwargs = dict(gen_kwargs)
        until = gen_kwargs.pop("until", None) or ()
        until = (until,) if isinstance(until, str) else tuple(until)
        max_gen_toks = gen_kwargs.pop("max_gen_toks", None)
        if gen_kwargs.pop("do_sample", None) is False or gen_kwargs.get("temperature") == 0:
            gen_kwargs.pop("temperature", None)
            self.warn_once("lm-eval asks for greedy decoding (do_sample false or temperature 0), which the MLFM "
                           "sampler has no form of: sampling at the sampler's own temperature")
        ignored = sorted(k for k in gen_kwargs if k not in SAMPLER_FIELDS)
        if ignored:
            self.warn_once(f"generation_kwargs {', '.join(ignored)}: not settings of the MLFM sampler, ignored")
        protocol = {k: v for k, v in gen_kwargs.items() if k in SAMPLER_FIELDS}
        if max_gen_toks is not None and (not isinstance(max_gen_toks, int) or max_gen_toks < 1):
            raise UserError(f"generation_kwargs max_gen_toks={max_gen_toks!r}: give a positive number of tokens")
        return until, max_gen_toks, self.sampler_for(protocol)

    def warn_once(self, message: str) -> None:
        if message not in self._warned:
            self._warned.add(message)
            print(f"WARNING: {message}", file=sys.stderr, flush=True)

    # ------------------------------------------------------------------------------------------ requests
    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """One completion per request (``Instance.args`` = ``(context, gen_kwargs)``), in request order."""
        from tqdm import tqdm

        from mlfm_scale.eval import cut_at_stop
        from mlfm_scale.sample import generate
        from mlfm_scale.seeds import prompt_seed

        results: list[str | None] = [None] * len(requests)
        groups: dict[tuple[str, int], list[tuple[int, list[int], int, tuple[str, ...]]]] = defaultdict(list)
        settings, seen, too_long = {}, Counter(), 0
        for position, request in enumerate(requests):
            context, gen_kwargs = request.args
            until, max_gen_toks, cfg = self.read_gen_kwargs(gen_kwargs)
            ids = self.tokenizer.encode(context, add_special_tokens=False).ids
            fill = min(self.model.seq_len - len(ids), max_gen_toks or math.inf)
            if fill < 1:
                results[position], too_long = "", too_long + 1
                continue
            index = request.doc_id if request.doc_id is not None else position
            repeat = seen[(request.task_name, index, request.idx)]
            seen[(request.task_name, index, request.idx)] += 1
            seed = prompt_seed(cfg.seed, index) if repeat == 0 else prompt_seed(prompt_seed(cfg.seed, index), repeat)
            key = (cfg.model_dump_json(), int(fill))
            settings[key] = cfg.model_copy(update={"length": int(fill)})
            groups[key].append((position, ids, seed, until))
        if too_long:
            self.warn_once(f"{too_long} prompt(s) of {self.model.seq_len} tokens or more leave no position to fill: "
                           "answered with empty text")
        bar = tqdm(total=len(requests) - too_long, desc="mlfm generate_until", disable=disable_tqdm, leave=False,
                   file=sys.stderr)
        for key, rows in groups.items():
            cfg = settings[key]
            for start in range(0, len(rows), cfg.batch_size):
                batch = rows[start:start + cfg.batch_size]
                out = generate(self.model, [ids for _, ids, _, _ in batch], cfg, seeds=[s for _, _, s, _ in batch])
                for (position, _, _, until), tokens in zip(batch, out.generated):
                    text = cut_at_stop(self.tokenizer.decode(tokens, skip_special_tokens=True), until)
                    results[position] = text
                    self.cache_hook.add_partial("generate_until", requests[position].args, text)
                bar.update(len(batch))
        bar.close()
        return results

    def loglikelihood(self, requests, disable_tqdm: bool = False):
        raise NoLikelihood(NO_LIKELIHOOD.format(request="loglikelihood"))

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
        raise NoLikelihood(NO_LIKELIHOOD.format(request="loglikelihood_rolling"))


# ---------------------------------------------------------------------------------------------- gsm8k_mlfm
def gsm8k_docs(gsm8k_file: str | None = None, **_metadata):
    """The ``test`` split of ``gsm8k_mlfm`` (its ``custom_dataset``): the problems of ``gsm8k_file`` (task metadata;
    default the repository's ``data_prep/benchmarks/gsm8k_test.jsonl``) in file order, so doc_id i is problem i,
    each ``{"question", "answer", "gold"}`` (gold: the final answer normalised)."""
    import datasets

    problems = load_problems(gsm8k_file or GSM8K_FILE)
    rows = [{"question": p.question, "answer": p.answer, "gold": p.gold} for p in problems]
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)})


def as_scored(answer: str | None, gold: str) -> str:
    """An extracted answer as exact_match should see it: the gold's spelling when :func:`gsm8k.is_correct` accepts
    it (``"0.75"`` for gold ``"3/4"``), "" when there is none, else the answer."""
    if answer is None:
        return ""
    return gold if is_correct(answer, gold) else answer


def strict_answers(resps: Iterable[list[str]], docs: Iterable[dict]) -> list[list[str]]:
    """Filter (``function: custom``): each completion's strict answer (after the last ``####``/``###``)."""
    return [[as_scored(extract_strict(r), doc["gold"]) for r in rs] for rs, doc in zip(resps, docs)]


def flexible_answers(resps: Iterable[list[str]], docs: Iterable[dict]) -> list[list[str]]:
    """Filter (``function: custom``): each completion's flexible answer (its last number)."""
    return [[as_scored(extract_flexible(r), doc["gold"]) for r in rs] for rs, doc in zip(resps, docs)]


# ---------------------------------------------------------------------------------------------- running
def run_harness(export_dir: str | Path, tasks: Iterable[str], limit: int | float | None = None,
                model_args: dict | None = None, metadata: dict | None = None, log_samples: bool = False) -> dict:
    """``lm_eval.simple_evaluate`` of the export on ``tasks`` (ours in ``lm_eval_tasks/``; lm-eval's own are
    indexed too only when a task is not ours) with the first ``limit`` documents of each (a fraction when < 1);
    ``model_args``: sampler settings, device, dtype; ``metadata``: task metadata (``gsm8k_file``). Returns
    lm-eval's results dict (``results[task]["exact_match,strict-match"]``, ..., ``samples`` with
    ``log_samples``)."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    tasks = list(tasks)
    if not (Path(export_dir) / "config.json").is_file():
        raise UserError(f"no exported model at {export_dir} (config.json missing): run `mlfm export` first")
    manager = TaskManager(include_path=str(TASKS_DIR), include_defaults=False, metadata=metadata)
    if not set(tasks) <= set(manager.all_tasks):
        manager = TaskManager(include_path=str(TASKS_DIR), metadata=metadata)
        missing = sorted(set(tasks) - set(manager.all_tasks))
        if missing:
            raise UserError(f"unknown lm-eval task(s) {', '.join(missing)}: ours are "
                            f"{', '.join(sorted(p.stem for p in TASKS_DIR.glob('*.yaml')))}, or one of lm-eval's")
    return lm_eval.simple_evaluate(model="mlfm", model_args={"pretrained": str(export_dir), **(model_args or {})},
                                   tasks=tasks, limit=limit, task_manager=manager, log_samples=log_samples)
