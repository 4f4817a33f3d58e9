"""One typed schema for the whole system, loaded from YAML with dotted command-line overrides.

    cfg = load_config("configs/tiny.yaml", ["train.lr=3e-4", "parallel.tp=2"])

A YAML file may name a parent with ``extends: other.yaml`` (resolved relative to the file); the child is
deep-merged over it. Unknown keys and wrong types raise :class:`ConfigError` naming the dotted key path.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from mlfm_scale.errors import UserError


class ConfigError(UserError):
    """A configuration problem a user can fix; the message names the key path."""


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


# ----------------------------------------------------------------------------------------------- data
class SynthSection(Section):
    """The synthetic demo corpus (``data_prep.synth``)."""

    documents: int = Field(2000, ge=1)
    seed: int = 0


class PrepSection(Section):
    """Corpus → tokenized, packed MDS shards (``data_prep``); each field is also a ``mlfm prep corpus`` flag."""

    format: Literal["auto", "jsonl", "text", "parquet", "sft"] = Field(
        "auto", description="input format; auto: .jsonl/.json → jsonl, .parquet → parquet, else text; "
        "sft = prompt/response JSONL")
    text_field: str = Field("text", description="JSONL field / Parquet column holding the document")
    prompt_field: str = Field("prompt", description="SFT prompt field")
    chat_template: str | None = Field(None, description="SFT: the prompt as the model sees it, with {prompt} "
                                      "replaced (the reference's: 'USER:\\n{prompt}\\nASSISTANT:\\n')")
    response_field: str = Field("response", description="SFT response field")
    doc_per: Literal["file", "paragraph", "line"] = Field(
        "file", description="how a plain-text file splits into documents")
    tokenizer: str | None = Field(None, description="directory holding a Hugging Face tokenizer.json "
                                  "(default: train a byte-level BPE on the corpus)")
    vocab_size: int = Field(1024, ge=259, description="vocabulary of a trained byte-level BPE: its 256 bytes, "
                            "3 special tokens (EOS, pad, mask) and the learned merges")
    eos_token: str | None = Field(None, description="EOS token of a given tokenizer (default: common names)")
    val_fraction: float = Field(0.01, ge=0.0, lt=1.0, description="share of documents (by hash) for val")
    workers: int = Field(1, ge=1, description="worker processes")
    chunk_bytes: int = Field(4 << 20, ge=1 << 10, description="documents are packed in chunks of this "
                             "many characters; the chunking, hence the shards, is the same for any worker count")
    shard_size_limit: int = Field(64 << 20, ge=1 << 12, description="uncompressed bytes per MDS shard")
    compression: Literal["zstd", "none"] = Field("zstd", description="shard compression")
    skip_bad: bool = Field(False, description="count and skip malformed records instead of failing")
    utf8_errors: Literal["strict", "replace"] = Field(
        "strict", description="invalid UTF-8: fail, or replace with U+FFFD (counted)")


    @model_validator(mode="after")
    def _template(self) -> PrepSection:
        if self.chat_template is not None and (self.format != "sft" or "{prompt}" not in self.chat_template):
            raise ValueError("chat_template applies to prompts: it needs format=sft and a {prompt} placeholder")
        return self

class SourceSection(Section):
    """One prepared shard directory and its share of the training mixture."""

    path: str
    weight: float = Field(1.0, gt=0.0)


class DataSection(Section):
    root: str = "data"  # prepared shards (relative paths are under ``out_dir``); the default single source
    sources: list[SourceSection] = []  # a mixture of prepared directories; empty → [root]
    # how sources mix: rows of every source in each micro-batch, or each micro-batch from one source (chosen by
    # the weights; the reference's SFT mixes so)
    mix: Literal["within", "per_micro_batch"] = "within"
    cache: str | None = None  # streaming's node-local copy of the shards (default: under the system temp dir)
    seq_len: int = Field(128, ge=8)
    num_workers: int = Field(0, ge=0)  # DataLoader worker processes per rank
    shuffle: bool = True
    synth: SynthSection = SynthSection()
    prep: PrepSection = PrepSection()


# ---------------------------------------------------------------------------------------------- model
class LoRASection(Section):
    """LoRA adapters on the frozen base linears (MLFM.md, Model: MDM → MLFM conversion); rank 0 → none.
    y = W x + (alpha / rank)·B A dropout(x), B zero-initialised so an adapted model starts as its base."""

    rank: int = Field(0, ge=0)
    alpha: float = Field(512.0, gt=0.0)
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    targets: list[Literal["qkv", "proj", "fc1", "fc2"]] = ["qkv", "proj", "fc1", "fc2"]
    output_rank: int = Field(0, ge=0)  # the untied output head's delta (MLFM.md: rank 256, α 256); 0 → none
    output_alpha: float = Field(256.0, gt=0.0)

    @property
    def enabled(self) -> bool:
        return self.rank > 0 or self.output_rank > 0


class ModelSection(Section):
    """A LLaMA-style bidirectional transformer with AdaLN time conditioning (MLFM.md, Model)."""

    num_layers: int = Field(2, ge=1)
    hidden_size: int = Field(64, ge=8)
    num_heads: int = Field(4, ge=1)
    num_query_groups: int | None = Field(None, ge=1)  # grouped-query attention: key/value heads (None → num_heads)
    ffn_hidden_size: int = Field(176, ge=8)  # SwiGLU inner width
    vocab_size: int | None = None  # None → taken from the data manifest (incl. the mask token)
    time_embed_dim: int = Field(256, ge=2, multiple_of=2)  # sinusoidal width of the γ embedding (cos | sin)
    time_hidden_size: int = Field(512, ge=1)  # width of the γ-embedding MLP
    # shared: one γ MLP feeds every layer's modulation; per_layer: each layer has its own (the reference's
    # DiT-style adapters, `time_mlp` in every block)
    time_mlp: Literal["shared", "per_layer"] = "shared"
    rope_base: float = 10000.0
    norm_eps: float = 1e-5
    freeze_embeddings: bool = True  # MLFM.md: the input table E is frozen (σ is an absolute scale in its space)
    # init std of E per dimension. "litgpt": SMDM/LitGPT's √(2/(5d)), the scale σ and the γ settings were tuned
    # for (MLFM.md, Noise geometry): the token decision then falls at γ ≈ −4…0 at every width
    embedding_std: float | Literal["litgpt"] = "litgpt"
    attention: Literal["auto", "flash", "sdpa"] = "auto"
    attend_within_documents: bool = False  # restrict attention to each packed document
    recompute: bool = False  # activation recompute per layer
    # a flow-map student (`mlfm distill`): a second, zero-initialised γ embedding for the target time of a jump
    flow_map: bool = False
    lora: LoRASection = LoRASection()

    @property
    def initial_embedding_std(self) -> float:
        """The per-dimension std E is drawn with: ``embedding_std``, or √(2/(5d)) for ``litgpt``."""
        if self.embedding_std == "litgpt":
            return (2.0 / (5.0 * self.hidden_size)) ** 0.5
        return self.embedding_std

    @property
    def query_groups(self) -> int:
        """Key/value heads: ``num_query_groups``, or one per head."""
        return self.num_query_groups or self.num_heads

    @model_validator(mode="after")
    def _heads_divide(self) -> ModelSection:
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        if self.num_heads % self.query_groups:
            raise ValueError(f"num_heads {self.num_heads} is not divisible by num_query_groups {self.query_groups}")
        if self.embedding_std != "litgpt" and not self.embedding_std > 0:
            raise ValueError(f"embedding_std must be positive or 'litgpt', got {self.embedding_std}")
        return self


# ------------------------------------------------------------------------------------------ objective
class ActiveCurveSection(Section):
    """The adaptive "active" γ curve (MLFM.md, γ schedules)."""

    bins: int = Field(128, ge=4)
    quantiles: int = Field(101, ge=3)
    ce_decay: float = Field(0.999, ge=0.0, lt=1.0)  # per step: decay of the per-bin example counts and CE sums
    rate: float = Field(0.002, gt=0.0, le=1.0)  # after the first fit (taken in full), move this far toward a new one
    r2_min: float = Field(0.95, le=1.0)  # the logistic fit is accepted at this R² or better
    update_every: int = Field(10, ge=1)  # optimizer steps between curve updates
    estimator: Literal["logistic", "isotonic"] = "logistic"  # CE curve → CDF: logistic fit or monotone regression
    min_bins: int = Field(8, ge=4)  # a fit needs this many γ-bins with ≥ min_bin_count examples ...
    min_bin_count: float = Field(20, ge=1)
    min_examples: float = Field(4096, ge=0)  # ... and this many examples (decayed counts) in them
    mask_ratio_min: float = Field(0.0, ge=0.0, le=1.0)  # count only rows with mask ratio ≥ this (SFT: 0.95)


class ObjectiveSection(Section):
    """The forward process and the velocity objective (MLFM.md, Forward process / Loss)."""

    kind: Literal["mlfm", "mdm"] = "mlfm"  # mdm: the same network as a plain masked diffusion model (baseline)
    sigma: float = Field(0.2, gt=0.0)
    gamma_min: float = -10.0
    gamma_max: float = 6.0
    gamma_schedule: Literal["uniform", "normal", "gumbel", "active_piecewise", "active_mixture"] = (
        "active_mixture"
    )
    gamma_loc: float = -2.5  # normal / gumbel location
    gamma_scale: float = Field(2.0, gt=0.0)  # normal / gumbel scale
    mixture_weights: tuple[float, float, float] = (0.1, 0.2, 0.7)  # active_mixture: uniform, normal, active
    active: ActiveCurveSection = ActiveCurveSection()
    mask_ratio: Literal["maskgit_cosine", "uniform"] = "maskgit_cosine"
    mask_ratio_min: float = Field(0.05, ge=0.0, le=1.0)
    mask_ratio_max: float = Field(1.0, ge=0.0, le=1.0)
    mask_ratio_power: float = Field(1.0, gt=0.0)
    low_discrepancy: bool = True
    reduction: Literal["inverse_count", "inverse_p", "none"] = "inverse_count"
    mse_weight: float = Field(0.0, ge=0.0)  # λ of ‖x̂0 − e‖² on corrupted positions (0 pretraining, 10 SFT)
    crop_probability: float = Field(0.01, ge=0.0, le=1.0)  # pretraining: crop a micro-batch to a random prefix

    @model_validator(mode="after")
    def _ranges(self) -> ObjectiveSection:
        if self.gamma_min >= self.gamma_max:
            raise ValueError(f"gamma_min {self.gamma_min} must be below gamma_max {self.gamma_max}")
        if self.mask_ratio_min > self.mask_ratio_max:
            raise ValueError("mask_ratio_min must not exceed mask_ratio_max")
        return self


class SFTSection(Section):
    """The SFT stage (``stage: sft``, prompt/response shards; MLFM.md, Loss): only response positions are
    corrupted, and the loss is LLaDA-normalised over the response."""

    full_response_prob: float = Field(0.5, ge=0.0, le=1.0)  # rows whose whole response is corrupted (p = 1)
    crop_multiple: int = Field(64, ge=1)  # each micro-batch is cut after its longest row, rounded up to this


class DistillSection(Section):
    """Flow-map self-distillation (``mlfm distill``; MLFM.md, "Flow-map distillation"): a student (the teacher's
    network plus a target-time embedding) learns to jump s → t along the bridge's probability-flow ODE."""

    teacher: str | None = Field(None, description="the teacher: a checkpoint directory holding `latest`, or a tag "
                                "(any layout); the student starts from its weights")
    teacher_weights: Literal["ema", "param"] = "ema"
    steps: int | None = Field(None, ge=1, description="optimizer steps of the distillation run (default: "
                              "train.steps); lets one config pretrain and then distil in `mlfm launch pipeline`")
    diagonal_fraction: float = Field(0.5, ge=0.0, le=1.0, description="share of rows with s = t, whose target is "
                                     "the teacher's posterior")
    boundary_prob: float = Field(0.05, ge=0.0, le=1.0, description="share of the other rows jumping the whole "
                                 "sampling range (γ quantile 0.99 → γ_min)")
    target: Literal["student", "ema"] = Field("student", description="what computes the composed half-jump "
                                              "targets (without gradient): the student's weights or their EMA")
    guidance_scale: float = Field(0.0, description="the teacher's classifier-free guidance on the logits "
                                  "(log p_c + s·(log p_c − log p_u), observed positions re-corrupted); 0: unguided")


