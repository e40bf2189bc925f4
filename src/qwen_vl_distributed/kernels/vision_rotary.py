"""The vision blocks' 2-D rotary as one Triton kernel: reads the qkv projection's output once and writes rotated q
and k in the [N, heads, d] layout the attention call takes (SDPA's (batch, seq, heads, d) memory order).

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
def _rotary_kernel(qkv_ptr, cos_ptr, sin_ptr, out_ptr, N, HEADS: tl.constexpr, D: tl.constexpr,
                   HALF: tl.constexpr, HB: tl.constexpr, BT: tl.constexpr):
    # qkv [N, 3, HEADS, D]; cos, sin [N, D] fp32; out [2, N, HEADS, D] (rotated q, then k)
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
    for which in tl.static_range(2):
        src = qkv_ptr + row * (3 * HEADS * D) + which * HEADS * D + h * D + j[None, :]
        a = tl.load(src, mask=m, other=0.0).to(tl.float32)
        b = tl.load(src + HALF, mask=m, other=0.0).to(tl.float32)
        dst = out_ptr + (which * N).to(tl.int64) * (HEADS * D) + row * (HEADS * D) + h * D + j[None, :]
        tl.store(dst, (a * c1 - b * s1).to(dt), mask=m)  # rotate_half: (-b, a)
        tl.store(dst + HALF, (b * c2 + a * s2).to(dt), mask=m)


def rotate_qk(qkv: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], heads: int, bt: int = 64,
              warps: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    """qkv [N, 3*heads*d], cos/sin [N, d] fp32 -> rotated q, k, each [N, heads, d] contiguous in qkv's dtype."""
    n = qkv.shape[0]
    d = qkv.shape[1] // (3 * heads)
    cos, sin = (t.contiguous() for t in rope)
    qkv = qkv.contiguous()
    out = torch.empty(2, n, heads, d, dtype=qkv.dtype, device=qkv.device)
    _rotary_kernel[(triton.cdiv(n, bt), heads)](
        qkv, cos, sin, out, n, HEADS=heads, D=d, HALF=d // 2, HB=triton.next_power_of_2(d // 2), BT=bt,
        num_warps=warps, enable_fp_fusion=False)
    return out[0], out[1]
