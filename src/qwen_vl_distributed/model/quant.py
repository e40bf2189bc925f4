"""Block-wise FP8 weights (e4m3, one fp32 scale per block), the numerics shared by the loader and the model.

A block-quantised matrix W [rows, cols] is W_fp8 (float8_e4m3fn) with ``scale_inv`` [ceil(rows/br),
ceil(cols/bc)] (fp32): W[r, c] = W_fp8[r, c] * scale_inv[r // br, c // bc], computed in fp32 and rounded once to
the compute dtype. Edge blocks are partial when a dimension is not a multiple of the block.

``ExpertScales`` is how fp8-resident experts (``model.moe.Experts.keep_fp8``) carry their scales to the experts
implementations; ``dequantize_blockwise`` is the one definition of the rounding, so an fp8-resident expert computes
with exactly the bf16 weights that dequantising at load time would have given.

W8A8 (``--fp8-experts w8a8``, ``ExpertScales.act_quant``): the experts' inputs are quantised too, per token and
per group of ``bc`` columns (the weight block's width) with the scale amax / 448 (``quantize_activations``), and
each group's fp8 x fp8 product (exact in fp32) is scaled by both scales and summed in fp32 (``w8a8_linear``): the
release's ``activation_scheme: dynamic``, the scheme HF transformers' own FP8 path and other engines compute.
Other numbers than the dequantised weights give (each activation is rounded to 4 significant bits).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0  # largest finite e4m3fn value


def scale_shape(shape: tuple[int, ...], block: tuple[int, int]) -> tuple[int, ...]:
    """Shape of the scale of a weight of ``shape`` (block-wise over the last two dims)."""
    if len(shape) < 2:
        raise ValueError(f"a block-quantised weight needs at least 2 dims, got shape {list(shape)}")
    *lead, rows, cols = shape
    return (*lead, math.ceil(rows / block[0]), math.ceil(cols / block[1]))


def _expand(scale: torch.Tensor, rows: int, cols: int, block: tuple[int, int]) -> torch.Tensor:
    """Per-element scale [.., rows, cols] from per-block [.., ceil(rows/bo), ceil(cols/bi)]; edge blocks cut short."""
    s = scale.repeat_interleave(block[0], dim=-2)[..., :rows, :]
    return s.repeat_interleave(block[1], dim=-1)[..., :cols]


def dequantize_blockwise(w_fp8: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int],
                         dtype: torch.dtype) -> torch.Tensor:
    """W = W_fp8 * scale_inv per block, computed in fp32 on w_fp8's device, returned in ``dtype``."""
    rows, cols = w_fp8.shape[-2:]
    w = w_fp8.to(torch.float32)
    w.mul_(_expand(scale_inv.to(device=w.device, dtype=torch.float32), rows, cols, block))
    return w.to(dtype)


def quantize_blockwise(w: torch.Tensor, block: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(W_fp8, scale_inv) with one fp32 scale per block so that the block's absolute max maps to FP8_MAX.

    Used by the synthetic writer (release-like FP8 checkpoints), the benchmark (fp8 experts of random weights) and,
    in blocks of one row, the W8A8 experts' inputs (``quantize_activations``).
    """
    rows, cols = w.shape[-2:]
    bo, bi = block
    pr, pc = -rows % bo, -cols % bi
    wf = torch.nn.functional.pad(w.to(torch.float32), (0, pc, 0, pr))          # [.., R, C], multiples of the block
    lead = wf.shape[:-2]
    blocks = wf.reshape(*lead, (rows + pr) // bo, bo, (cols + pc) // bi, bi)
    amax = blocks.abs().amax(dim=(-3, -1))                                       # [.., R/bo, C/bi]
    scale = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))
    q = (w.to(torch.float32) / _expand(scale, rows, cols, block)).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return q, scale


def quantize_activations(x: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(x_fp8 [n, K], scale [n, ceil(K/group)]): each row's groups of ``group`` columns (the last one partial) scaled
    so that the group's absolute max maps to FP8_MAX (an all-zero group gets scale 1): ``quantize_blockwise`` with
    blocks of one row."""
    return quantize_blockwise(x, (1, group))


def w8a8_linear(x: torch.Tensor, w_fp8: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int]
                ) -> torch.Tensor:
    """x [n, K] @ W^T for a block-quantised W [N, K] with its inputs quantised per token and per ``block[1]``-column
    group (``quantize_activations``): sum over groups g of (x_fp8[:, g] @ W_fp8[:, g]^T) * x_scale[:, g] *
    w_scale[rows' block, g], in fp32, rounded once to x's dtype. The reference of the W8A8 expert kernels."""
    k, rows, bc = x.shape[-1], w_fp8.shape[0], block[1]
    xq, xs = quantize_activations(x, bc)
    pad = -k % bc
    xg = torch.nn.functional.pad(xq.to(torch.float32), (0, pad)).unflatten(-1, (-1, bc))       # [n, G, bc]
    wg = torch.nn.functional.pad(w_fp8.to(torch.float32), (0, pad)).unflatten(-1, (-1, bc))    # [N, G, bc]
    partial = torch.einsum("ngc,mgc->gnm", xg, wg)                     # per group, exact products of fp8 values
    ws = scale_inv.to(torch.float32).repeat_interleave(block[0], 0)[:rows]                     # [N, G]
    out = (partial * xs.t()[:, :, None] * ws.t()[:, None, :]).sum(0)
    return out.to(x.dtype)