# ------------------------------------------------------------------------------------------- parallel
class ParallelSection(Section):
    """Process layout: world = tp × pp × dp. ZeRO-3 needs pp = 1 (DeepSpeed's pipeline engine asserts).
    A pipeline runs ``train.grad_accum`` micro-batches per step through its stages."""

    tp: int = Field(1, ge=1)
    pp: int = Field(1, ge=1)
    zero_stage: Literal[0, 1, 2, 3] = 3
    partition: Literal["layers", "parameters"] = "layers"  # pipeline stages balance layer counts or parameters

    @model_validator(mode="after")
    def _supported_layout(self) -> ParallelSection:
        if self.pp > 1 and self.zero_stage > 1:
            raise ValueError(
                f"pp={self.pp} with zero_stage={self.zero_stage} is not supported: DeepSpeed's pipeline engine "
                "refuses ZeRO-2/3. Supported layouts: TP × ZeRO-3 (pp=1), or TP × PP × ZeRO-1 "
                "(set parallel.zero_stage=1)."
            )
        return self

    def data_parallel_size(self, world_size: int) -> int:
        """dp for a world of ``world_size`` processes; raises ConfigError when tp × pp does not divide it."""
        if world_size % (self.tp * self.pp):
            raise ConfigError(
                f"world size {world_size} is not divisible by parallel.tp × parallel.pp = {self.tp} × {self.pp}"
            )
        return world_size // (self.tp * self.pp)


