"""The reference's MLFM checkpoints (github.com/imbirik/mlfm: LoRA and DiT AdaLN adapters on SMDM's LitGPT
``TransEncoder``) → our model's weights, adapters included.

SRC is a ``checkpoint_{step}.pt`` the reference's runner wrote with ``torch.save`` (``save_mlfm_checkpoint`` in
``src/mlfm/runner.py``), or a directory holding exactly one ``*.pt``. Of its payload we read:

    model          the trainable tensors (pretraining: the adapters alone), or with ``save_full_model`` (SFT)
                   the whole state dict, the base under the wrapped names (``….h.{i}.block.attn.attn.base.weight``)
    ema_adapter    an EMA of the trainable tensors; laid over ``model``, as the reference's eval and sampling do
                   (``ReferenceSource(weights="model")`` takes the live weights instead)
    config         the run's options: adaln_mode, time_conditioning, lora_alpha, lora_output_alpha, smdm_size, …

Unless the checkpoint holds the full model, the SMDM base the run started from is read too: its safetensors
(a file, or shards with their index) in the directory of the ``.pt``, or at ``ReferenceSource(base=...)``; base
tensors the run trained (``freeze_backbone: false``) come from the checkpoint. The adapters of block i (DiT):

    model.transformer.h.{i}.time_mlp.{0,2}.{weight,bias}             → layers.{i}.time_mlp.{0,2}.*
    model.transformer.h.{i}.adaln_modulation.1.{weight,bias}         → layers.{i}.modulation.*
    model.transformer.h.{i}.block.attn.attn.lora_{a,b}.weight        → ….self_attention.linear_qkv.lora.{a,b}
    model.transformer.h.{i}.block.attn.proj.lora_{a,b}.weight        → ….self_attention.linear_proj.lora.{a,b}
    model.transformer.h.{i}.block.mlp.swiglu.w{1,2}.lora_{a,b}.weight → ….mlp.linear_fc1.lora.{a,b}[0 | 1]
    model.transformer.h.{i}.block.mlp.swiglu.w3.lora_{a,b}.weight    → ….mlp.linear_fc2.lora.{a,b}
    output_lora.lora_{a,b}.weight                                    → output_layer.lora.{a,b} (B: V of V_pad rows)

Both models compute the same layer (``DiTBlockWrapper``, ``LoRALinear``, ``TiedOutputLoRA`` in the reference's
``src/mlfm/adapters.py``; ours: model/adaln.py, model/lora.py): γ → sinusoidal (cos | sin, max period 10⁴) →
the block's time MLP (Linear, SiLU, Linear) → SiLU → Linear → (shift, scale, gate) for attention then MLP,
x·(1 + scale) + shift and branch·(1 + gate); the fused QKV is per query group [q; k; v] in both, w1 is the gate;
y = W x + (α/r)·B A x. So with the config's ranks and α equal to the reference's, the tensors are copied as they
are. (The reference clamps γ to [gamma_min, gamma_max] before the model; our schedule sets γ's range.)
"""
from __future__ import annotations

import pickle
import re
import zipfile
from functools import reduce
from pathlib import Path

import torch

from mlfm_scale.config import ModelSection
from mlfm_scale.convert import smdm
from mlfm_scale.convert.plan import ConversionPlan, Entry, check, require_known_keys, require_shapes
from mlfm_scale.convert.source import SafetensorsSource
from mlfm_scale.errors import UserError
from mlfm_scale.model import lora

FORMAT = "mlfm-reference"
BLOCK, OUTPUT_LORA = "model.transformer.h.", "output_lora."
# the reference's LoRA-wrapped linears in a block → (our target, its part of our adapter: fc1 = [w1; w2])
LORA_SITES = {"attn.attn": ("qkv", None), "attn.proj": ("proj", None), "mlp.swiglu.w1": ("fc1", 0),
              "mlp.swiglu.w2": ("fc1", 1), "mlp.swiglu.w3": ("fc2", None)}
