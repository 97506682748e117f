"""A compiled denoiser whose batch dimension is dynamic from its first trace.

Left to itself, dynamo compiles the first call's shapes exactly and, when a later call brings another batch
size, traces again with the dimensions that changed marked dynamic ("automatic dynamic"). A warm-up at batch
1 then 2 therefore traces the denoiser twice per size, even when every kernel is already in the compile cache.
Dynamo's own remedy, its profile of dynamic dimensions (``torch.compiler.config.job_id``), does not carry
across processes for diffusers' denoisers: their ``forward`` is wrapped in a closure
(``diffusers.utils.peft_utils.apply_lora_scale``) and torch 2.13 keys a closure's profile on ``hash()`` of code
objects, which changes with every interpreter's string hash seed.

So :func:`compile_dynamic_batch` compiles a module as ``module.compile()`` does and, before each call reaches
the compiled code, marks dimension 0 of the call's batch-sized tensors as dynamic
(``torch._dynamo.maybe_mark_dynamic``): the first trace is already the graph that the second would have
produced, and later batch sizes run it without recompiling. "Batch-sized" means a tensor argument (or one in a
dict argument, such as ``added_cond_kwargs``) whose first dimension equals that of the first tensor argument
(``sample`` / ``hidden_states``; with classifier-free guidance, twice the images). A dimension of size 1 stays
specialized (dynamo's 0/1 rule; the mark is a hint, never an error), so a denoiser called with batch 1 still
traces batch 2 separately, as before.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Mapping
from typing import Any

__all__ = ["batch_tensors", "compile_dynamic_batch", "mark_batch_dynamic"]

log = logging.getLogger(__name__)


def _tensors(values: Iterator[Any]) -> Iterator[Any]:
    """Tensors among ``values`` and one level into the dicts among them, in order."""
    import torch

    for value in values:
        if isinstance(value, torch.Tensor):
            yield value
        elif isinstance(value, Mapping):
            yield from (v for v in value.values() if isinstance(v, torch.Tensor))


def batch_tensors(args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> list[Any]:
    """The tensors of a call whose first dimension is the batch (the first tensor's first dimension)."""
    tensors = [t for t in _tensors(iter((*args, *kwargs.values()))) if t.dim() >= 1]
    if not tensors:
        return []
    batch = tensors[0].shape[0]
    return [t for t in tensors if t.shape[0] == batch]


def mark_batch_dynamic(args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> int:
    """Mark dimension 0 of the call's batch-sized tensors as dynamic for dynamo; returns how many."""
    from torch._dynamo import maybe_mark_dynamic

    tensors = batch_tensors(args, kwargs)
    for tensor in tensors:
        maybe_mark_dynamic(tensor, 0)
    return len(tensors)


class _BatchDynamicCall:
    """The module's compiled call, preceded by :func:`mark_batch_dynamic` (runs eagerly, before dynamo)."""

    def __init__(self, compiled: Callable[..., Any]) -> None:
        self.compiled = compiled

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        mark_batch_dynamic(args, kwargs)
        return self.compiled(*args, **kwargs)


def compile_dynamic_batch(module: Any, **options: Any) -> bool:
    """Compile ``module`` in place (``module.compile(**options)``) with its batch dimension dynamic from the first
    trace.

    Returns False, after compiling as plain ``module.compile()`` does, where this torch keeps the compiled call
    elsewhere than ``Module._compiled_call_impl`` (then the warm-up's second batch size traces again, as before).
    """
    module.compile(**options)
    compiled = getattr(module, "_compiled_call_impl", None)
    if not callable(compiled):
        log.warning("torch.compile: cannot mark %s's batch dimension dynamic in this torch; each warm-up size "
                    "traces twice", type(module).__name__)
        return False
    module._compiled_call_impl = _BatchDynamicCall(compiled)
    return True