# ---------------------------------------------------------------------------------------------- train
class TrainSection(Section):
    steps: int = Field(200, ge=1)
    micro_batch_size: int = Field(8, ge=1)  # sequences per data-parallel rank per micro-step
    grad_accum: int = Field(1, ge=1)
    lr: float = Field(3e-4, gt=0.0)
    min_lr_ratio: float = Field(0.1, ge=0.0, le=1.0)
    warmup_steps: int = Field(20, ge=0)
    weight_decay: float = Field(0.01, ge=0.0)
    adam_betas: tuple[float, float] = (0.9, 0.95)  # AdamW (β1, β2)
    grad_clip: float = Field(1.0, ge=0.0)
    ema_decay: float = Field(0.999, ge=0.0, lt=1.0)
    dtype: Literal["fp32", "bf16"] = "fp32"
    trainable: list[str] = []  # regexes of trainable parameter names (frozen base + adapters); empty → all
    # learning rates by parameter group (None → lr): LoRA adapters, AdaLN (modulation and γ MLPs), the base
    # network. With model.lora on, the base is frozen unless base_lr is set.
    lora_lr: float | None = Field(None, gt=0.0)
    adaln_lr: float | None = Field(None, gt=0.0)
    base_lr: float | None = Field(None, gt=0.0)
    # a new run starting from these weights (a checkpoint dir or tag, e.g. `mlfm convert`'s output; any layout)
    # with fresh optimizer, schedule, data and γ-curve state; init_weights picks the trained or the EMA weights
    init_from: str | None = None
    init_weights: Literal["param", "ema"] = "param"
    # None: a new run (refused over existing checkpoints); "auto": latest in out_dir (or, if it is damaged, the
    # newest checkpoint that verifies); "restart": a new run over existing checkpoints; or a checkpoint dir / tag
    resume: str | None = None
    # the LR schedule's horizon (default: train.steps); a resumed run keeps its checkpoint's unless this is set
    schedule_steps: int | None = Field(None, ge=1)
    max_bad_steps: int = Field(5, ge=1)  # consecutive non-finite loss/gradient steps before a rollback
    max_rollbacks: int = Field(2, ge=0)  # rollbacks to the last good checkpoint before the run stops
    inject_nonfinite: list[int] = []  # test-only fault: these steps' loss is NaN (each once, so a rollback passes)
    eval_every: int = Field(50, ge=1)
    eval_batches: int = Field(4, ge=1)
    # at each evaluation: accuracy and CE against this many γ over the training range, every position corrupted
    # (the decision diagnostic, MLFM.md "Noise geometry"; 0: off)
    decision_points: int = Field(17, ge=0)