class ExpertScales(NamedTuple):
    """The scales of one layer's fp8-resident experts, gate_up_proj [E, 2I, H] and down_proj [E, H, I] in fp8.

    gate_up: [E, 2, ceil(I/br), ceil(H/bc)]: the gate rows' blocks, then the up rows' (each half blocked from its
    own first row, as the FP8 releases store gate_proj and up_proj apart); down: [E, ceil(H/br), ceil(I/bc)].
    """

    gate_up: torch.Tensor
    down: torch.Tensor
    block: tuple[int, int]
    act_quant: bool = False  # W8A8: the experts' inputs quantised per token and group as well (w8a8_linear)

    def w8a8_gate_up(self, e: int, x: torch.Tensor, gate_up: torch.Tensor) -> torch.Tensor:
        """x [n, H] -> [n, 2I] through expert e's gate and up rows, W8A8 (w8a8_linear), in x's dtype."""
        inter = gate_up.shape[1] // 2
        return torch.cat([w8a8_linear(x, gate_up[e, :inter], self.gate_up[e, 0], self.block),
                          w8a8_linear(x, gate_up[e, inter:], self.gate_up[e, 1], self.block)], -1)

    def w8a8_down(self, e: int, h: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
        """h [n, I] -> [n, H] through expert e's down_proj, W8A8, in h's dtype."""
        return w8a8_linear(h, down[e], self.down[e], self.block)

    def dequantize(self, e: int, gate_up: torch.Tensor, down: torch.Tensor, dtype: torch.dtype
                   ) -> tuple[torch.Tensor, torch.Tensor]:
        """Expert e's (gate_up [2I, H], down [H, I]) in ``dtype``: the weights dequantising at load would give."""
        inter = down.shape[-1]
        gate = dequantize_blockwise(gate_up[e, :inter], self.gate_up[e, 0], self.block, dtype)
        up = dequantize_blockwise(gate_up[e, inter:], self.gate_up[e, 1], self.block, dtype)
        return torch.cat([gate, up]), dequantize_blockwise(down[e], self.down[e], self.block, dtype)


def quantize_experts(gate_up: torch.Tensor, down: torch.Tensor, block: tuple[int, int]
                     ) -> tuple[torch.Tensor, torch.Tensor, ExpertScales]:
    """gate_up [E, 2I, H] and down [E, H, I] quantised as the releases store them (gate, up and down of each
    expert apart): (gate_up fp8, down fp8, their ExpertScales)."""
    inter = down.shape[-1]
    (gq, gs), (uq, us), (dq, ds) = (quantize_blockwise(w, block)
                                    for w in (gate_up[:, :inter], gate_up[:, inter:], down))
    return torch.cat([gq, uq], 1), dq, ExpertScales(torch.stack([gs, us], 1), ds, tuple(block))


def expert_scale_shapes(experts: int, inter: int, hidden: int, block: tuple[int, int]
                        ) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Shapes of ExpertScales.gate_up and .down."""
    return ((experts, 2, *scale_shape((inter, hidden), block)), (experts, *scale_shape((hidden, inter), block)))


# ----------------------------------------------------------------------------------------------------------------------
# fp8 linears of the vision tower (``--vision-fp8``): an opt-in speed-for-accuracy trade, not a checkpoint format.
# Each weight row gets one scale (amax / 448) when the tower is quantised after loading; each input row gets one at
# run time (``quantize_activations`` with the row as its group); the product of the fp8 values (exact in fp32) is
# summed in fp32, scaled by both, the bias added, and rounded once: what torch._scaled_mm's row-wise mode computes.
# Each input is rounded to e4m3's 4 significant bits, so the tower moves by far more than bf16 rounding: the error
# measured is in docs/parity.md.


def rowwise_fp8_linear(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None,
                       act: str | None = None) -> torch.Tensor:
    """x [.., K] -> [.., N] through a row-quantised weight [N, K] (fp8) with its scales [N] (fp32): the reference.
    ``act``: GELU first (F.gelu's ``approximate``: "tanh" or "none"), in x's dtype, as an MLP's second linear gets
    its input."""
    if act is not None:
        x = torch.nn.functional.gelu(x, approximate=act)
    lead, k = x.shape[:-1], x.shape[-1]
    xq, xs = quantize_activations(x.reshape(-1, k), k)  # [n, K] fp8, [n, 1]
    out = (xq.to(torch.float32) @ weight.to(torch.float32).t()) * xs * scale.to(torch.float32)[None, :]
    if bias is not None:
        out = out + bias.to(torch.float32)
    return out.to(x.dtype).reshape(*lead, weight.shape[0])


# impl name -> fn(x, weight, scale, bias, act) with the reference's meaning; kernels/ registers "fast"
FP8_LINEAR_IMPLS: dict = {"reference": rowwise_fp8_linear}


class Fp8Linear(torch.nn.Module):
    """An ``nn.Linear`` whose weight is held in fp8 with one scale per output row (``from_linear``); its forward is
    ``rowwise_fp8_linear`` (or the impl ``impl`` names). Its dims must be multiples of 16 (the fp8 GEMMs' rule)."""

    def __init__(self, weight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.register_buffer("weight", weight)
        self.register_buffer("weight_scale", scale)
        self.register_buffer("bias", bias)
        self.impl = "reference"

    @classmethod
    def from_linear(cls, linear: torch.nn.Linear, name: str = "linear") -> "Fp8Linear":
        n, k = linear.weight.shape
        if n % 16 or k % 16:
            raise ValueError(f"{name}: fp8 needs both dims a multiple of 16, its weight is [{n}, {k}]")
        w, s = quantize_blockwise(linear.weight.detach(), (1, k))
        bias = None if linear.bias is None else linear.bias.detach().clone()
        return cls(w, s.reshape(n), bias)

    def forward(self, x: torch.Tensor, act: str | None = None) -> torch.Tensor:
        return FP8_LINEAR_IMPLS[self.impl](x, self.weight, self.weight_scale, self.bias, act)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, fp8 rows, impl={self.impl}"
