"""The evaluation tasks (MLFM.md, "Evaluation protocol"), each ``task(ctx, steps) → results row`` over an
:class:`~mlfm_scale.eval.runner.EvalContext`; ``steps`` None runs the task's own sampler setting, a number
overrides its steps (a sweep). Files go to ``out/[stepsN/]TASK/`` (rank 0 writes; every rank samples).

- ``gsm8k``: the paper's protocol — zero-shot chat prompt, the answer filling the rest of a fixed-length row,
  256 steps, CFG 1.0 (corrupt, velocity; a flow-map student: its own jumps, logits), temperature 0.1, threshold
  0.8, EOS ranked separately; strict and flexible extraction (eval/gsm8k.py).
- ``mtbench``: first-turn answers to the 80 questions, Vicuna template, in FastChat's answer JSONL for an
  external judge (eval/mtbench.py).
- ``genppl``: unconditional samples scored by a local Hugging Face causal LM, through the first EOS, with the
  samples' unigram entropy beside it (eval/genppl.py).
- ``gamma``: validation CE under the training corruption in γ bins, and with every position corrupted (the
  decision diagnostic's profile).
- ``validity``: unconditional and prompted samples scored by the synthetic corpus checker.
"""
from __future__ import annotations

import functools
import time
from pathlib import Path

import torch

from mlfm_scale.errors import UserError
from mlfm_scale.eval.gsm8k import GSM8K_FILE
from mlfm_scale.eval.mtbench import MTBENCH_FILE
from mlfm_scale.eval.runner import EvalContext, as_row, mean_nfe, write_json

GSM8K_PROTOCOL = {"steps": 256, "guidance_scale": 1.0, "guidance_mode": "corrupt", "guidance_target": "velocity",
                  "temperature": 0.1, "threshold": 0.8, "eos_policy": "rank_separately"}
GAMMA_BINS = 16
PROMPTED = 1 << 30  # the validity task's prompted samples' first index


def gsm8k(ctx: EvalContext, steps: int | None) -> dict | None:
    from mlfm_scale.eval.gsm8k import load_problems, prompt_of, score, write_results

    problems = load_problems(GSM8K_FILE)[: ctx.cfg.eval.limit]
    sampler = ctx.sampler(GSM8K_PROTOCOL, steps)
    done = ctx.generate({p.index: prompt_of(p) for p in problems}, sampler, what="problems")
    if ctx.rank:
        return None
    records, metrics = score(problems, {i: c.text for i, c in done.items()})
    metrics.update(nfe=mean_nfe(done), too_long=sum(c.too_long for c in done.values()), steps=sampler.steps,
                   **ctx.throughput)
    write_results(ctx.setting_dir(steps), records, metrics)
    return as_row("gsm8k", sampler.steps, metrics)


def mtbench(ctx: EvalContext, steps: int | None) -> dict | None:
    from mlfm_scale.eval.mtbench import answer_record, load_questions, truncate_at_stop, vicuna_prompt, write_answers

    questions = load_questions(MTBENCH_FILE)[: ctx.cfg.eval.limit]
    sampler = ctx.sampler({}, steps)
    done = ctx.generate({q.question_id: vicuna_prompt(q.turns[0]) for q in questions}, sampler, what="questions")
    if ctx.rank:
        return None
    here = ctx.export.resolve()
    model_id = ctx.cfg.eval.model_id or (here.parent.name if here.name == "export" else here.name)  # the run
    now = time.time()
    path = ctx.setting_dir(steps) / "mtbench" / "model_answer" / f"{model_id}.jsonl"
    write_answers(path, [answer_record(q.question_id, truncate_at_stop(done[q.question_id].text), model_id, now)
                         for q in questions])
    metrics = {"n": len(questions), "nfe": mean_nfe(done), "too_long": sum(c.too_long for c in done.values()),
               "mean_answer_tokens": sum(len(c.token_ids) for c in done.values()) / max(1, len(done)),
               **ctx.throughput}
    write_json(path.parent.parent / "metrics.json", {**metrics, "answers": str(path), "model_id": model_id})
    return as_row("mtbench", sampler.steps, metrics)


@functools.cache
def judge_model(path: str):
    """The genppl judge (model, tokenizer), loaded once per process on the CPU in float32 (a sweep's settings share
    it; rank 0 moves it to its device)."""
    from mlfm_scale.eval.genppl import load_judge

    return load_judge(path, "cpu", torch.float32)


def genppl(ctx: EvalContext, steps: int | None) -> dict | None:
    from mlfm_scale.eval.genppl import cut_at_first_eos, score_samples

    judge, tokenizer = judge_model(ctx.cfg.eval.judge)  # a bad judge fails before sampling
    n = ctx.cfg.eval.limit or ctx.cfg.eval.samples
    sampler = ctx.sampler({"stop_at_eos": False}, steps)
    done = ctx.generate(dict.fromkeys(range(n), ""), sampler, what="samples")
    if ctx.rank:
        return None
    judge = judge.to(ctx.device)
    eos = ctx.model.eos_id
    texts, had_eos = [], []
    for i in range(n):
        kept = cut_at_first_eos(done[i].token_ids, eos)
        texts.append(ctx.tokenizer.decode(kept, skip_special_tokens=True))
        had_eos.append(bool(kept) and kept[-1] == eos)
    per_sample, metrics = score_samples(texts, judge, tokenizer, ends_with_eos=had_eos)
    metrics.update(n=n, nfe=mean_nfe(done), **ctx.throughput)
    write_json(ctx.setting_dir(steps) / "genppl" / "metrics.json", {**metrics, "samples": [
        {"index": i, "text": t, **s} for i, (t, s) in enumerate(zip(texts, per_sample))]})
    return as_row("genppl", sampler.steps, metrics)