class CheckpointSection(Section):
    dir: str = "checkpoints"  # under out_dir
    every: int = Field(100, ge=1)
    keep_last: int = Field(2, ge=1)  # the newest N are kept ...
    keep_every: int | None = None  # ... and every checkpoint whose step is a multiple of this


class LogSection(Section):
    every: int = Field(10, ge=1)
    plot_every: int = Field(100, ge=1)
    sample_ids: bool = False  # each rank appends the block ids it trained on to samples/rankNNNNN.jsonl
    wandb: bool = False
    wandb_mode: Literal["offline", "online"] = "offline"  # online needs WANDB_API_KEY in the environment
    wandb_project: str = "mlfm-scale"


class SampleValidationSection(Section):
    """Samples drawn during training (``mlfm_scale.sample.validation``): unconditional and prompted, scored by the
    synthetic-corpus checker; ``every`` 0 turns them off."""

    every: int = Field(0, ge=0, description="optimizer steps between validation samples (0: off)")
    samples: int = Field(4, ge=1, description="unconditional samples, and as many prompted ones")
    steps: int = Field(16, ge=1, description="SDE steps per promotion round (cheaper than generation)")
    length: int = Field(48, ge=1, description="tokens generated per sample")


class SampleSection(Section):
    """Sampler defaults (MLFM.md, Sampler); written to an export's ``generation_config.json``."""

    method: Literal["mlfm", "flow", "mdm", "flowmap"] = Field(
        "mlfm", description="mlfm: SDE trajectories with online token promotion; flow: one trajectory, every "
        "token decoded at its end; mdm: discrete ancestral unmasking with the same network; flowmap: a distilled "
        "model's jumps (`mlfm distill`), steps per promotion round")
    steps: int = Field(256, ge=1, description="SDE steps per promotion round (mlfm, flow); unmasking steps (mdm); "
                       "flow-map jumps per promotion round (flowmap)")
    promotion: bool = Field(True, description="promote confident tokens round by round (mlfm, flowmap); off: the "
                            "first round decodes every token (mlfm then samples as flow; flowmap is a one-shot "
                            "decoder of `steps` jumps)")
    gamma_min: float | Literal["auto"] = Field(
        "auto", description="lowest γ of the sampling grid (its last point, where each trajectory ends); auto: the "
        "middle of the model's decision window (recorded by training or `mlfm diagnose`), else the median of the "
        "training γ law")
    gamma_max: float = Field(6.0, description="highest γ of the sampling grid")
    length: int | None = Field(None, ge=1, description="tokens to generate per prompt (default: up to seq_len)")
    temperature: float = Field(0.1, gt=0.0, description="Gumbel-max sampling temperature")
    top_p: float = Field(1.0, gt=0.0, le=1.0, description="nucleus sampling mass")
    grid: Literal["restricted", "paper"] = Field(
        "restricted", description="γ grid: quantiles of the training law restricted to [gamma_min, gamma_max], or "
        "MLFM.md's clamped quantiles (paper)")
    threshold: float = Field(0.8, description="promote remaining positions whose confidence reaches this")
    min_promote: int = Field(1, ge=1, description="promote at least this many positions per round")
    confidence: Literal["prob", "max_prob", "margin", "neg_entropy"] = Field(
        "prob", description="confidence score of a sampled token (neg_entropy is ≤ 0: use a threshold ≤ 0)")
    confidence_temperature: Literal["tempered", "untempered"] = Field(
        "untempered", description="distribution the confidence is computed under: untempered, the model's own "
        "softmax(logits) without banned ids (no temperature, no nucleus); tempered, the one the token was drawn "
        "from (softmax(logits / temperature) without banned ids, within top_p: the reference's rule, which at "
        "temperature 0.1 scores nearly every favourite above the threshold and promotes almost all at once)")
    confidence_source: Literal["final", "quantile"] = Field(
        "final", description="final: tokens and confidence from one draw from the trajectory's final logits; "
        "quantile: tokens from the final logits, confidence from a draw at SDE step "
        "floor(confidence_quantile · steps) (the logits that step's update used)")
    confidence_quantile: float = Field(
        0.5, gt=0.0, le=1.0, description="with confidence_source=quantile: where along the trajectory the "
        "confidence is drawn (1: the last step)")
    eos_policy: Literal["joint", "eos_last", "rank_separately"] = Field(
        "joint", description="joint: EOS ranks with other tokens; eos_last: the forced min_promote picks prefer "
        "non-EOS candidates; rank_separately: the forced picks are split between EOS and non-EOS candidates in "
        "proportion to their counts (round half to even), each group taking its best")
    stop_at_eos: bool = Field(True, description="a promoted EOS ends its sample: later positions become EOS")
    guidance_scale: float = Field(0.0, description="classifier-free guidance scale s (0: off)")
    guidance_mode: Literal["corrupt", "mask", "drop"] = Field(
        "corrupt", description="unconditional pass: re-corrupt the prompt at the current t, replace it by m, or "
        "drop it (the rest of the row runs alone, its positions from 0)")
    guidance_target: Literal["velocity", "logits"] = Field(
        "velocity", description="guide the velocity (v_c + s(v_c − v_u)) or the log-probabilities "
        "(log p_c + s(log p_c − log p_u)); the logits target also guides the final forward tokens are drawn from")
    seed: int = Field(0, description="seed of the sampler's generator")
    batch_size: int = Field(8, ge=1, description="prompts per batch (mlfm sample, in-training samples)")
    validation: SampleValidationSection = SampleValidationSection()

    @model_validator(mode="after")
    def _gamma_range(self) -> SampleSection:
        if self.gamma_min != "auto" and self.gamma_min >= self.gamma_max:
            raise ValueError(f"gamma_min {self.gamma_min} must be below gamma_max {self.gamma_max}")
        return self


