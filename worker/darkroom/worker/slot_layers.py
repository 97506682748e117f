"""The torch modules of :mod:`.slotted`: a ``Linear`` or ``Conv2d`` with every slot's LoRA stacked beside it.

Imported only by workers whose adapters are held in slots (the rest of the worker imports torch lazily).
"""

from __future__ import annotations

from typing import Any, Protocol

import torch
from torch import nn

__all__ = ["SlottedConv2d", "SlottedLinear"]


class Table(Protocol):
    """Where a layer reads its per-sample weights: ``table[row, slot * rank + k]`` (see :class:`.slotted.SlotBank`)."""

    table: torch.Tensor
    width: int


class SlottedLinear(nn.Module):
    """``base(x) + ((x a^T) * table[:rows]) b^T``, ``rows`` being the batch dimension of ``x``."""

    a: torch.Tensor
    b: torch.Tensor

    def __init__(self, base: nn.Linear, bank: Table) -> None:
        super().__init__()
        self.base = base
        self.bank = bank  # not a module: one table shared by every layer of the pipeline
        like = base.weight
        self.register_buffer("a", torch.zeros(bank.width, base.in_features, dtype=like.dtype, device=like.device))
        self.register_buffer("b", torch.zeros(base.out_features, bank.width, dtype=like.dtype, device=like.device))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.base(x)
        rows = x.shape[0]
        weights = self.bank.table[:rows].to(device=x.device, dtype=self.a.dtype)
        hidden = nn.functional.linear(x.to(self.a.dtype), self.a)
        hidden = hidden * weights.view(rows, *([1] * (hidden.dim() - 2)), weights.shape[1])
        return out + nn.functional.linear(hidden, self.b).to(out.dtype)


class SlottedConv2d(nn.Module):
    """The same for a convolution: ``a`` is the stacked ``k x k`` down-convolution, ``b`` a 1 x 1 one."""

    a: torch.Tensor
    b: torch.Tensor

    def __init__(self, base: nn.Conv2d, bank: Table) -> None:
        super().__init__()
        self.base = base
        self.bank = bank
        like = base.weight
        self.register_buffer("a", torch.zeros(bank.width, base.in_channels, *base.kernel_size, dtype=like.dtype,
                                              device=like.device))
        self.register_buffer("b", torch.zeros(base.out_channels, bank.width, 1, 1, dtype=like.dtype,
                                              device=like.device))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        base = self.base
        out: torch.Tensor = base(x)
        rows = x.shape[0]
        weights = self.bank.table[:rows].to(device=x.device, dtype=self.a.dtype)
        padding: Any = base.padding  # an int tuple or "same"/"valid": conv2d takes both
        hidden = nn.functional.conv2d(x.to(self.a.dtype), self.a, None, base.stride, padding, base.dilation)
        hidden = hidden * weights.view(rows, -1, 1, 1)
        return out + nn.functional.conv2d(hidden, self.b).to(out.dtype)