ADAPTER_KEY = re.compile(r"\.lora_[ab]\.|\.time_mlp\.|\.adaln_modulation\.|^output_lora\.")
# the SMDM checkpoints the reference starts from (its src/mlfm/defaults.py), by smdm_size
SMDM_FILES = {170: "mdm-170M-100e18.safetensors", 1028: "mdm-1028M-3300e18-rsl-0.01-bs-1024.safetensors"}
KEPT = ("model", "ema_adapter", "config", "save_full_model", "step")  # the payload entries a conversion reads


class Tensors:
    """Tensors at hand (memory-mapped from the ``.pt``) behind a source's interface: ``keys()``, ``where(key)``,
    ``shape(key)``, ``get(key)`` (a float32 copy); keys it lacks come from ``under`` (the SMDM base) when given."""

    def __init__(self, path: Path, tensors: dict[str, torch.Tensor], under: SafetensorsSource | None = None):
        self.path = under.path if under else path
        self._own, self._tensors, self._under = path, tensors, under

    def keys(self) -> list[str]:
        return list(dict.fromkeys([*(self._under.keys() if self._under else ()), *self._tensors]))

    def where(self, key: str) -> Path:
        if key in self._tensors:
            return self._own
        if self._under is None:
            raise UserError(f"{key} is not in {self._own}: the checkpoint is incomplete or not of this format")
        return self._under.where(key)

    def shape(self, key: str) -> tuple[int, ...]:
        if key in self._tensors:
            return tuple(self._tensors[key].shape)
        self.where(key)
        return self._under.shape(key)

    def get(self, key: str) -> torch.Tensor:
        if key in self._tensors:
            return self._tensors[key].to(torch.float32, copy=True)
        self.where(key)
        return self._under.get(key)


class ReferenceSource:
    """A reference checkpoint (``path``: its ``.pt``, or a directory holding one): ``adapters`` (the AdaLN and
    LoRA tensors under the reference's names), ``base`` (SMDM's tensors under SMDM's names), the run's
    ``config`` dict, and ``weights``: which tensors were taken (``ema``: ``ema_adapter`` over ``model``, when the
    checkpoint has an EMA; ``model``: the live ones). ``base``: the SMDM safetensors file or directory an
    adapters-only checkpoint needs (default: the ``.pt``'s directory)."""

    def __init__(self, path: str | Path, weights: str = "ema", base: str | Path | None = None):
        check(weights in ("ema", "model"), f"weights={weights!r}: choose 'ema' (the reference's eval weights) or "
                                           "'model' (the live weights)")
        self.path = checkpoint_file(Path(path))
        payload = load_payload(self.path)
        check(isinstance(payload, dict) and isinstance(payload.get("model"), dict) and payload["model"],
              f"{self.path} is not a checkpoint of the reference's MLFM runner (github.com/imbirik/mlfm): its "
              "payload has no `model` state dict; choose the format that wrote it")
        config = payload.get("config")
        check(isinstance(config, dict), f"{self.path} has no `config` dict: the run's adapter settings are unknown")
        self.config: dict = config
        self.step = payload.get("step")
        self.full = bool(payload.get("save_full_model"))
        state = dict(payload["model"])
        ema = payload.get("ema_adapter")
        self.weights = "ema" if weights == "ema" and ema else "model"
        if self.weights == "ema":
            state |= ema
        odd = [k for k, t in state.items() if not isinstance(t, torch.Tensor)]
        check(not odd, f"{self.path}: {', '.join(odd[:4])} in its state dict are not tensors: a damaged checkpoint")
        self.adapters = Tensors(self.path, {k: t for k, t in state.items() if ADAPTER_KEY.search(k)})
        trained = {smdm_name(k): t for k, t in state.items() if not ADAPTER_KEY.search(k)}
        if self.full:
            check(base is None, f"{self.path} holds the full model (save_full_model): it needs no base; drop it")
            self.base_path, under = self.path, None
        else:
            self.base_path = Path(base) if base is not None else self.path.parent
            if not self._has_base():
                raise UserError(self._missing_base())
            under = SafetensorsSource(self.base_path)
        self.base = Tensors(self.path, trained, under)

    def _has_base(self) -> bool:
        p = self.base_path
        return p.is_file() or (p.is_dir() and any(p.glob("*.safetensors")))

    def _missing_base(self) -> str:
        size = self.config.get("smdm_size")
        which = f" (its smdm_size={size}: SMDM's {SMDM_FILES[size]})" if size in SMDM_FILES else ""
        return (f"{self.path} holds only what the run trained, the adapters (save_full_model is false), so the "
                f"SMDM base the run started from is needed too{which}, and {self.base_path} has no *.safetensors: "
                f"put the base's safetensors beside the checkpoint in {self.path.parent}")


