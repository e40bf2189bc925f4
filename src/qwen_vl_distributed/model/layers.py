"""Small building blocks shared by the text decoder and the vision tower.

Numerics follow transformers (see docs/parity.md): RMSNorm normalises in fp32, casts back to the input dtype, and only
then multiplies by the weight; rotary cos/sin tables are built in fp32.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

# Completes a partial sum: a module holding one tensor-parallel rank's share of its weights (some heads, some experts,
# part of each expert's width) computes its share of the output; this sums the shares of all ranks of the group (an
# all-reduce). Set on the module from outside (parallel/); None in a whole module. [T, H] -> [T, H].
ReduceFn = Callable[[torch.Tensor], torch.Tensor]


class RMSNorm(nn.Module):
    """y = w * cast(x_f32 * rsqrt(mean(x_f32^2) + eps)) -- the weight multiply happens after the cast back."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """(a, b) -> (-b, a) over the two halves of the last dimension (NeoX-style rotary pairs i and i + d/2)."""
    a, b = x.chunk(2, dim=-1)
    return torch.cat((-b, a), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [T, heads, d]; cos/sin [T, d] broadcast over heads."""
    return x * cos[:, None, :] + rotate_half(x) * sin[:, None, :]