EVAL_TASKS = ("gsm8k", "mtbench", "genppl", "gamma", "validity")


class EvalSection(Section):
    """The evaluation job (``mlfm eval``, ``mlfm launch eval``; MLFM.md, "Evaluation protocol"): tasks over an
    export, data-parallel over ranks, every prompt seeded by (seed, its index)."""

    tasks: list[Literal[EVAL_TASKS]] = Field(
        ["validity"], description="gsm8k (the paper's protocol), mtbench (first-turn answers for FastChat's judge), "
        "genppl (samples scored by a causal LM), gamma (CE against γ), validity (synthetic corpus checker)")
    model: str | None = Field(None, description="an export directory, or a checkpoint directory or tag (exported "
                              "first); default: out_dir/export (the pipeline's export stage)")
    out: str = Field("eval", description="results directory (relative: under out_dir)")
    limit: int | None = Field(None, ge=1, description="the first N problems, questions or samples")
    steps: list[int] = Field([], description="sampler steps to sweep (empty: each task's protocol setting)")
    batch_size: int = Field(8, ge=1, description="prompts per sampler batch on each rank")
    seed: int = Field(0, description="prompt i is sampled from the seed (seed, i)")
    samples: int = Field(64, ge=1, description="genppl, validity: samples drawn (validity: as many prompted)")
    judge: str | None = Field(None, description="genppl: a local Hugging Face causal LM directory (GPT-2-large)")
    data: str | None = Field(None, description="gamma: prepared shards (default: the config's data)")
    blocks: int = Field(64, ge=1, description="gamma: validation blocks")
    model_id: str | None = Field(None, description="mtbench: the answers' model_id (default: the export's name)")

    @field_validator("steps")
    @classmethod
    def _positive(cls, value: list[int]) -> list[int]:
        if any(s < 1 for s in value):
            raise ValueError(f"sampler steps must be positive, got {value}")
        return value

    @model_validator(mode="after")
    def _judge(self) -> EvalSection:  # before any model is loaded or any task sampled
        if "genppl" in self.tasks and not self.judge:
            raise ValueError("the genppl task scores samples with a causal LM: set eval.judge (--judge) to a local "
                             "Hugging Face model directory, e.g. gpt2-large")
        return self


