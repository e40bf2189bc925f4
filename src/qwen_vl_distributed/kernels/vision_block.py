"""A vision block's forward with its elementwise work fused: the same function as ``VisionBlock.forward``.

Per block the module runs LayerNorm, qkv, rotary + attention, proj, a residual add, LayerNorm, fc1, GELU, fc2 and
a residual add. Here:
- the first LayerNorm is one Triton kernel, and the residual add after attention and the second LayerNorm are one
  kernel that writes both the new residual stream and its normalised copy;
- the rotary and attention are the 'fast' vision attention (``kernels.vision_attention``);
- the tanh-GELU runs in cuBLASLt's epilogue of the fc1 product (``torch._addmm_activation``). That rounds once
  (GELU of the fp32 accumulator) where the module rounds the product to bf16 first; the difference is within bf16
  noise (measured in ``qwen-vl bench``'s kernel checks).
The matmuls stay cuBLAS. LayerNorm statistics are fp32 as in torch's kernel (two-pass mean and variance here,
Welford there: the fp32 results differ in the last bits, the bf16 outputs almost never).

Shapes: N patches, D vision hidden.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from ..model.quant import Fp8Linear
from ..model.vision import VISION_ATTENTION_IMPLS, VisionAttentionFn, VisionBlock


@triton.jit(do_not_specialize=["N"])  # one compile for every patch count (see moe_triton._align_kernel)
def _layer_norm_kernel(x_ptr, r_ptr, s_ptr, w_ptr, b_ptr, y_ptr, N, D, eps, HAS_RES: tl.constexpr,
                       BD: tl.constexpr, ROWS: tl.constexpr):
    # x [N, D] (+ r [N, D] -> s, rounded) -> y = LayerNorm(s) * w + b; ROWS rows per program
    cols = tl.arange(0, BD)
    cm = cols < D
    w = tl.load(w_ptr + cols, mask=cm, other=0.0).to(tl.float32)
    b = tl.load(b_ptr + cols, mask=cm, other=0.0).to(tl.float32)
    for i in tl.static_range(ROWS):
        row = tl.program_id(0) * ROWS + i
        if row < N:
            off = row.to(tl.int64) * D + cols
            x = tl.load(x_ptr + off, mask=cm, other=0.0)
            if HAS_RES:
                x = (x.to(tl.float32) + tl.load(r_ptr + off, mask=cm, other=0.0).to(tl.float32)).to(x.dtype)
                tl.store(s_ptr + off, x, mask=cm)
            xf = x.to(tl.float32)
            mean = tl.sum(xf, 0) / D
            diff = tl.where(cm, xf - mean, 0.0)
            var = tl.sum(diff * diff, 0) / D
            y = diff * tl.rsqrt(var + eps) * w + b
            tl.store(y_ptr + off, y.to(y_ptr.dtype.element_ty), mask=cm)


def layer_norm(x: torch.Tensor, norm: torch.nn.LayerNorm, residual: torch.Tensor | None = None, rows: int = 4,
               warps: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    """(s, norm(s)) with s = x + residual rounded to x's dtype (s = x without a residual); x [N, D] contiguous."""
    n, d = x.shape
    y = torch.empty_like(x)
    s = torch.empty_like(x) if residual is not None else x
    _layer_norm_kernel[(triton.cdiv(n, rows),)](
        x, residual if residual is not None else x, s, norm.weight, norm.bias, y, n, d, norm.eps,
        HAS_RES=residual is not None, BD=triton.next_power_of_2(d), ROWS=rows, num_warps=warps)
    return s, y


def fused_vision_block(block: VisionBlock, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor],
                       cu_seqlens: list[int]) -> torch.Tensor:
    """``block(x, rope, cu_seqlens)`` on CUDA with the fusions above; the module's forward elsewhere."""
    if not x.is_cuda:
        return block(x, rope, cu_seqlens)
    return fused_block_forward(block, x, rope, cu_seqlens)


def fused_block_forward(block: VisionBlock, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor],
                        cu_seqlens: list[int], core: VisionAttentionFn | None = None) -> torch.Tensor:
    """The fused computation itself (on CPU only under Triton's interpreter, as the tests run it). ``core``: the
    attention core, by default the block's own impl (a bucket graph passes its coded segments)."""
    attn, mlp = block.attn, block.mlp
    x = x.contiguous()
    _, h = layer_norm(x, block.norm1)
    core = core or VISION_ATTENTION_IMPLS[attn.impl]
    a = attn.proj(core(attn.qkv(h), rope, cu_seqlens, attn.num_heads, attn.head_dim**-0.5))
    x, h = layer_norm(a, block.norm2, residual=x)  # (a + x: the same sum as x + a)
    fc1 = mlp.linear_fc1
    if isinstance(mlp.linear_fc2, Fp8Linear):  # --vision-fp8: the GELU inside fc2's input quantisation
        return x + mlp.linear_fc2(fc1(h), act=mlp.approximate)
    if mlp.approximate == "tanh" and h.is_cuda:  # cuBLASLt's GELU epilogue is the tanh form (CPU's op is erf)
        m = torch._addmm_activation(fc1.bias, h, fc1.weight.t(), use_gelu=True)
    else:
        m = F.gelu(fc1(h), approximate=mlp.approximate)
    return x + mlp.linear_fc2(m)