def checkpoint_file(path: Path) -> Path:
    """SRC → the ``.pt`` to read: the file itself, or the one ``*.pt`` in a directory."""
    if path.is_file():
        return path
    check(path.is_dir(), f"{path} does not exist: give the reference's checkpoint .pt, or a directory holding it "
                         "(and, for an adapters-only checkpoint, the SMDM base's safetensors)")
    found = sorted(path.glob("*.pt"))
    check(len(found) == 1, f"{path} holds {len(found)} *.pt files ({', '.join(p.name for p in found[:4])}): give "
                           "the checkpoint's .pt itself (the base SMDM safetensors are looked for beside it)")
    return found[0]


def load_payload(path: Path) -> object:
    """The ``torch.save`` payload at ``path``, tensors memory-mapped; unpickled with ``weights_only`` (tensors
    and plain data only), so that a checkpoint cannot run code here."""
    check(zipfile.is_zipfile(path), f"{path} is not a torch.save checkpoint (the zip format torch.save has written "
                                    "since PyTorch 1.6, as the reference's runner does)")
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError:
        unsafe = ", ".join(torch.serialization.get_unsafe_globals_in_checkpoint(path)) or "unknown"
        keep = ", ".join(repr(k) for k in KEPT)
        raise UserError(
            f"{path} holds objects that torch.load(weights_only=True) refuses to unpickle ({unsafe}); the converter "
            "reads only tensors and plain data. If you trust the file, keep only what the conversion reads: "
            f"python -c \"import torch; p = torch.load('{path}', weights_only=False); torch.save({{k: p.get(k) "
            f"for k in ({keep})}}, 'stripped.pt')\"") from None
    except (RuntimeError, OSError, EOFError, zipfile.BadZipFile) as e:
        raise UserError(f"{path} is not a readable torch.save checkpoint ({type(e).__name__}: {e})") from None


def smdm_name(key: str) -> str:
    """A base tensor of the reference's model → SMDM's name (``model.transformer.h.0.block.attn.attn.base.weight``
    → ``transformer.h.0.attn.attn.weight``)."""
    key = key.removeprefix("model.").replace(".block.", ".", 1)
    return re.sub(r"\.base\.weight$", ".weight", key)


