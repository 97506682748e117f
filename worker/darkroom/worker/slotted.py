"""LoRA adapters inside the graph: fixed stacked buffers and a per-sample weight table.

peft's LoRA layers keep one module per adapter and choose the active ones in Python (``active_adapters``,
``scaling[name]``), which a compiled graph sees as guards: every switch, blend or weight change
recompiles, and per-sample routing needs hooks that ``torch.compile`` never sees. Here (worker setting
``DARKROOM_ADAPTER_LAYERS=slots``, the choice whenever ``DARKROOM_COMPILE`` is on) every layer an adapter
targets is wrapped once by a ``SlottedLinear`` / ``SlottedConv2d`` (:mod:`.slot_layers`) holding

* ``a``: every slot's down-projection stacked, ``slots * rank`` rows (ranks padded with zeros to
  ``DARKROOM_LORA_MAX_RANK``), and ``b``: the up-projections side by side, each already multiplied by its
  adapter's own scale (``alpha / r``);
* a reference to the pipeline's :class:`SlotBank` table: one row per sample, ``slots * rank`` columns,
  each slot's block filled with the sample's weight for that adapter (0 where the sample does not use it).

``delta = ((x a^T) * table[row]) b^T``: sample ``i`` gets ``sum_j w_ij s_j B_j A_j x``, so one call serves
the base model, one adapter, a blend with any weights, and a batch whose samples each have their own
set, in the same three tensor operations. Loading, hot-swapping, blending and mixing adapters write
buffer contents and table rows in place; module structure and Python state stay the same, so a compiled
denoiser does not recompile (a layer wrapped for the first time is the one structural change; the worker
counts recompiles). The cost: the extra products are ``slots * rank`` wide on every wrapped layer, whatever
the batch uses; size ``DARKROOM_MAX_ADAPTERS`` and ``DARKROOM_LORA_MAX_RANK`` to the fleet's adapters.

Weights are read with diffusers' own LoRA loader (``lora_state_dict``: the diffusers, peft and kohya
formats it converts) and scaled as peft would scale them (rank and alpha per module, rsLoRA). DoRA,
LoRA biases and layers other than ``Linear``/``Conv2d`` are refused with ``adapter_invalid`` (they need
``DARKROOM_ADAPTER_LAYERS=peft``).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from darkroom.common.errors import ErrorCode, JobError

from .adapters import BASE, LORA_COMPONENTS, Activation, AdapterFile, AdapterSet, SlotState, set_key

__all__ = ["LoraWeights", "SlotAdapters", "SlotBank", "read_lora", "slot_bank"]

log = logging.getLogger(__name__)

#: The layers most LoRAs target (diffusers' and kohya's trainers: attention projections), wrapped as a model
#: loads so that a compiled denoiser is compiled with them; a LoRA on other layers wraps those when it first
#: loads (one recompile, counted).
USUAL_TARGETS = {"unet": ("to_q", "to_k", "to_v", "to_out.0"), "transformer": ("to_q", "to_k", "to_v", "to_out.0"),
                 "text_encoder": ("q_proj", "k_proj", "v_proj", "out_proj"),
                 "text_encoder_2": ("q_proj", "k_proj", "v_proj", "out_proj")}

#: Rows of the per-sample table: samples x classifier-free-guidance copies x images per prompt, at most.
TABLE_ROWS = 256


@dataclass(frozen=True)
class LoraWeights:
    """One layer's LoRA of one adapter: ``a`` (rank x in[, k, k]), ``b`` (out x rank[, 1, 1]) with its scale in it."""

    a: Any
    b: Any


def read_lora(pipeline: Any, file: AdapterFile) -> dict[str, LoraWeights]:
    """Every layer's LoRA in ``file`` keyed ``component.module.path`` of ``pipeline``, scaled as peft scales it.

    Raises JobError(adapter_invalid): unreadable, DoRA, LoRA biases, or a key that names no layer here.
    """
    state, alphas, metadata = _state_dict(pipeline, file)
    if any("lora_magnitude_vector" in k or "dora_scale" in k for k in state):
        raise _invalid(file, "DoRA adapters cannot be held in slots; run this model's worker with "
                             "DARKROOM_ADAPTER_LAYERS=peft")
    weights: dict[str, LoraWeights] = {}
    for component in LORA_COMPONENTS:
        module = getattr(pipeline, component, None)
        part = {k[len(component) + 1:]: v for k, v in state.items() if k.startswith(f"{component}.")}
        if module is None or not part:
            continue
        peft_state = _as_peft(part)
        if any(k.endswith(".bias") and ".lora_B" in k for k in peft_state):
            raise _invalid(file, "LoRA biases cannot be held in slots; use DARKROOM_ADAPTER_LAYERS=peft")
        config = _config(component, peft_state, alphas, metadata)
        names = {name for name, _ in module.named_modules()}
        for key in sorted(k for k in peft_state if ".lora_A." in k):
            path = key.split(".lora_A.")[0]
            a, b = peft_state[key], peft_state.get(f"{path}.lora_B.weight")
            if b is None:
                raise _invalid(file, f"{component}.{path} has lora_A without lora_B")
            rank = int(b.shape[1])
            weights[f"{component}.{_resolve(names, path, file)}"] = LoraWeights(a, b * _scale(config, path, rank))
    if not weights:
        raise _invalid(file, "no LoRA layer of this model's denoiser or text encoders")
    return weights


