"""Triton pieces the matmul kernels share (inlined into each kernel that calls them)."""

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
