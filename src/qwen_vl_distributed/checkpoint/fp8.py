"""Block-wise FP8 weights in checkpoints (``quant_method: fp8``, e4m3, 128x128 blocks), as in Qwen's FP8 releases.

A quantised ``<module>.weight`` [out, in] is stored as float8_e4m3fn next to ``<module>.weight_scale_inv`` (fp32,
[ceil(out/bo), ceil(in/bi)]); the real weight is ``W[r, c] = W_fp8[r, c] * scale_inv[r // bo, c // bi]``
(``model.quant``). Edge blocks are partial when out/in are not multiples of the block.

Two ways to load one:
- dequantise (every parameter a stage holds in the compute dtype): ``load_stage(..., fp8_dequantize=...)``;
- resident (the experts of a stage built with ``Qwen3VLMoe.keep_experts_fp8``): the fp8 bytes are copied as stored
  and each stored scale lands in its slot of the parameter's ``<param>_scale_inv`` (``place_scale``), so the
  experts take half the memory. Any layout whose scale blocks fall on the same rows in memory can stay resident
  (``resident_problem`` says which cannot).
"""

from __future__ import annotations

import math
from typing import Callable

import torch

from ..model.quant import expert_scale_shapes
from .keymap import Piece

SCALE_SUFFIX = "_scale_inv"  # weight key + suffix = scale key (and fp8-resident parameter + suffix = its scale)

Fp8Dequantize = Callable[[torch.Tensor, torch.Tensor, tuple[int, int], torch.dtype], torch.Tensor]


def scale_key(weight_key: str) -> str:
    return weight_key + SCALE_SUFFIX


def resident_scale_shape(param: str, shape: tuple[int, ...], block: tuple[int, int]) -> tuple[int, ...]:
    """The scale an fp8-resident expert weight ``param`` of ``shape`` has in ``block`` blocks
    (model.quant.ExpertScales)."""
    if param.endswith("gate_up_proj"):
        e, two_i, h = shape
        return expert_scale_shapes(e, two_i // 2, h, block)[0]
    e, h, i = shape
    return expert_scale_shapes(e, i, h, block)[1]


def resident_problem(piece: Piece, param_shape: tuple[int, ...], block: tuple[int, int]) -> str | None:
    """Why the stored fp8 ``piece`` cannot be kept resident in its parameter (an expert weight [E, R, C], whose
    scale is model.quant.ExpertScales'), or None. A piece of one projection of one expert always can; a fused
    tensor only where its stored blocks become the in-memory blocks: square blocks if stored transposed, and for
    gate_up an expert width that is a multiple of the block rows (else a block straddles gate and up rows)."""
    if piece.index != ():
        return None
    if piece.transpose and block[0] != block[1]:
        return (f"its {block[0]}x{block[1]} blocks are not square and the tensor is stored transposed, so they do "
                f"not map to blocks of the parameter")
    if piece.param.endswith("gate_up_proj") and (param_shape[1] // 2) % block[0]:
        return (f"the expert width {param_shape[1] // 2} is not a multiple of the block's {block[0]} rows, so "
                f"a block of the fused tensor holds both gate and up rows")
    return None


def _blocks(ix, size: int, blk: int) -> slice:
    """The block range of an element range (a slice within [0, size))."""
    a, b, _ = ix.indices(size)
    return slice(a // blk, math.ceil(b / blk))


def place_scale(dst: torch.Tensor, param: str, weight_shape: tuple[int, ...], index: tuple, scale: torch.Tensor,
                block: tuple[int, int], transpose: bool) -> None:
    """Write the stored ``scale`` of the weight region ``index`` (into the resident parameter ``param`` of
    ``weight_shape``, [E, 2I, H] or [E, H, I]) into ``dst``, the parameter's scale (model.quant.ExpertScales;
    see resident_problem). ``transpose``: the tensor was stored with its last two dims swapped."""
    s = scale.transpose(-2, -1) if transpose else scale
    e, rows, cols = (tuple(index) + (slice(None),) * 3)[:3]
    cb = _blocks(cols, weight_shape[2], block[1])
    if not param.endswith("gate_up_proj"):     # down: blocks map one to one
        dst[e, _blocks(rows, weight_shape[1], block[0]), cb].copy_(s)
        return
    inter = weight_shape[1] // 2
    a, b, _ = rows.indices(2 * inter)
    if b - a > inter:                          # both halves (a fused tensor): each half blocked from its own row 0
        target = dst[e, :, :, cb]
        target.copy_(s.reshape(target.shape))
        return
    half = a // inter                          # the gate rows or the up rows (of one expert, or of a shard)
    dst[e, half, _blocks(slice(a - half * inter, b - half * inter), inter, block[0]), cb].copy_(s)