class SlotBank:
    """The slot buffers of one pipeline's layers and its per-sample weight table.

    ``width = slots * rank``; slot ``j`` owns columns ``[j * rank, (j + 1) * rank)`` of every layer's
    ``a``/``b`` and of the table.
    """

    def __init__(self, pipeline: Any, slots: int, rank: int) -> None:
        import torch

        if slots < 1 or rank < 1:
            raise ValueError("slots and rank must be >= 1")
        self.pipeline, self.slots, self.rank = pipeline, slots, rank
        self.width = slots * rank
        denoiser = next(c for c in (getattr(pipeline, n, None) for n in LORA_COMPONENTS) if c is not None)
        weight = next(denoiser.parameters())
        self.table = torch.zeros(TABLE_ROWS, self.width, device=weight.device, dtype=weight.dtype)
        self.layers: dict[str, Any] = {}  # component.module.path -> its slotted wrapper
        self._owned: dict[int, set[str]] = {}  # slot -> the layers its adapter writes
        self.routes: dict[str, dict[int, float]] = {}  # route name (a set's key, or BASE) -> weight per slot
        self.wrapped_after_start = 0  # structural changes (each one recompiles a compiled denoiser once)

    def prewrap(self) -> int:
        """Wrap every layer of :data:`USUAL_TARGETS` now (before a compile); returns how many."""
        from torch import nn

        before = len(self.layers)
        for component, suffixes in USUAL_TARGETS.items():
            module = getattr(self.pipeline, component, None)
            for name, layer in (module.named_modules() if module is not None else ()):
                if isinstance(layer, nn.Linear) and name.endswith(tuple(f".{s}" for s in suffixes)):
                    self._layer(f"{component}.{name}")
        self.wrapped_after_start = 0
        return len(self.layers) - before

    def write(self, slot: int, weights: dict[str, LoraWeights]) -> None:
        """Put an adapter's weights into ``slot`` (what the slot held before is cleared)."""
        import torch

        for key, lora in weights.items():
            if int(lora.a.shape[0]) > self.rank:
                raise ValueError(f"{key}: rank {lora.a.shape[0]} is above DARKROOM_LORA_MAX_RANK={self.rank}")
        self.clear(slot)
        start = slot * self.rank
        with torch.no_grad():
            for key, lora in weights.items():
                layer = self._layer(key)
                rank = int(lora.a.shape[0])
                if tuple(lora.a.shape[1:]) != tuple(layer.a.shape[1:]) or int(lora.b.shape[0]) != layer.b.shape[0]:
                    raise ValueError(f"{key}: LoRA shapes {tuple(lora.a.shape)}/{tuple(lora.b.shape)} do not fit "
                                     "this model's layer")
                layer.a[start:start + rank].copy_(lora.a)
                layer.b[:, start:start + rank].copy_(lora.b.reshape(layer.b[:, start:start + rank].shape))
        self._owned[slot] = set(weights)

    def clear(self, slot: int) -> None:
        import torch

        start = slot * self.rank
        with torch.no_grad():
            for key in self._owned.pop(slot, ()):
                layer = self.layers[key]
                layer.a[start:start + self.rank].zero_()
                layer.b[:, start:start + self.rank].zero_()

    def route(self, samples: Sequence[dict[int, float]]) -> None:
        """Fill the table: row ``r`` gets sample ``r mod len(samples)``'s weight per slot.

        A denoiser called with ``k * n`` rows for ``n`` samples (classifier-free guidance puts negatives
        and positives of the same samples one after the other) reads each sample ``k`` times.
        """
        import torch

        rows = torch.zeros(len(samples), self.width)
        for i, weights in enumerate(samples):
            for slot, weight in weights.items():
                rows[i, slot * self.rank:(slot + 1) * self.rank] = weight
        repeats = -(-TABLE_ROWS // len(samples))
        self.table.copy_(rows.repeat(repeats, 1)[:TABLE_ROWS], non_blocking=True)

    def _layer(self, key: str) -> Any:
        layer = self.layers.get(key)
        if layer is not None:
            return layer
        from torch import nn

        from .slot_layers import SlottedConv2d, SlottedLinear

        component, _, path = key.partition(".")
        root = getattr(self.pipeline, component)
        parent_path, _, name = path.rpartition(".")
        parent = root.get_submodule(parent_path) if parent_path else root
        base = getattr(parent, name)
        if isinstance(base, (SlottedLinear, SlottedConv2d)):
            layer = base
        elif isinstance(base, nn.Linear):
            layer = SlottedLinear(base, self)
        elif isinstance(base, nn.Conv2d) and base.groups == 1:
            layer = SlottedConv2d(base, self)
        else:
            raise ValueError(f"{key} is a {type(base).__name__}; slots hold LoRAs of Linear and Conv2d layers only")
        if layer is not base:
            setattr(parent, name, layer)
            self.wrapped_after_start += 1
        self.layers[key] = layer
        return layer


def slot_bank(pipeline: Any) -> SlotBank | None:
    """The pipeline's slot bank, if its adapters are held in slots."""
    bank = getattr(pipeline, "_darkroom_slot_bank", None)
    return bank if isinstance(bank, SlotBank) else None


@dataclass
class _Slot:
    index: int
    file: AdapterFile
    state: SlotState = SlotState.IDLE
    uses: int = 0
    last_used: float = field(default_factory=time.monotonic)


class SlotAdapters:
    """The adapter slots of one pipeline held in a :class:`SlotBank` (same interface as ``AdapterManager``).

    Every file takes one slot; a blend or a weight is only a table row, so nothing is ever combined or
    re-loaded for it. Not thread-safe: called only from the pipeline's thread.
    """

    fused = False  # nothing is ever merged into the base weights

    def __init__(self, pipeline: Any, *, max_slots: int = 8, rank: int = 16) -> None:
        self.pipeline = pipeline
        self.max_slots = max_slots
        self.bank = SlotBank(pipeline, max_slots, rank)
        pipeline._darkroom_slot_bank = self.bank
        self._slots: dict[str, _Slot] = {}  # by content sha256
        self.loads = self.hotswaps = self.switches = self.combines = 0

    @property
    def resident(self) -> list[str]:
        return list(self._slots)

    def fits(self, sets: Sequence[AdapterSet]) -> bool:
        """Whether the sets can be resident at once: their distinct files fit in the slots."""
        return len({f.sha256 for s in sets for f, _ in s}) <= self.max_slots

    def activate(self, wanted: Sequence[tuple[AdapterFile, float]]) -> Activation:
        """Make ``wanted`` (file, weight) the adapters of every sample of the next calls; nothing = the base model."""
        started = time.perf_counter()
        before = self.loads, self.hotswaps
        row = self._resident(list(wanted), {f.sha256 for f, _ in wanted})
        self.bank.route([row])
        self.switches += 1
        return Activation(adapters=[{"sha256": f.sha256, "weight": w, "file": f.path.name} for f, w in wanted],
                          loaded=self.loads - before[0], hotswapped=self.hotswaps - before[1],
                          seconds=time.perf_counter() - started)

    def activate_mixed(self, sets: Sequence[AdapterSet]) -> Activation:
        """Make every set's files resident; ``routes[i]`` names ``sets[i]`` for :func:`.mixing.routed`."""
        started = time.perf_counter()
        before = self.loads, self.hotswaps
        if not self.fits(sets):
            raise ValueError(f"the adapter sets need more than {self.max_slots} adapter slots")
        keep = {f.sha256 for s in sets for f, _ in s}
        routes = []
        self.bank.routes.clear()
        for adapters in sets:
            name = set_key(adapters) or BASE
            self.bank.routes[name] = self._resident(list(adapters), keep)
            routes.append(name)
        self.switches += 1
        return Activation(adapters=[], loaded=self.loads - before[0], hotswapped=self.hotswaps - before[1],
                          seconds=time.perf_counter() - started, routes=routes)

    def _resident(self, wanted: list[tuple[AdapterFile, float]], keep: set[str]) -> dict[int, float]:
        for slot in self._slots.values():
            slot.state = SlotState.IDLE
        row: dict[int, float] = {}
        for file, weight in wanted:
            slot = self._ensure(file, keep)
            slot.state, slot.uses, slot.last_used = SlotState.ACTIVE, slot.uses + 1, time.monotonic()
            row[slot.index] = row.get(slot.index, 0.0) + float(weight)
        return row

    def _ensure(self, file: AdapterFile, keep: set[str]) -> _Slot:
        slot = self._slots.get(file.sha256)
        if slot is not None:
            return slot
        if file.dora:
            raise _invalid(file, "DoRA adapters cannot be held in slots; run this model's worker with "
                                 "DARKROOM_ADAPTER_LAYERS=peft")
        weights = read_lora(self.pipeline, file)
        taken = {s.index for s in self._slots.values()}
        free = [i for i in range(self.max_slots) if i not in taken]
        swapped = not free
        if swapped:
            key, victim = min(((k, s) for k, s in self._slots.items() if k not in keep),
                              key=lambda e: e[1].last_used)
            del self._slots[key]
            free = [victim.index]
            log.info("adapter %s left slot %d", victim.file.path.name, victim.index)
        try:
            self.bank.write(free[0], weights)
        except ValueError as exc:
            self.bank.clear(free[0])
            raise _invalid(file, str(exc)) from None
        if swapped:
            self.hotswaps += 1
        else:
            self.loads += 1
        slot = self._slots[file.sha256] = _Slot(free[0], file)
        return slot


# -- reading LoRA files the way diffusers does ------------------------------------------------------------------


def _state_dict(pipeline: Any, file: AdapterFile) -> tuple[dict[str, Any], dict[str, float] | None, dict[str, Any]]:
    """diffusers' own reading of a LoRA file for this pipeline's family: state dict, network alphas, metadata."""
    loader = type(pipeline)
    try:
        try:
            out = loader.lora_state_dict(str(file.path), return_lora_metadata=True)
        except TypeError:
            out = loader.lora_state_dict(str(file.path))
    except (ValueError, KeyError, RuntimeError, OSError) as exc:
        raise _invalid(file, str(exc)) from None
    parts = out if isinstance(out, tuple) else (out,)
    state = parts[0]
    alphas = next((p for p in parts[1:] if isinstance(p, dict) and p and all(
        isinstance(v, (int, float)) for v in p.values())), None)
    metadata = parts[-1] if len(parts) > 2 and isinstance(parts[-1], dict) else {}
    return dict(state), alphas, dict(metadata or {})


def _as_peft(state: dict[str, Any]) -> dict[str, Any]:
    """Keys in peft's format (``<module>.lora_A.weight``), whatever diffusers format the file used."""
    from diffusers.utils import convert_state_dict_to_peft, convert_unet_state_dict_to_peft

    if any(".lora_A." in k for k in state):
        return state
    converted = convert_unet_state_dict_to_peft(state)
    if any(".lora_A." in k for k in converted):
        return dict(converted)
    return dict(convert_state_dict_to_peft(state))


@dataclass(frozen=True)
class _Config:
    lora_alpha: float | None
    alpha_pattern: dict[str, float]
    use_rslora: bool


def _config(component: str, peft_state: dict[str, Any], alphas: dict[str, float] | None,
            metadata: dict[str, Any]) -> _Config:
    """The alphas peft would configure for ``component`` (from the file's metadata or network alphas)."""
    from diffusers.utils.peft_utils import get_peft_kwargs

    own = {k[len(component) + 1:]: v for k, v in metadata.items() if k.startswith(f"{component}.")}
    if own:
        return _Config(own.get("lora_alpha"), dict(own.get("alpha_pattern") or {}), bool(own.get("use_rslora")))
    ranks = {f"^{k}": v.shape[1] for k, v in peft_state.items() if ".lora_B." in k and v.ndim > 1}
    mine = {k[len(component) + 1:]: v for k, v in (alphas or {}).items() if k.startswith(f"{component}.")}
    kwargs = get_peft_kwargs(ranks, network_alpha_dict=mine or None, peft_state_dict=peft_state,
                             is_unet=component in ("unet", "transformer"))
    return _Config(kwargs["lora_alpha"], dict(kwargs["alpha_pattern"]), False)


def _scale(config: _Config, path: str, rank: int) -> float:
    """peft's ``scaling`` of module ``path``: alpha / r (alpha / sqrt(r) with rsLoRA)."""
    from peft.utils.other import get_pattern_key

    alpha = config.lora_alpha if config.lora_alpha is not None else rank
    if config.alpha_pattern:
        key = get_pattern_key(list(config.alpha_pattern), path)
        alpha = config.alpha_pattern.get(key, alpha)
    return float(alpha) / (math.sqrt(rank) if config.use_rslora else rank)


def _resolve(names: set[str], path: str, file: AdapterFile) -> str:
    """The module a LoRA key names: the path itself, or the one module whose name ends with it (peft's rule)."""
    if path in names:
        return path
    matches = [n for n in names if n.endswith(f".{path}")]
    if len(matches) != 1:
        raise _invalid(file, f"{path} names {'no' if not matches else 'more than one'} layer of this model")
    return matches[0]


def _invalid(file: AdapterFile, why: str) -> JobError:
    return JobError(ErrorCode.ADAPTER_INVALID, f"cannot load LoRA {file.path.name}: {why}")
