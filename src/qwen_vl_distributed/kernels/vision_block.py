"""A vision block's forward with its elementwise work fused: the same function as ``VisionBlock.forward``.

Per block the module runs LayerNorm, qkv, rotary + attention, proj, a residual add, LayerNorm, fc1, GELU, fc2 and
a residual add. Here:
- the first LayerNorm is one Triton kernel, and the residual add after attention and the second LayerNorm are one
  kernel that writes both the new residual stream and its normalised copy;
- the rotary and attention are the 'fast' vision attention (``kernels.vision_attention``);
- with ``--vision-fp8`` (the block's linears model.quant.Fp8Linear on the fast path) the two LayerNorms write their
  output quantised to fp8 per row, the fp8 linears' input, and the GELU runs inside fc2's input quantisation
  (kernels.fp8_linear);
- else the tanh-GELU runs in cuBLASLt's epilogue of the fc1 product (``torch._addmm_activation``). That rounds once
  (GELU of the fp32 accumulator) where the module rounds the product to bf16 first; the difference is within bf16
  noise (measured in ``qwen-vl bench``'s kernel checks).
The matmuls stay cuBLAS (torch._scaled_mm for fp8). LayerNorm statistics are fp32 as in torch's kernel (two-pass
mean and variance here, Welford there: the fp32 results differ in the last bits, the bf16 outputs almost never).

Shapes: N patches, D vision hidden.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from ..model.quant import FP8_DTYPE, Fp8Linear
from .fp8_linear import round_like, scaled_mm, store_quantised_row
from ..model.vision import VISION_ATTENTION_IMPLS, VisionAttentionFn, VisionBlock


@triton.jit(do_not_specialize=["N"])  # one compile for every patch count (see moe_triton._align_kernel)
def _layer_norm_kernel(x_ptr, r_ptr, s_ptr, w_ptr, b_ptr, y_ptr, ys_ptr, N, D, eps, HAS_RES: tl.constexpr,
                       BD: tl.constexpr, ROWS: tl.constexpr, QUANT: tl.constexpr):
    # x [N, D] (+ r [N, D] -> s, rounded) -> y = LayerNorm(s) * w + b; ROWS rows per program. QUANT: y rounded to
    # x's dtype, then stored quantised to fp8 per row with its scale in ys [N] (kernels.fp8_linear's input)
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
            if QUANT:  # (columns past D are 0: w and b load as 0 there)
                store_quantised_row(round_like(y, x.dtype), y_ptr, ys_ptr, row, off, cm, BD)
            else:
                tl.store(y_ptr + off, y.to(y_ptr.dtype.element_ty), mask=cm)


def layer_norm(x: torch.Tensor, norm: torch.nn.LayerNorm, residual: torch.Tensor | None = None, rows: int = 4,
               warps: int = 4, quant: bool = False):
    """(s, norm(s)) with s = x + residual rounded to x's dtype (s = x without a residual); x [N, D] contiguous.
    ``quant``: (s, (norm(s) in fp8, its row scales [N, 1])), model.quant.quantize_activations of norm(s) in x's
    dtype, the input an fp8 linear takes (kernels.fp8_linear.scaled_mm)."""
    n, d = x.shape
    y = torch.empty(n, d, dtype=FP8_DTYPE if quant else x.dtype, device=x.device)
    ys = torch.empty(n, 1, dtype=torch.float32, device=x.device) if quant else y
    s = torch.empty_like(x) if residual is not None else x
    _layer_norm_kernel[(triton.cdiv(n, rows),)](
        x, residual if residual is not None else x, s, norm.weight, norm.bias, y, ys, n, d, norm.eps,
        HAS_RES=residual is not None, BD=triton.next_power_of_2(d), ROWS=rows, QUANT=quant, num_warps=warps)
    if quant:
        return s, (y, ys)
    return s, y


def _fp8_inputs(x: torch.Tensor, *linears) -> bool:
    """Whether these linears are fp8 on the fast path (model.quant.Fp8Linear, impl 'fast') for x on a GPU in bf16 /
    fp16: then the LayerNorm before each writes its quantised input itself."""
    return (x.is_cuda and x.dtype in (torch.bfloat16, torch.float16)
            and all(isinstance(m, Fp8Linear) and m.impl == "fast" for m in linears))


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
    core = core or VISION_ATTENTION_IMPLS[attn.impl]
    fc1 = mlp.linear_fc1
    if _fp8_inputs(x, attn.qkv, fc1, mlp.linear_fc2):  # --vision-fp8: the LayerNorms write fp8 linears' inputs
        _, (hq, hs) = layer_norm(x, block.norm1, quant=True)
        qkv = scaled_mm(hq, hs, attn.qkv.weight, attn.qkv.weight_scale, attn.qkv.bias, x.dtype)
        a = attn.proj(core(qkv, rope, cu_seqlens, attn.num_heads, attn.head_dim**-0.5))
        x, (hq, hs) = layer_norm(a, block.norm2, residual=x, quant=True)
        m = scaled_mm(hq, hs, fc1.weight, fc1.weight_scale, fc1.bias, x.dtype)
        return x + mlp.linear_fc2(m, act=mlp.approximate)  # (the GELU inside fc2's input quantisation)
    _, h = layer_norm(x, block.norm1)
    a = attn.proj(core(attn.qkv(h), rope, cu_seqlens, attn.num_heads, attn.head_dim**-0.5))
    x, h = layer_norm(a, block.norm2, residual=x)  # (a + x: the same sum as x + a)
    if isinstance(mlp.linear_fc2, Fp8Linear):  # --vision-fp8: the GELU inside fc2's input quantisation
        return x + mlp.linear_fc2(fc1(h), act=mlp.approximate)
    if mlp.approximate == "tanh" and h.is_cuda:  # cuBLASLt's GELU epilogue is the tanh form (CPU's op is erf)
        m = torch._addmm_activation(fc1.bias, h, fc1.weight.t(), use_gelu=True)
    else:
        m = F.gelu(fc1(h), approximate=mlp.approximate)
    return x + mlp.linear_fc2(m)
