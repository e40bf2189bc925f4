"""The vision blocks' 2-D rotary as one Triton kernel: reads the qkv projection's output once and writes rotated q
and k in the [N, heads, d] layout the attention call takes (SDPA's (batch, seq, heads, d) memory order), or
rotated q, k and a copy of v into the first d columns of wider [N, heads, dp] rows (the padded attention of a
bucket graph, ``kernels.vision_attention.coded_attention``).

The reference (``model.vision.vision_rotary``) spends ~16 kernels per block on this in fp32 (casts, the two halves
of rotate_half, a concatenation, products and sums over [N, heads, d] fp32 tensors). The arithmetic here is the
same, op for op, in fp32: x1*cos1 - x2*sin1 and x2*cos2 + x1*sin2, each product and the sum rounded (the kernel is
compiled without fused multiply-add), then one rounding to the activation dtype, so the result equals the
reference's bit for bit.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit(do_not_specialize=["N"])  # one compile for every patch count
def _rotary_kernel(qkv_ptr, cos_ptr, sin_ptr, out_ptr, N, HEADS: tl.constexpr, D: tl.constexpr, DP: tl.constexpr,
                   HALF: tl.constexpr, HB: tl.constexpr, BT: tl.constexpr, COPY_V: tl.constexpr):
    # qkv [N, 3, HEADS, D]; cos, sin [N, D] fp32; out [2 or 3, N, HEADS, DP] (rotated q, k, then v if COPY_V),
    # columns [D, DP) untouched
    t = tl.program_id(0) * BT + tl.arange(0, BT)
    h = tl.program_id(1)
    j = tl.arange(0, HB)
    m = (t < N)[:, None] & (j < HALF)[None, :]
    row = t.to(tl.int64)[:, None]
    tab = row * D + j[None, :]
    c1 = tl.load(cos_ptr + tab, mask=m, other=0.0)
    c2 = tl.load(cos_ptr + tab + HALF, mask=m, other=0.0)
    s1 = tl.load(sin_ptr + tab, mask=m, other=0.0)
    s2 = tl.load(sin_ptr + tab + HALF, mask=m, other=0.0)
    dt = out_ptr.dtype.element_ty
    for which in tl.static_range(3 if COPY_V else 2):
        src = qkv_ptr + row * (3 * HEADS * D) + which * HEADS * D + h * D + j[None, :]
        a = tl.load(src, mask=m, other=0.0)
        b = tl.load(src + HALF, mask=m, other=0.0)
        dst = out_ptr + (which * N).to(tl.int64) * (HEADS * DP) + row * (HEADS * DP) + h * DP + j[None, :]
        if which == 2:  # v: copied
            tl.store(dst, a, mask=m)
            tl.store(dst + HALF, b, mask=m)
        else:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
            tl.store(dst, (a * c1 - b * s1).to(dt), mask=m)  # rotate_half: (-b, a)
            tl.store(dst + HALF, (b * c2 + a * s2).to(dt), mask=m)


def rotate_qk(qkv: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], heads: int, bt: int = 64,
              warps: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    """qkv [N, 3*heads*d], cos/sin [N, d] fp32 -> rotated q, k, each [N, heads, d] contiguous in qkv's dtype."""
    n = qkv.shape[0]
    d = qkv.shape[1] // (3 * heads)
    out = torch.empty(2, n, heads, d, dtype=qkv.dtype, device=qkv.device)
    rotate_qkv_into(qkv, rope, heads, out, bt, warps)
    return out[0], out[1]


def rotate_qkv_into(qkv: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], heads: int,
                    out: torch.Tensor, bt: int = 64, warps: int = 4) -> None:
    """Rotated q, k and a copy of v into columns [0, d) of ``out`` [3, N, heads, dp >= d]; the rest of ``out`` is
    left as it is (the segment codes of ``kernels.vision_attention.coded_attention``). ``out`` [2, N, heads, dp]:
    q and k only."""
    n = qkv.shape[0]
    d = qkv.shape[1] // (3 * heads)
    cos, sin = (t.contiguous() for t in rope)
    qkv = qkv.contiguous()
    _rotary_kernel[(triton.cdiv(n, bt), heads)](
        qkv, cos, sin, out, n, HEADS=heads, D=d, DP=out.shape[-1], HALF=d // 2, HB=triton.next_power_of_2(d // 2),
        BT=bt, COPY_V=out.shape[0] == 3, num_warps=warps, enable_fp_fusion=False)
