"""Grouped-GEMM MoE experts and the size-based dispatcher registered as experts impl 'fast'.

Shapes: T tokens, H hidden, E experts, K experts per token, I expert width, P = T*K (token, expert) pairs.

``grouped_experts`` sorts the pairs by expert and runs the gate/up and down products as two grouped matrix products
(``torch.nn.functional.grouped_mm``, CUTLASS on sm90; ``torch._grouped_mm`` on older torch). It reads every expert
once, so it suits chunks that touch most experts (prefill). It does no host sync, but the grouped product is not
CUDA-graph safe: decode graphs use the fused Triton kernel instead (``fast_experts`` picks by size).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..model.moe import reference_experts
from .choices import DEFAULT, KernelChoices


def _grouped_mm(a: torch.Tensor, b: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """a [P, Kd] rows grouped by offs (cumulative ends, int32 [E]); b [E, Kd, N] -> [P, N]."""
    if hasattr(F, "grouped_mm"):
        return F.grouped_mm(a, b, offs=offs)
    return torch._grouped_mm(a, b, offs=offs)


def has_grouped_mm() -> bool:
    return hasattr(F, "grouped_mm") or hasattr(torch, "_grouped_mm")


def grouped_experts(x: torch.Tensor, topk_ids: torch.Tensor, topk_w: torch.Tensor, gate_up: torch.Tensor,
                    down: torch.Tensor, scales=None) -> torch.Tensor:
    """Same function as ``reference_experts``: x [T, H], topk [T, K], gate_up [E, 2I, H], down [E, H, I] -> [T, H].
    Weights in x's dtype only: fp8 experts (``scales``) are the Triton kernel's."""
    if scales is not None:
        raise ValueError("experts impl 'grouped' takes weights in the activations' dtype, not fp8 experts: "
                         "use 'fast' or 'triton'")
    t, k = topk_ids.shape
    e, h_dim, inter = down.shape
    flat = topk_ids.reshape(-1)
    order = torch.sort(flat, stable=True).indices  # pair indices grouped by expert (id e, held elsewhere, last)
    counts = torch.zeros(e + 1, dtype=torch.int32, device=x.device).scatter_add_(
        0, flat, torch.ones_like(flat, dtype=torch.int32))
    offs = counts[:e].cumsum(0, dtype=torch.int32)
    xs = x[order // k]  # [P, H] token rows in expert order
    z = _grouped_mm(xs, gate_up.transpose(1, 2), offs)  # [P, 2I]
    h = F.silu(z[:, :inter]) * z[:, inter:]
    y = _grouped_mm(h, down.transpose(1, 2), offs)  # [P, H]; rows past the last group are not computed
    y = y * topk_w.reshape(-1)[order, None].to(y.dtype)  # rounded like the reference's bf16 product
    unsorted = torch.empty_like(y)
    unsorted[order] = y
    unsorted.masked_fill_((flat == e)[:, None], 0)  # pairs of experts held elsewhere add nothing
    return unsorted.view(t, k, h_dim).float().sum(1).to(x.dtype)


def fast_experts(x: torch.Tensor, topk_ids: torch.Tensor, topk_w: torch.Tensor, gate_up: torch.Tensor,
                 down: torch.Tensor, scales=None, choices: KernelChoices = DEFAULT) -> torch.Tensor:
    """Fused Triton kernel for P up to ``choices.fused_max_pairs`` on CUDA (and for every P with fp8 experts),
    grouped GEMM for larger P; the reference elsewhere."""
    if x.is_cuda and (topk_ids.numel() <= choices.fused_max_pairs or scales is not None):
        from . import fp8_fits
        from .moe_triton import fused_experts  # Triton only where a GPU runs it

        if fp8_fits(scales):
            return fused_experts(x, topk_ids, topk_w, gate_up, down, scales,
                                 choices.moe_config(topk_ids.numel(), scales))
    elif x.is_cuda and x.dtype == torch.bfloat16 and has_grouped_mm():
        return grouped_experts(x, topk_ids, topk_w, gate_up, down)
    return reference_experts(x, topk_ids, topk_w, gate_up, down, scales)
