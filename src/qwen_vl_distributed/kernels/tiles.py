"""Triton pieces the kernels share (inlined into each kernel that calls them): operand tiles, norms, the products;
and the host-side rules for how many pipeline stages of operand tiles fit in shared memory and how wide a head's
tile is."""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def load_k_tile(ptrs, row_mask, k0, kk, KD, EVEN_K: tl.constexpr):
    """The [rows, BK] tile at reduction offset k0 of a row-major operand (``kk`` = arange(BK), ``KD`` its
    reduction length): rows outside ``row_mask`` read as 0, and so do columns past KD unless EVEN_K (KD % BK == 0)."""
    if EVEN_K:
        tile = tl.load(ptrs, mask=row_mask[:, None], other=0.0)
    else:
        tile = tl.load(ptrs, mask=row_mask[:, None] & ((k0 + kk) < KD)[None, :], other=0.0)
    return tile


@triton.jit
def row_rstd(x_ptr, res_ptr, B, KD, eps, HAS_RES: tl.constexpr, BM: tl.constexpr, KP: tl.constexpr):
    """RMSNorm's 1 / sqrt(mean(h^2) + eps) of each of the B (<= BM) rows of a row-major [B, KD] operand, h = x, or
    round(x + res) with HAS_RES; 0 past B. Each row is loaded whole (KP >= KD, a power of two) in one go: a decode
    kernel's prologue pays one memory round trip per row, not one per tile."""
    r = tl.arange(0, BM)
    c = tl.arange(0, KP)
    m = c < KD
    rstd = tl.zeros((BM,), tl.float32)
    for b in range(B):
        v = tl.load(x_ptr + b * KD + c, mask=m, other=0.0).to(tl.float32)
        if HAS_RES:
            v = (v + tl.load(res_ptr + b * KD + c, mask=m, other=0.0).to(tl.float32)).to(x_ptr.dtype.element_ty)
            v = v.to(tl.float32)
        rstd = tl.where(r == b, 1.0 / tl.sqrt(tl.sum(v * v, 0) / KD + eps), rstd)
    return rstd


@triton.jit
def norm_tile(a, rstd, w_ptr, k0, kk, KD, dt):
    """The RMSNorm of tile ``a`` [rows, BK] at reduction offset k0, in ``dt``: w * round(a * rstd) rounded, the
    rounding of ``decode_layer.rmsnorm`` (columns past KD: weight 0)."""
    w = tl.load(w_ptr + k0 + kk, mask=(k0 + kk) < KD, other=0.0).to(tl.float32)
    n = (a.to(tl.float32) * rstd[:, None]).to(dt).to(tl.float32)
    return (w[None, :] * n).to(dt)


@triton.jit
def norm_rope(a, b, w_ptr, cos_ptr, sin_ptr, eps, D: tl.constexpr, HALF: tl.constexpr, HP: tl.constexpr,
               dt: tl.constexpr):
    """Per-head RMSNorm then rotary on the two halves (a, b) [HB, HP] of HB heads of one row (fp32 values of
    bf16 numbers; columns past HALF are padding, 0 in a and b)."""
    i = tl.arange(0, HP)[None, :]
    im = i < HALF
    rstd = 1.0 / tl.sqrt((tl.sum(a * a, 1) + tl.sum(b * b, 1)) / D + eps)[:, None]
    wa = tl.load(w_ptr + i, mask=im).to(tl.float32)
    wb = tl.load(w_ptr + HALF + i, mask=im).to(tl.float32)
    a = (wa * (a * rstd).to(dt).to(tl.float32)).to(dt).to(tl.float32)
    b = (wb * (b * rstd).to(dt).to(tl.float32)).to(dt).to(tl.float32)
    c1 = tl.load(cos_ptr + i, mask=im).to(tl.float32)
    c2 = tl.load(cos_ptr + HALF + i, mask=im).to(tl.float32)
    s1 = tl.load(sin_ptr + i, mask=im).to(tl.float32)
    s2 = tl.load(sin_ptr + HALF + i, mask=im).to(tl.float32)
    # x * cos + rotate_half(x) * sin, rotate_half(a, b) = (-b, a); each product and the sum rounded
    oa = ((a * c1).to(dt).to(tl.float32) + (-b * s1).to(dt).to(tl.float32)).to(dt)
    ob = ((b * c2).to(dt).to(tl.float32) + (a * s2).to(dt).to(tl.float32)).to(dt)
    return oa, ob


@triton.jit
def mma(a, b, acc):
    """acc + a @ b (fp32 accumulator). float32 operands multiply in full IEEE float32, as torch's float32 matmul
    does; Triton's default would round them to TF32 (~1e-3 relative). 16-bit operands: the tensor cores as usual."""
    if a.dtype == tl.float32:
        acc = tl.dot(a, b, acc, input_precision="ieee")
    else:
        acc = tl.dot(a, b, acc)
    return acc


# Shared memory the pipelined operand tiles may take (an H200 block gets 227 KB; the rest is left to the epilogue):
# the largest bf16 tile set that runs on the H200, the decode expert candidate BN 64 / BK 256 with 3 stages.
STAGE_BUDGET_BYTES = 216 * 1024


def fit_stages(stages: int, stage_bytes: int) -> int:
    """``stages``, lowered until that many stages of the operand tiles (``stage_bytes`` each: every operand's tile
    at its size in shared memory) fit the budget (at least 1). The tile shapes were tuned for 16-bit operands;
    float32 runs the same tiles with fewer stages."""
    return max(1, min(stages, STAGE_BUDGET_BYTES // stage_bytes))


def padded_head_dim(d: int) -> int:
    """The width of a head's tile in the attention kernels: head_dim ``d`` rounded up to a power of two, at least
    16 (tl.dot's smallest reduction). The kernels mask the extra columns (they load as 0, add nothing to a score,
    and are never stored), so every even head_dim the config allows runs on them."""
    return max(16, triton.next_power_of_2(d))
