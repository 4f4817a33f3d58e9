"""``generate``: prompts in, samples out, by the MLFM promotion sampler or one of its baselines.

    out = generate(denoiser, [[ids of prompt 1], [], ...], SampleSection(method="mlfm", steps=64))
    out.generated, out.nfe, out.rounds, out.history, out.gamma_min (where trajectories ended, and why)

The denoiser is an exported inference model or a training model behind ``ModelDenoiser``. All randomness comes
from ``generator`` (default: a fresh one seeded with ``cfg.seed`` on the model's device), so a call repeats
exactly under the same seed, prompts and batch.
"""
from __future__ import annotations

import torch

from mlfm_scale.config import SampleSection
from mlfm_scale.sample.baselines import flow_sample, mdm_sample
from mlfm_scale.sample.canvas import build_canvas
from mlfm_scale.sample.denoiser import Denoiser, device_of
from mlfm_scale.sample.grid import sampling_range
from mlfm_scale.sample.promotion import promotion_sample
from mlfm_scale.sample.state import SampleOutput, SampleState

METHODS = ("mlfm", "flow", "mdm")


def banned_ids(denoiser: Denoiser) -> torch.Tensor:
    """Ids a sampler never writes: the mask token, and the pad token unless it is also EOS."""
    ids = {denoiser.mask_id} | ({denoiser.pad_id} - {denoiser.eos_id})
    return torch.tensor(sorted(ids), dtype=torch.long, device=device_of(denoiser))


@torch.no_grad()
def generate(denoiser: Denoiser, prompts: list[list[int]], cfg: SampleSection,
             generator: torch.Generator | None = None, history: bool = False, progress: bool = False
             ) -> SampleOutput:
    """Fill ``cfg.length`` positions (default: up to the model's seq_len) after each prompt by ``cfg.method``.

    ``history`` records each round's promotions per sample; ``progress`` shows a bar of decided tokens."""
    device = device_of(denoiser)
    canvas = build_canvas(prompts, cfg.length, denoiser.seq_len, denoiser.mask_id, denoiser.pad_id, device)
    gamma_min, _, source = sampling_range(cfg, denoiser.decision_window(), denoiser.gamma_schedule())
    cfg = cfg.model_copy(update={"gamma_min": gamma_min})  # `auto` resolved once, for every round
    if generator is None:
        generator = torch.Generator(device=device).manual_seed(cfg.seed)
    state = SampleState(canvas, denoiser.eos_id, cfg.stop_at_eos, history, progress)
    banned = banned_ids(denoiser)
    if cfg.method == "mlfm":
        promotion_sample(denoiser, canvas, state, cfg, cfg.threshold, banned, generator)
    elif cfg.method == "flow":
        flow_sample(denoiser, canvas, state, cfg, banned, generator)
    elif cfg.method == "mdm":
        mdm_sample(denoiser, canvas, state, cfg, banned, generator)
    else:
        raise ValueError(f"unknown sampling method {cfg.method!r}: choose one of {', '.join(METHODS)}")
    return state.output(gamma_min, source)
