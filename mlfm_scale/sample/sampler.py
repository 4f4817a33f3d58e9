"""``generate``: prompts in, samples out, by the MLFM promotion sampler, one of its baselines, or a distilled
flow-map student's few jumps per round (``method=flowmap``).

    out = generate(denoiser, [[ids of prompt 1], [], ...], SampleSection(method="mlfm", steps=64))
    out.generated, out.nfe, out.rounds, out.history, out.gamma_min (where trajectories ended, and why)

``promotion=False`` (mlfm, flowmap) decodes every token at the end of the first round: method=mlfm then samples
as method=flow. The denoiser is an exported inference model or a training model behind ``ModelDenoiser``.

Randomness: by default one ``generator`` draws for the whole batch (a fresh one seeded with ``cfg.seed`` on the
model's device), so a call repeats exactly under the same seed, prompts and batch. With ``seeds`` (one per
prompt, e.g. ``prompt_seed(seed, index)``) every draw of row b comes from its own generator and covers only the
row's own positions (``RowGenerators``, flow/bridge.py); finished rows leave the batch, and no method draws
anything whose count depends on another row. A prompt then samples the same in any batch (size, order,
companions, data-parallel rank) as long as the network's logits for a row are bitwise the same in any batch:
rows are separate and padding is its own segment, but kernels may round differently for other batch shapes
(GPU matmuls especially). Rows of one width (prompt + fill the same for every row: the evaluation protocol's
fixed-length rows) keep the padded width the same in every batch; only ``drop`` guidance still packs its
unconditional pass to the batch's widest kept span.
"""
from __future__ import annotations

import torch

from mlfm_scale.config import SampleSection
from mlfm_scale.errors import UserError
from mlfm_scale.flow.bridge import Generators, RowGenerators
from mlfm_scale.sample.baselines import flow_sample, mdm_sample
from mlfm_scale.sample.canvas import Canvas, build_canvas
from mlfm_scale.sample.denoiser import Denoiser, device_of
from mlfm_scale.sample.flowmap import flowmap_sample
from mlfm_scale.sample.grid import sampling_range
from mlfm_scale.sample.promotion import promotion_sample
from mlfm_scale.sample.state import SampleOutput, SampleState

METHODS = ("mlfm", "flow", "mdm", "flowmap")


def banned_ids(denoiser: Denoiser) -> torch.Tensor:
    """Ids a sampler never writes: the mask token, and the pad token unless it is also EOS."""
    ids = {denoiser.mask_id} | ({denoiser.pad_id} - {denoiser.eos_id})
    return torch.tensor(sorted(ids), dtype=torch.long, device=device_of(denoiser))


def random_streams(canvas: Canvas, seed: int, generator: torch.Generator | None, seeds: list[int] | None,
                   device: torch.device) -> Generators:
    """What the sampler draws from: one generator per row seeded by ``seeds``, drawing over the row's prompt and
    fill; else ``generator``, or a fresh one seeded with ``seed``."""
    if seeds is None:
        return generator if generator is not None else torch.Generator(device=device).manual_seed(seed)
    if generator is not None:
        raise UserError("give generate() either a generator (one stream for the batch) or seeds (one stream per "
                        "prompt), not both")
    if len(seeds) != canvas.ids.size(0):
        raise UserError(f"{len(seeds)} seeds for {canvas.ids.size(0)} prompts: give one seed per prompt")
    widths = (canvas.prompt | canvas.fill).sum(dim=1).tolist()
    return RowGenerators.seeded(seeds, widths, device)


@torch.no_grad()
def generate(denoiser: Denoiser, prompts: list[list[int]], cfg: SampleSection,
             generator: torch.Generator | None = None, history: bool = False, progress: bool = False,
             seeds: list[int] | None = None) -> SampleOutput:
    """Fill ``cfg.length`` positions (default: up to the model's seq_len) after each prompt by ``cfg.method``.

    ``seeds`` (one per prompt; not with ``generator``) give every row its own random stream; ``history`` records
    each round's promotions per sample; ``progress`` shows a bar of decided tokens."""
    device = device_of(denoiser)
    canvas = build_canvas(prompts, cfg.length, denoiser.seq_len, denoiser.mask_id, denoiser.pad_id, device)
    gamma_min, _, source = sampling_range(cfg, denoiser.decision_window(), denoiser.gamma_schedule())
    cfg = cfg.model_copy(update={"gamma_min": gamma_min})  # `auto` resolved once, for every round
    streams = random_streams(canvas, cfg.seed, generator, seeds, device)
    state = SampleState(canvas, denoiser.eos_id, cfg.stop_at_eos, history, progress)
    banned = banned_ids(denoiser)
    threshold = cfg.threshold if cfg.promotion else float("-inf")  # −∞: the first round promotes every token
    if cfg.method == "mlfm":
        promotion_sample(denoiser, canvas, state, cfg, threshold, banned, streams)
    elif cfg.method == "flow":
        flow_sample(denoiser, canvas, state, cfg, banned, streams)
    elif cfg.method == "mdm":
        mdm_sample(denoiser, canvas, state, cfg, banned, streams)
    elif cfg.method == "flowmap":
        flowmap_sample(denoiser, canvas, state, cfg, threshold, banned, streams)
    else:
        raise ValueError(f"unknown sampling method {cfg.method!r}: choose one of {', '.join(METHODS)}")
    return state.output(gamma_min, source)