def validity(ctx: EvalContext, steps: int | None) -> dict | None:
    from mlfm_scale.sample.validation import score_sample, validation_prompts

    n = ctx.cfg.eval.limit or ctx.cfg.eval.samples
    # unconditional sample i is index i (genppl's sample i too), prompted sample j index PROMPTED + j: neither
    # moves when the other count changes
    keys = [*range(n), *(PROMPTED + j for j in range(n))]
    prompts = [""] * n + validation_prompts(n)
    sampler = ctx.sampler({}, steps)
    done = ctx.generate(dict(zip(keys, prompts)), sampler, what="samples")
    if ctx.rank:
        return None
    scored = [score_sample(p, p + done[k].text) for k, p in zip(keys, prompts)]
    half = lambda rows: sum(v for v, _ in rows) / len(rows)
    metrics = {"n": len(prompts), "nfe": mean_nfe(done), "valid_rate": half(scored),
               "valid_rate_unconditional": half(scored[:n]), "valid_rate_prompted": half(scored[n:]),
               "valid_sentences": sum(r for _, r in scored) / len(scored), **ctx.throughput}
    write_json(ctx.setting_dir(steps) / "validity" / "metrics.json", {**metrics, "samples": [
        {"index": k, "prompt": p, "text": done[k].text, "valid": v} for k, p, (v, _) in zip(keys, prompts, scored)]})
    return as_row("validity", sampler.steps, metrics)


def gamma(ctx: EvalContext, steps: int | None) -> dict | None:
    """CE in γ bins under the training corruption (per-sequence γ and mask ratio, MLFM.md "Forward process"),
    and with every position corrupted at the bins' centres; validation blocks sharded over ranks by index."""
    from mlfm_scale.data.batch import MicroBatch
    from mlfm_scale.data.loader import segment_ids
    from mlfm_scale.diagnose import decision_profile, validation_blocks
    from mlfm_scale.flow.bridge import bridge_forward
    from mlfm_scale.flow.decision import decision_record
    from mlfm_scale.flow.objective import per_position_ce
    from mlfm_scale.flow.schedules import bridge_time
    from mlfm_scale.inference.model import curve_from_json
    from mlfm_scale.seeds import prompt_seed
    from mlfm_scale.train.objective import MLFMObjective

    model, o = ctx.model, ctx.model.objective_cfg
    data = Path(ctx.cfg.eval.data) if ctx.cfg.eval.data else ctx.cfg.path(ctx.cfg.data.root)
    ids, lengths = validation_blocks(data, ctx.cfg.eval.limit or ctx.cfg.eval.blocks)
    if ids.size(1) != model.seq_len:
        raise UserError(f"{data} holds blocks of {ids.size(1)} tokens, the model was trained on {model.seq_len}")
    objective = MLFMObjective(o, model.mask_id, (model.eos_id, model.pad_id))
    if model.config.get("gamma_curve") is not None:  # the training law as it was learned
        objective.load_state_dict({"curve": curve_from_json(model.config["gamma_curve"])})
    edges = torch.linspace(o.gamma_min, o.gamma_max, GAMMA_BINS + 1, dtype=torch.float64)
    centres = (edges[1:] + edges[:-1]) / 2
    rows = {}
    with torch.no_grad():
        for i in range(ctx.rank, ids.size(0), ctx.world):  # one block at a time, seeded by its index
            block, length = ids[i:i + 1].to(ctx.device), lengths[i:i + 1].to(ctx.device)
            generator = torch.Generator(device=ctx.device).manual_seed(prompt_seed(ctx.cfg.eval.seed, i))
            segments = segment_ids(block, length, None)
            draw = objective.draw(MicroBatch(block, length, segments, None), generator)
            t = bridge_time(draw.gamma.double(), o.sigma)
            z = bridge_forward(model.embed(block), model.mask_embedding(), t, draw.corrupted, o.sigma, generator)
            ce = per_position_ce(model(z, draw.gamma, segments), block)
            trained = float(ce[draw.corrupted].mean())
            valid = objective.valid_positions(MicroBatch(block, length, segments, None))
            accuracy, masked = decision_profile(model, block, valid, centres, generator, segments)
            rows[i] = (float(draw.gamma), trained, accuracy.tolist(), masked.tolist())
    rows = ctx.gather(rows)
    if ctx.rank:
        return None
    found = [rows[i] for i in sorted(rows)]
    bins = torch.bucketize(torch.tensor([g for g, *_ in found], dtype=torch.float64), edges[1:-1])
    ce = torch.tensor([c for _, c, *_ in found], dtype=torch.float64)
    binned = [float(ce[bins == k].mean()) if bool((bins == k).any()) else None for k in range(GAMMA_BINS)]
    accuracy = torch.tensor([a for *_, a, _ in found], dtype=torch.float64).mean(0)
    masked = torch.tensor([m for *_, m in found], dtype=torch.float64).mean(0)
    profile = decision_record(centres, accuracy, masked)
    metrics = {"n": len(found), "ce_training_corruption": float(ce.mean()),
               "ce_all_masked_mean": float(masked.mean())}
    if profile["window"] is not None:
        metrics.update({f"decision_{k}": v for k, v in profile["window"].items()})
    write_json(ctx.setting_dir(None) / "gamma" / "metrics.json",
               {**metrics, "gamma_bins": centres.tolist(), "ce_by_gamma": binned, "all_masked": profile})
    return as_row("gamma", None, metrics)


TASKS = {"gsm8k": gsm8k, "mtbench": mtbench, "genppl": genppl, "gamma": gamma, "validity": validity}
SAMPLED = ("gsm8k", "mtbench", "genppl", "validity")  # the tasks a steps sweep repeats
