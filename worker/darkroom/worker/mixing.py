"""Mixed-adapter batching: one pipeline call for jobs that differ only in their LoRA adapters.

With ``DARKROOM_MIXED_ADAPTERS`` on (the default), a job's batch key leaves its adapters out, so jobs
with different adapter sets (or none) wait for the same call. :meth:`MixedAdapters.plan` then splits
each group into calls:

- one adapter set in the group: an ordinary call with that set active (``identical``, or ``single``
  for one job);
- several: one ``mixed`` call. Every set is made resident as one adapter at scale 1.0 (a blend or a
  weight other than 1.0 becomes a combined adapter, see :mod:`.adapters`), and :func:`routed` hooks
  every LoRA layer of the UNet and text encoder so that each sample gets its own adapter's product
  (stacked ranks masked per sample; peft's ``adapter_names`` for layers other than ``Linear``). At most
  ``DARKROOM_MAX_ADAPTERS`` sets fit in one call; more make several mixed calls.

With adapters held in slots (:mod:`.slotted`) there are no hooks: :func:`routed` fills the pipeline's
per-sample weight table, and any family, compiled or not, mixes; slots count files, not sets.

Otherwise, where routing cannot apply the group runs as one call per adapter set (``identical``) and each job's
record says why (``adapter_routing_reason``): mixing is off, the UNet is compiled (hooks added after
torch.compile are not seen), adapters are fused into the weights or use DoRA (peft refuses
``adapter_names`` for both), or a combined adapter cannot be built. A model-wide reason is
remembered, so its later jobs are keyed by adapter set again and batch as before.

Classifier-free guidance runs the UNet on ``negatives + positives`` of the same samples, so a layer
that sees ``k * n`` rows for ``n`` samples gets the names repeated ``k`` times; diffusers encodes the
``n`` prompts and the ``n`` negative prompts in two text-encoder calls of ``n`` rows each.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from darkroom.common.families import Family

from .adapters import AdapterManager, AdapterSet, lora_layers
from .families import family_of_pipeline
from .slotted import SlotAdapters, slot_bank

__all__ = ["CallPlan", "MixedAdapters", "Routing", "describe", "routed", "split"]

log = logging.getLogger(__name__)


class Routing(StrEnum):
    """How a call gave its jobs their adapters (``adapter_routing`` in the job's record)."""

    SINGLE = "single"  # the call ran one job
    IDENTICAL = "identical"  # several jobs, one adapter set active for all of them
    MIXED = "mixed"  # several adapter sets, routed per sample


@dataclass(frozen=True)
class CallPlan:
    """One pipeline call of a group: which requests (positions in the group), routed how, and why not mixed."""

    indices: tuple[int, ...]
    routing: Routing
    sets: tuple[AdapterSet, ...]  # each request's adapters, aligned with ``indices``
    reason: str | None = None

    @property
    def distinct(self) -> list[AdapterSet]:
        return list(dict.fromkeys(self.sets))


class MixedAdapters:
    """Whether a model's jobs may share calls across adapter sets, and how a group becomes calls.

    :meth:`allows` is read by task threads (for batch keys); everything else runs on the engine thread.
    """

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled
        self._refused: dict[str, str] = {}  # model id -> why its adapters cannot be mixed

    def allows(self, model: str) -> bool:
        """Whether ``model``'s jobs are batched across adapter sets (the adapters leave the batch key)."""
        return self.enabled and model not in self._refused

    def plan(self, model: str, pipeline: Any, adapters: AdapterManager | SlotAdapters,
             sets: dict[int, AdapterSet]) -> list[CallPlan]:
        """The calls for a group's jobs (by position; jobs that already failed are left out)."""
        if not sets:
            return []
        order = list(dict.fromkeys(sets.values()))
        if len(order) == 1:
            return [_call(list(sets), sets)]
        reason = self._model_reason(model, pipeline, adapters)
        if reason is not None:
            return split(_call(list(sets), sets), reason)
        dora = [s for s in order if any(f.dora for f, _ in s)]
        mixable = [s for s in order if s not in dora]
        calls = [_call([i for i, s in sets.items() if s in chunk], sets)
                 for chunk in _chunks(mixable, adapters)]
        if dora:
            files = sorted({f.path.name for s in dora for f, _ in s if f.dora})
            why = f"{', '.join(files)}: DoRA adapters cannot be routed per sample (peft refuses adapter_names)"
            calls += split(_call([i for i, s in sets.items() if s in dora], sets), why)
        return calls

    def _model_reason(self, model: str, pipeline: Any, adapters: AdapterManager | SlotAdapters) -> str | None:
        if not self.enabled:
            return "mixed-adapter batching is off (DARKROOM_MIXED_ADAPTERS=false)"
        if slot_bank(pipeline) is not None:
            return None  # slots route any family, compiled or not, by a table of per-sample weights
        reason = self._refused.get(model)
        family = family_of_pipeline(pipeline)
        if reason is None and family is not Family.SD:
            reason = (f"per-sample adapter routing is built for SD 1.x/2.x UNets; {family.value} models run one "
                      "call per adapter set")
        if reason is None and _compiled(getattr(pipeline, "unet", None)):
            reason = "the UNet is compiled (torch.compile does not see routing hooks added after compiling)"
        if reason is None and adapters.fused:
            reason = "LoRA weights are fused into the model (peft refuses per-sample adapters then)"
        if reason is not None and model not in self._refused:
            log.warning("model %s: jobs with different adapters run as separate calls: %s", model, reason)
            self._refused[model] = reason
        return reason


def split(call: CallPlan, reason: str) -> list[CallPlan]:
    """The fallback: one call per adapter set, each job's record saying ``reason``."""
    groups: dict[AdapterSet, list[int]] = {}
    for index, adapters in zip(call.indices, call.sets, strict=True):
        groups.setdefault(adapters, []).append(index)
    lookup = dict(zip(call.indices, call.sets, strict=True))
    return [_with_reason(_call(indices, lookup), reason) for indices in groups.values()]


def describe(adapters: AdapterSet) -> list[dict[str, Any]]:
    """A set as the record's ``adapters_resolved`` lists it."""
    return [{"sha256": f.sha256, "weight": w, "file": f.path.name} for f, w in adapters]


@contextmanager
def routed(pipeline: Any, names: Sequence[str] | None) -> Iterator[None]:
    """Route sample ``i`` of the calls in the block to adapter ``names[i]`` in every LoRA layer of the UNet and
    text encoder (:data:`~.adapters.BASE`: none). ``names=None``: nothing is routed.

    A layer called with ``k * len(names)`` rows (classifier-free guidance doubles the UNet batch) routes
    the names ``k`` times; any other row count is an error, never a silently unrouted call. Plain LoRA
    ``Linear`` layers run one stacked LoRA product for the whole batch (:class:`_Stacked`); other layers
    (convolutions, embeddings) get peft's own per-sample ``adapter_names``. Everything is undone when
    the block ends.
    """
    if names is None:
        yield
        return
    bank = slot_bank(pipeline)
    if bank is not None:  # adapters in slots: the per-sample weights are one table, read by every layer
        bank.route([bank.routes[n] for n in names])
        yield
        return
    per_sample = list(names)
    handles: list[Any] = []
    silenced: list[tuple[Any, bool]] = []
    try:
        for _, layer in lora_layers(pipeline):
            stacked = _Stacked.build(layer, per_sample)
            if stacked is None:
                handles.append(layer.register_forward_pre_hook(_PeftNames(per_sample), with_kwargs=True))
                continue
            silenced.append((layer, layer._disable_adapters))
            layer._disable_adapters = True  # peft runs the base layer only; the hook adds the routed LoRAs
            if stacked.rank:
                handles.append(layer.register_forward_hook(stacked, with_kwargs=True))
        yield
    finally:
        for handle in handles:
            handle.remove()
        for layer, previous in silenced:
            layer._disable_adapters = previous


def _rows(x: Any, samples: int) -> int:
    rows = int(x.shape[0])
    if rows % samples:
        raise RuntimeError(f"mixed-adapter routing: a LoRA layer got {rows} rows for {samples} samples")
    return rows


class _PeftNames:
    """Forward pre-hook: peft's per-sample ``adapter_names`` (its ``_mixed_batch_forward``)."""

    def __init__(self, names: list[str]) -> None:
        self.names = names

    def __call__(self, module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]
                 ) -> tuple[tuple[Any, ...], dict[str, Any]]:
        x = args[0] if args else kwargs.get("x", kwargs.get("input"))
        return args, {**kwargs, "adapter_names": self.names * (_rows(x, len(self.names)) // len(self.names))}


class _Stacked:
    """Forward hook of one LoRA ``Linear``: every routed adapter's ranks stacked, masked per sample.

    ``delta = ((x A^T) * mask) (s B)^T`` with ``A = [A_1; ...; A_k]``, ``B = [B_1, ..., B_k]``, ``s`` each
    adapter's scaling and ``mask[i]`` selecting sample ``i``'s rank block: sample ``i`` gets exactly
    ``s_j B_j A_j x`` of its adapter ``j`` (or nothing), in three tensor ops whatever the number of adapters,
    where peft's per-sample path runs a gather, two matmuls and a scatter per adapter.
    """

    def __init__(self, a: Any, b: Any, mask: Any) -> None:
        self.a, self.b, self.mask = a, b, mask
        self.rank = int(a.shape[0])
        self._masks: dict[int, Any] = {}

    @classmethod
    def build(cls, layer: Any, names: list[str]) -> _Stacked | None:
        """The hook for ``layer``, or None where peft's own path must route it (not a plain LoRA Linear)."""
        import torch
        from peft.tuners.lora.layer import Linear

        present = [n for n in dict.fromkeys(names) if n in layer.lora_A]
        if not isinstance(layer, Linear) or layer.fan_in_fan_out or any(
                n in layer.lora_variant or layer.lora_B[n].bias is not None for n in present):
            return None
        lora: Any = layer
        if not present:
            empty = torch.zeros((0, 0))
            return cls(empty, empty, empty)
        with torch.no_grad():
            a = torch.cat([lora.lora_A[n].weight for n in present])
            b = torch.cat([lora.lora_B[n].weight * lora.scaling[n] for n in present], dim=1)
            mask = torch.zeros((len(names), a.shape[0]), dtype=a.dtype, device=a.device)
            start = 0
            blocks = {}
            for n in present:
                blocks[n] = (start, start + lora.r[n])
                start += lora.r[n]
            for row, n in enumerate(names):
                if n in blocks:
                    mask[row, blocks[n][0]:blocks[n][1]] = 1
        return cls(a, b, mask)

    def __call__(self, module: Any, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> Any:
        import torch.nn.functional as F  # noqa: N812

        x: Any = args[0] if args else kwargs.get("x", kwargs.get("input"))
        rows = _rows(x, self.mask.shape[0])
        mask = self._masks.get(rows)
        if mask is None:
            mask = self._masks[rows] = self.mask.repeat(rows // self.mask.shape[0], 1)
        hidden = F.linear(x.to(self.a.dtype), self.a)
        hidden = hidden * mask.view(rows, *([1] * (hidden.dim() - 2)), self.rank)
        return output + F.linear(hidden, self.b).to(output.dtype)


def _call(indices: Sequence[int], sets: dict[int, AdapterSet]) -> CallPlan:
    chosen = tuple(sets[i] for i in indices)
    distinct = len(set(chosen))
    routing = Routing.SINGLE if len(chosen) == 1 else Routing.IDENTICAL if distinct == 1 else Routing.MIXED
    return CallPlan(tuple(indices), routing, chosen)


def _with_reason(call: CallPlan, reason: str) -> CallPlan:
    return CallPlan(call.indices, call.routing, call.sets, reason)


def _chunks(order: list[AdapterSet], adapters: AdapterManager | SlotAdapters) -> list[list[AdapterSet]]:
    """Consecutive runs of sets that can be resident at once (``adapters.fits``)."""
    chunks: list[list[AdapterSet]] = []
    current: list[AdapterSet] = []
    for adapter_set in order:
        if current and not adapters.fits([*current, adapter_set]):
            chunks.append(current)
            current = []
        current.append(adapter_set)
    return [*chunks, current] if current else chunks


def _compiled(module: Any) -> bool:
    """A module compiled in place (``module.compile()``) or wrapped by ``torch.compile``."""
    return module is not None and (getattr(module, "_compiled_call_impl", None) is not None
                                   or type(module).__name__ == "OptimizedModule")
