"""The vision tower's fp8 linears (``--vision-fp8``, model.quant.Fp8Linear) on the GPU: one Triton launch quantises
the input per row (``kernels.fp8_quant.quant_rows``: the same bits as model.quant.quantize_activations), with the
MLP's tanh-GELU applied first where the linear is fc2 (so the GELU costs no pass of its own); then
``torch._scaled_mm`` in its row-wise mode multiplies on the fp8 tensor cores, scales each output by its row's and
column's scales, adds the bias and rounds once, as model.quant.rowwise_fp8_linear computes.

Shapes: N rows, K input features (a multiple of 16), M output features.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from ..model.quant import FP8_DTYPE, rowwise_fp8_linear
from .fp8_quant import quant_rows


@triton.jit
def round_like(v, dt: tl.constexpr):
    """v (fp32) rounded to nearest-even in dtype ``dt``, returned in fp32. bf16 by its bits, so that Triton's CPU
    interpreter (whose conversions truncate) gives the GPU's result."""
    if dt == tl.bfloat16:
        bits = v.to(tl.int32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & -65536
        return bits.to(tl.float32, bitcast=True)
    return v.to(dt).to(tl.float32)


@triton.jit
def store_quantised_row(v, q_ptr, s_ptr, row, off, mask, BK: tl.constexpr):
    """One row v [BK] (fp32; columns past the row's end 0) quantised as quant_rows does: its fp8 values stored at
    q_ptr + off (where ``mask``), its scale at s_ptr + row."""
    q, s = quant_rows(tl.reshape(v, (1, BK)))
    tl.store(q_ptr + off, tl.reshape(q, (BK,)).to(q_ptr.dtype.element_ty), mask=mask)
    tl.store(s_ptr + row + tl.arange(0, 1), s)


@triton.jit(do_not_specialize=["N"])  # one compile for every row count
def _row_quant_kernel(x_ptr, q_ptr, s_ptr, N, K, ROWS: tl.constexpr, BK: tl.constexpr, GELU_TANH: tl.constexpr):
    # rows [pid * ROWS, +ROWS) of x [N, K] -> q [N, K] fp8 and s [N] fp32 (each row one group)
    cols = tl.arange(0, BK)
    cm = cols < K
    for i in tl.static_range(ROWS):
        row = tl.program_id(0) * ROWS + i
        if row < N:
            off = row.to(tl.int64) * K + cols
            x = tl.load(x_ptr + off, mask=cm, other=0.0)
            xf = x.to(tl.float32)
            if GELU_TANH:  # 0.5 x (1 + tanh(u)) = x sigmoid(2u), rounded to x's dtype as F.gelu's output is
                u = 0.7978845608028654 * (xf + 0.044715 * xf * xf * xf)
                xf = round_like(xf * tl.sigmoid(2.0 * u), x.dtype)
            store_quantised_row(xf, q_ptr, s_ptr, row, off, cm, BK)


def row_quant(x: torch.Tensor, gelu_tanh: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """x [N, K] contiguous -> (fp8 [N, K], scales [N, 1] fp32): model.quant.quantize_activations(x, K), of
    tanh-GELU(x) rounded to x's dtype with ``gelu_tanh``."""
    n, k = x.shape
    q = torch.empty(n, k, dtype=FP8_DTYPE, device=x.device)
    s = torch.empty(n, 1, dtype=torch.float32, device=x.device)
    bk = triton.next_power_of_2(k)
    rows = 4 if bk <= 2048 else 1
    _row_quant_kernel[(triton.cdiv(n, rows),)](x, q, s, n, k, ROWS=rows, BK=bk, GELU_TANH=gelu_tanh,
                                               num_warps=4 if bk <= 2048 else 8)
    return q, s


_bias_in_epilogue: dict = {}  # device -> whether this torch's row-wise _scaled_mm takes a bias


def scaled_mm(q: torch.Tensor, s: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, bias, dtype):
    """(q [N, K] fp8 scaled per row by s [N, 1]) @ (weight [M, K] fp8 scaled per row by scale [M])^T + bias, in
    ``dtype``: one torch._scaled_mm. Where that op refuses a bias in its row-wise mode (asked once per device, on
    the first call, which the warm-up makes before any capture) the bias is added after, rounded a second time."""
    key = q.device
    sb = scale.reshape(1, -1)
    if bias is not None and _bias_in_epilogue.get(key, True):
        try:
            out = torch._scaled_mm(q, weight.t(), scale_a=s, scale_b=sb, bias=bias, out_dtype=dtype)
            _bias_in_epilogue[key] = True
            return out
        except RuntimeError as e:
            if key in _bias_in_epilogue or "bias" not in str(e).lower():
                raise  # not the question asked: another failure, to be seen as it is
            _bias_in_epilogue[key] = False
    out = torch._scaled_mm(q, weight.t(), scale_a=s, scale_b=sb, out_dtype=dtype)
    return out if bias is None else out + bias


def fp8_linear(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None,
               act: str | None = None) -> torch.Tensor:
    """Same function as model.quant.rowwise_fp8_linear (x [.., K] -> [.., M]) where x is on CUDA in bf16 / fp16;
    the reference elsewhere."""
    if not x.is_cuda or x.dtype not in (torch.bfloat16, torch.float16):
        return rowwise_fp8_linear(x, weight, scale, bias, act)
    if act not in (None, "tanh"):  # the erf GELU: its own launch first
        x, act = F.gelu(x, approximate=act), None
    lead, k = x.shape[:-1], x.shape[-1]
    q, s = row_quant(x.reshape(-1, k).contiguous(), gelu_tanh=act == "tanh")
    return scaled_mm(q, s, weight, scale, bias, x.dtype).reshape(*lead, weight.shape[0])