def plan(cfg: ModelSection, source: ReferenceSource) -> ConversionPlan:
    """Check a reference checkpoint (and its SMDM base) against ``cfg`` and list the conversion of the base and
    of every adapter."""
    _require_dit(source)
    base = smdm.plan(cfg, source.base)  # the base's config and shapes: num_layers, widths, heads, vocabulary
    adapters, keys = source.adapters, set(source.adapters.keys())
    first = f"{BLOCK}0.time_mlp.0.weight"
    check(first in keys, f"{source.path} has no AdaLN time MLPs ({first}): not a DiT-mode MLFM checkpoint")
    hidden, width = adapters.shape(first)
    sites = [s for s in LORA_SITES if f"{BLOCK}0.block.{s}.lora_a.weight" in keys]
    check(("mlp.swiglu.w1" in sites) == ("mlp.swiglu.w2" in sites),
          f"{source.path} adapts one of SwiGLU's w1 and w2 only: our fc1 adapter covers both (convert a run that "
          "targets both, or neither)")
    rank = adapters.shape(f"{BLOCK}0.block.{sites[0]}.lora_a.weight")[0] if sites else 0
    targets = list(dict.fromkeys(LORA_SITES[s][0] for s in sites))
    out_rank = adapters.shape(f"{OUTPUT_LORA}lora_a.weight")[0] if f"{OUTPUT_LORA}lora_a.weight" in keys else 0

    found = {"time_mlp": ("per_layer", "its blocks have their own time MLPs (DiT adapters)"),
             "time_embed_dim": (width, f"its time MLPs read {width} sinusoidal features ({first} is {hidden}×{width})"),
             "time_hidden_size": (hidden, f"its time MLPs are {hidden} wide")}
    lora_a = f"{BLOCK}0.block.{sites[0] if sites else 'attn.attn'}.lora_a.weight"
    found["lora.rank"] = (rank, f"its LoRA rank is {rank} ({lora_a} has {rank} rows)" if rank else "it has no LoRA")
    if rank:
        found["lora.alpha"] = (_reference_float(source, "lora_alpha"), "its config has lora_alpha="
                               f"{source.config['lora_alpha']}")
        found["lora.targets"] = (targets, f"it adapts {', '.join(sites)} (our {', '.join(targets)})")
    found["lora.output_rank"] = (out_rank, f"its output head's LoRA rank is {out_rank}" if out_rank else
                                 "its output head has no LoRA")
    if out_rank:
        found["lora.output_alpha"] = (_reference_float(source, "lora_output_alpha"), "its config has "
                                      f"lora_output_alpha={source.config['lora_output_alpha']}")
    _require_fields(str(source.path), found, cfg)

    d, layers = cfg.hidden_size, cfg.num_layers
    in_out = lora.target_shapes(cfg)  # (in, out) of each site: a part of fc1 is one of its halves
    site_shapes = {s: (in_out[t][0], in_out[t][1] // (1 if part is None else 2))
                   for s, (t, part) in LORA_SITES.items()}
    shapes: dict[str, tuple[int, ...]] = {}
    for i in range(layers):
        p = f"{BLOCK}{i}."
        shapes |= {p + "time_mlp.0.weight": (hidden, width), p + "time_mlp.0.bias": (hidden,),
                   p + "time_mlp.2.weight": (hidden, hidden), p + "time_mlp.2.bias": (hidden,),
                   p + "adaln_modulation.1.weight": (6 * d, hidden), p + "adaln_modulation.1.bias": (6 * d,)}
        for s in sites:
            fan_in, out = site_shapes[s]
            shapes |= {f"{p}block.{s}.lora_a.weight": (rank, fan_in), f"{p}block.{s}.lora_b.weight": (out, rank)}
    vocab = base.notes["output_rows"]
    if out_rank:
        shapes |= {f"{OUTPUT_LORA}lora_a.weight": (out_rank, d), f"{OUTPUT_LORA}lora_b.weight": (vocab, out_rank)}
    require_known_keys(adapters, set(shapes), "the reference's DiT-mode MLFM")
    require_shapes(adapters, shapes)

    entries = list(base.entries)
    for i in range(layers):
        entries += _layer_adapters(adapters, i, hidden, width, d, rank, sites, site_shapes)
    if out_rank:
        padded = base.entries[-1].shape[0]  # the output layer's V_pad rows
        entries += [Entry("output_layer.lora.a", (out_rank, d), lambda: adapters.get(f"{OUTPUT_LORA}lora_a.weight")),
                    Entry("output_layer.lora.b", (padded, out_rank),
                          lambda: adapters.get(f"{OUTPUT_LORA}lora_b.weight"))]
    reference = {k: source.config.get(k) for k in ("smdm_size", "adaln_mode", "adaln_time_embed_dim",
                                                    "adaln_hidden_dim", "time_conditioning", "lora_rank",
                                                    "lora_alpha", "lora_output_rank", "lora_output_alpha")}
    notes = {"source": str(source.path), "base": str(source.base_path), "full_model": source.full,
             "weights": "ema_adapter over model" if source.weights == "ema" else "model", "step": source.step,
             "preset": base.notes["preset"], "output_rows": vocab, "reference_config": reference}
    return ConversionPlan(vocab_size=base.vocab_size, mask_id=base.mask_id, entries=entries, source_format=FORMAT,
                          notes=notes)


def _layer_adapters(adapters: Tensors, i: int, hidden: int, width: int, d: int, rank: int, sites: list[str],
                    site_shapes: dict[str, tuple[int, int]]) -> list[Entry]:
    """Block ``i``'s time MLP, modulation and LoRA adapters under our names."""
    src, ours = f"{BLOCK}{i}.", f"layers.{i}."

    def get(name: str):
        return lambda: adapters.get(src + name)

    entries = [Entry(ours + "time_mlp.0.weight", (hidden, width), get("time_mlp.0.weight")),
               Entry(ours + "time_mlp.0.bias", (hidden,), get("time_mlp.0.bias")),
               Entry(ours + "time_mlp.2.weight", (hidden, hidden), get("time_mlp.2.weight")),
               Entry(ours + "time_mlp.2.bias", (hidden,), get("time_mlp.2.bias")),
               Entry(ours + "modulation.weight", (6 * d, hidden), get("adaln_modulation.1.weight")),
               Entry(ours + "modulation.bias", (6 * d,), get("adaln_modulation.1.bias"))]
    for target in dict.fromkeys(LORA_SITES[s][0] for s in sites):
        path, parts = lora.TARGETS[target]
        names = [s for s in sites if LORA_SITES[s][0] == target]  # fc1: w1 (the gate), then w2 (up)
        fan_in, out = site_shapes[names[0]]
        lead = (parts,) if parts > 1 else ()

        entries += [Entry(f"{ours}{path}.lora.a", (*lead, rank, fan_in), _stacked(adapters, src, names, "a")),
                    Entry(f"{ours}{path}.lora.b", (*lead, out, rank), _stacked(adapters, src, names, "b"))]
    return entries


def _stacked(adapters: Tensors, src: str, sites: list[str], matrix: str):
    """Reads one LoRA matrix (``a`` or ``b``) of ``sites``: one site's, or (fc1) w1's and w2's stacked [2, …]."""
    keys = [f"{src}block.{s}.lora_{matrix}.weight" for s in sites]
    return lambda: adapters.get(keys[0]) if len(keys) == 1 else torch.stack([adapters.get(k) for k in keys])


def _require_dit(source: ReferenceSource) -> None:
    """Refuse runs whose conditioning our layers do not compute."""
    config = source.config
    check(config.get("adaln", True), f"{source.path} was trained without AdaLN (adaln: false): nothing conditions "
                                     "it on γ; convert its SMDM base with format smdm instead")
    mode = config.get("adaln_mode")
    check(mode == "dit", f"{source.path} was trained with adaln_mode={mode!r}: its AdaLN modulates each norm "
                         "(ln_f too) with shift and scale and no gate, which our layers do not compute; only "
                         "adaln_mode=dit checkpoints (the reference's released runs) convert")
    # the reference's train step falls back to t when the option is missing
    conditioning = config.get("time_conditioning", "t")
    check(conditioning == "gamma", f"{source.path} conditions its time MLPs on time_conditioning={conditioning!r}; "
                                   "our model feeds them the raw γ (log-NSR), as the reference's time_conditioning="
                                   "gamma runs do: only those convert")


def _reference_float(source: ReferenceSource, key: str) -> float:
    """A number from the run's config (an α), which the tensors do not show."""
    value = source.config.get(key)
    check(isinstance(value, (int, float)) and not isinstance(value, bool),
          f"{source.path}'s config has {key}={value!r}, not a number: the LoRA scale α/r is unknown")
    return float(value)


def _require_fields(source: str, found: dict[str, tuple], cfg: ModelSection) -> None:
    """One UserError listing every ``model.<field>`` (dotted: ``lora.rank``) that differs from the checkpoint,
    with the overrides that fix them all (``plan.require_config`` for nested fields; lists compare as sets)."""
    ours = cfg.model_dump()

    def value(field: str):
        return reduce(lambda section, key: section[key], field.split("."), ours)

    def same(a, b) -> bool:
        return set(a) == set(b) if isinstance(a, list) else a == b

    def show(v) -> str:
        return f"[{','.join(v)}]" if isinstance(v, list) else str(v)

    wrong = {f: (v, where) for f, (v, where) in found.items() if not same(value(f), v)}
    if wrong:
        lines = "\n".join(f"  {where}, but model.{f}={show(value(f))}" for f, (_, where) in wrong.items())
        fix = " ".join(f"model.{f}={show(v)}" for f, (v, _) in wrong.items())
        raise UserError(f"{source} does not fit the model config:\n{lines}\nset {fix}")
