"""Activations quantised to fp8 (e4m3) per row and group of columns, as Triton pieces: the W8A8 experts' inputs
(model.quant.quantize_activations: scale = the group's amax / 448, 1 for an all-zero group; values divided by it
and rounded to nearest-even on e4m3's grid).

``quant_rows`` is the one definition: the stand-alone ``act_quant`` launch runs it on [rows, group] tiles, and the
expert kernels (kernels.moe_triton) run it on the tile of x their prologue loads and on the tile of h their
epilogue computes, so the fused and the separate paths give the same bits.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..model.quant import FP8_DTYPE


@triton.jit
def round_e4m3(v):
    """v (fp32, |v| <= 448) rounded to nearest-even on e4m3's grid, in fp32, so that the conversion after it is exact
    whatever its own rounding (the GPU's rounds to nearest; Triton's CPU interpreter truncates): 4 significant bits
    for normals (|v| >= 2^-6), steps of 2^-9 below."""
    bits = v.to(tl.int32, bitcast=True)
    e = tl.maximum(((bits >> 23) & 0xFF) - 127, -6) - 3            # the exponent of v's e4m3 step
    step = ((e + 127) << 23).to(tl.float32, bitcast=True)
    t = v / step                                                     # exact: a power of two, |t| < 16
    r = (t + 12582912.0) - 12582912.0                                # 1.5 * 2^23: fp32 addition rounds to even
    return r * step


@triton.jit
def quant_rows(x):
    """x [R, C] in fp32, each row one group (columns past the group's end read as 0) -> (the values on e4m3's grid
    in fp32 [R, C], exact in fp8; the rows' scales [R])."""
    amax = tl.max(tl.abs(x), axis=1)
    s = tl.where(amax > 0, amax / 448.0, 1.0)
    return round_e4m3(tl.clamp(x / s[:, None], -448.0, 448.0)), s


@triton.jit
def quant_groups(x, ROWS: tl.constexpr, COLS: tl.constexpr, BC: tl.constexpr):
    """x [ROWS, COLS] (any float dtype; COLS a multiple of BC, the tile starting on a group) -> (fp8 values
    [ROWS, COLS], scales [ROWS, COLS // BC]): each row's groups of BC columns quantised as ``quant_rows``."""
    q, s = quant_rows(tl.reshape(x.to(tl.float32), (ROWS * (COLS // BC), BC)))
    return tl.reshape(q, (ROWS, COLS)).to(tl.float8e4nv), tl.reshape(s, (ROWS, COLS // BC))


@triton.jit(do_not_specialize=["T"])
def _act_quant_kernel(x_ptr, q_ptr, s_ptr, T, KD, G, BT: tl.constexpr, BC: tl.constexpr):
    # rows [BT * pid0, +BT) of x [T, KD], column group pid1 of BC columns -> q (fp8) and s [T, G] (fp32)
    rows = tl.program_id(0) * BT + tl.arange(0, BT)
    g = tl.program_id(1)
    cols = g * BC + tl.arange(0, BC)
    rmask = rows < T
    mask = rmask[:, None] & (cols < KD)[None, :]
    offs = rows[:, None].to(tl.int64) * KD + cols[None, :]
    q, s = quant_rows(tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32))
    tl.store(q_ptr + offs, q.to(q_ptr.dtype.element_ty), mask=mask)
    tl.store(s_ptr + rows.to(tl.int64) * G + g, s, mask=rmask)


def act_quant(x: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """model.quant.quantize_activations of a contiguous x [T, K] in one launch: (x fp8 [T, K], scales [T, G])."""
    t, kd = x.shape
    g = triton.cdiv(kd, group)
    q = torch.empty(t, kd, dtype=FP8_DTYPE, device=x.device)
    s = torch.empty(t, g, dtype=torch.float32, device=x.device)
    bt = 16
    _act_quant_kernel[(triton.cdiv(t, bt), g)](x, q, s, t, kd, g, BT=bt, BC=group, num_warps=4)
    return q, s
