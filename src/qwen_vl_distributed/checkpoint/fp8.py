"""Block-wise FP8 weights (``quant_method: fp8``, e4m3, 128x128 blocks), as in Qwen's FP8 releases.

A quantised ``<module>.weight`` [out, in] is stored as float8_e4m3fn next to ``<module>.weight_scale_inv`` (fp32,
[ceil(out/bo), ceil(in/bi)]); the real weight is ``W[r, c] = W_fp8[r, c] * scale_inv[r // bo, c // bi]``. Edge blocks
are partial when out/in are not multiples of the block.

What ships now dequantises at load time (the CPU path). The loader takes the dequantiser as an argument
(``load_stage(..., fp8_dequantize=...)``) so that a GPU path can swap in a fused kernel; keeping fp8 + scales resident
needs an fp8 linear in model/ and one more placement in the key map, not a rewrite of the loader.
"""

from __future__ import annotations

import math
from typing import Callable

import torch

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0  # largest finite e4m3fn value
SCALE_SUFFIX = "_scale_inv"  # weight key + suffix = scale key

Fp8Dequantize = Callable[[torch.Tensor, torch.Tensor, tuple[int, int], torch.dtype], torch.Tensor]


def scale_key(weight_key: str) -> str:
    return weight_key + SCALE_SUFFIX


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

    Used by the synthetic writer to produce release-like FP8 checkpoints.
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