SLURM_TIME = re.compile(r"^(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?$")


def slurm_minutes(text: str) -> int:
    """Minutes (rounded up) of a SLURM time limit: MM, MM:SS, HH:MM:SS, D-HH, D-HH:MM or D-HH:MM:SS."""
    m = SLURM_TIME.match(text.strip())
    if not m:
        raise ValueError(f"{text!r} is not a SLURM time (MM, HH:MM:SS or D-HH:MM:SS)")
    days, a, b, c = (int(g) if g is not None else None for g in m.groups())
    if days is not None:  # D-HH[:MM[:SS]]
        seconds = days * 86400 + a * 3600 + (b or 0) * 60 + (c or 0)
    elif c is not None:  # HH:MM:SS
        seconds = a * 3600 + b * 60 + c
    else:  # MM[:SS]
        seconds = a * 60 + (b or 0)
    if seconds <= 0:
        raise ValueError(f"{text!r}: the time limit must be positive")
    return -(-seconds // 60)


class LaunchSection(Section):
    """SLURM job shape and cluster settings for ``mlfm launch`` (``launchers/``). A cluster profile
    (``configs/clusters/NAME.yaml``, the same keys) gives the defaults; keys set here override it, and the
    command-line flags override both."""

    cluster: str | None = Field(None, description="cluster profile: a name in configs/clusters/ or a YAML path")
    nodes: int = Field(1, ge=1, description="nodes")
    tasks_per_node: int = Field(1, ge=1, description="tasks (processes) per node; on GPU nodes one per GPU")
    gpus_per_node: int = Field(0, ge=0, description="GPUs per node (0: CPU job, gloo)")
    cpus_per_task: int | None = Field(None, ge=1, description="CPU cores per task")
    mem: str | None = Field(None, description="memory per node, sbatch --mem (e.g. 64G; 0 = all)")
    partition: str | None = Field(None, description="partition (the cluster's default when unset)")
    time: str = Field("01:00:00", description="time limit per run, HH:MM:SS or D-HH:MM:SS")
    account: str | None = Field(None, description="account to charge")
    qos: str | None = Field(None, description="quality of service")
    constraint: str | None = Field(None, description="node features, sbatch --constraint")
    max_requeues: int = Field(3, ge=0, description="times a job stopped by USR2 (the time limit, scancel --signal) "
                                                   "requeues itself")
    signal_delay_s: int = Field(120, ge=10, description="seconds before the time limit that SLURM signals "
                                                         "the job to checkpoint and requeue")
    setup: list[str] = Field([], description="shell lines run before the tasks start (module load, exports)")

    @field_validator("time")
    @classmethod
    def _slurm_time(cls, value: str) -> str:
        slurm_minutes(value)
        return value

    @field_validator("partition", "account", "qos", "constraint", "mem", "time")
    @classmethod
    def _sbatch_syntax(cls, value: str | None, info) -> str | None:
        """These go into ``#SBATCH`` lines, where a space, quote, newline or shell character would end the line
        and run the rest as shell: only SLURM's own syntax passes."""
        name = r"[A-Za-z0-9_.-]+"
        allowed = {
            "partition": (rf"{name}(,{name})*", "letters, digits, _ . - (and , between partitions)"),
            "account": (name, "letters, digits, _ . -"),
            "qos": (name, "letters, digits, _ . -"),
            "constraint": (r"[A-Za-z0-9_.\-&|,\[\]*():]+", "letters, digits and _ . - & | , [ ] * ( ) :"),
            "mem": (r"\d+[KMGTkmgt]?", "digits with an optional K, M, G or T suffix (64G, 500M; 0 = all)"),
            "time": (r"[\d:-]+", "digits, : and - (MM, HH:MM:SS or D-HH:MM:SS)"),
        }
        pattern, what = allowed[info.field_name]
        if value is not None and not re.fullmatch(pattern, value):
            raise ValueError(f"launch.{info.field_name} may contain only {what}: it is written into an #SBATCH "
                             "line, which a space, quote, newline or shell character would break")
        return value


class Config(Section):
    name: str = "mlfm"
    out_dir: str = "runs/mlfm"
    seed: int = 0
    stage: Literal["pretrain", "sft"] = "pretrain"  # must match the data: pretraining or prompt/response shards
    data: DataSection = DataSection()
    model: ModelSection = ModelSection()
    objective: ObjectiveSection = ObjectiveSection()
    sft: SFTSection = SFTSection()
    distill: DistillSection = DistillSection()
    parallel: ParallelSection = ParallelSection()
    train: TrainSection = TrainSection()
    checkpoint: CheckpointSection = CheckpointSection()
    log: LogSection = LogSection()
    sample: SampleSection = SampleSection()
    eval: EvalSection = EvalSection()
    launch: LaunchSection = LaunchSection()

    def path(self, relative: str) -> Path:
        """``relative`` resolved under ``out_dir`` (absolute paths are kept)."""
        p = Path(relative)
        return p if p.is_absolute() else Path(self.out_dir) / p

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


# ------------------------------------------------------------------------------------------- loading
def _deep_merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def read_yaml(path: str | Path, _seen: tuple[Path, ...] = ()) -> dict:
    """The YAML mapping at ``path`` with its ``extends`` chain merged in."""
    path = Path(path).resolve()
    if path in _seen:
        raise ConfigError(f"{path}: 'extends' cycle through {[str(p) for p in _seen]}")
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping, got {type(raw).__name__}")
    parent = raw.pop("extends", None)
    if parent is None:
        return raw
    return _deep_merge(read_yaml(path.parent / parent, _seen + (path,)), raw)


def apply_override(tree: dict, override: str) -> dict:
    """``tree`` with one ``a.b.c=value`` override set; the value is parsed as YAML (``3e-4`` stays text
    and is converted by the schema, ``[1, 2]`` is a list, ``null`` is None)."""
    key, sep, text = override.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override {override!r} is not of the form section.key=value")
    parts = key.strip().split(".")
    value = yaml.safe_load(text) if text.strip() else ""
    node = tree
    for i, part in enumerate(parts[:-1]):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {override!r}: {'.'.join(parts[: i + 1])} is not a section")
        node = child
    node[parts[-1]] = value
    return tree


def explain(err: ValidationError) -> str:
    """A ValidationError as one line per problem, each naming its dotted key path."""
    lines = []
    for e in err.errors():
        where = ".".join(str(p) for p in e["loc"]) or "<top level>"
        msg = "unknown key (not in the schema)" if e["type"] == "extra_forbidden" else e["msg"]
        given = "" if e["type"] == "extra_forbidden" else f" (got {e.get('input')!r})"
        lines.append(f"  {where}: {msg}{given}")
    return "invalid config:\n" + "\n".join(lines)


def build_config(tree: dict) -> Config:
    try:
        return Config.model_validate(tree)
    except ValidationError as e:
        raise ConfigError(explain(e)) from None


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """The validated config from ``path`` (or the schema defaults) with ``overrides`` applied in order."""
    tree: dict[str, Any] = read_yaml(path) if path is not None else {}
    for override in overrides:
        tree = apply_override(tree, override)
    return build_config(tree)
