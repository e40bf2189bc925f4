"""Grouped-GEMM MoE experts and the size-based dispatcher registered as experts impl 'fast'.

Shapes: T tokens, H hidden, E experts, K experts per token, I expert width, P = T*K (token, expert) pairs.

``grouped_experts`` sorts the pairs by expert and runs the gate/up and down products as two grouped matrix products
(``torch.nn.functional.grouped_mm``, CUTLASS on sm90; ``torch._grouped_mm`` on older torch). It reads every expert
once, so it suits chunks that touch most experts (prefill). It does no host sync, but the grouped product is not
CUDA-graph safe: decode graphs use the fused Triton kernel instead (``fast_experts`` picks by size). The same
sorted layout feeds quack's variable-length GEMMs (kernels.cute.quack_experts) where that optional package runs.
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


def sorted_pairs(topk_ids: torch.Tensor, experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(order, ends): the (token, expert) pairs' indices sorted by expert, ties in pair order (pairs of experts held
    elsewhere, id ``experts``, last), and each expert's cumulative end in that order (int32 [experts])."""
    flat = topk_ids.reshape(-1)
    order = torch.sort(flat, stable=True).indices
    counts = torch.zeros(experts + 1, dtype=torch.int32, device=flat.device).scatter_add_(
        0, flat, torch.ones_like(flat, dtype=torch.int32))
    return order, counts[:experts].cumsum(0, dtype=torch.int32)


def unsort_sum(y: torch.Tensor, order: torch.Tensor, topk_ids: torch.Tensor, topk_w: torch.Tensor, experts: int,
               dtype: torch.dtype) -> torch.Tensor:
    """y [P, H], the pairs' outputs in ``order`` (rows of pairs held elsewhere may hold anything, even nan) ->
    [T, H]: each pair's output times its routed weight (rounded as the reference's product), a token's K pairs
    summed in fp32 and rounded once; pairs of experts held elsewhere (id ``experts``) add nothing."""
    t, k = topk_ids.shape
    y = y * topk_w.reshape(-1)[order, None].to(y.dtype)
    unsorted = torch.empty_like(y)
    unsorted[order] = y
    unsorted.masked_fill_((topk_ids.reshape(-1) == experts)[:, None], 0)
    return unsorted.view(t, k, -1).float().sum(1).to(dtype)


def grouped_experts(x: torch.Tensor, topk_ids: torch.Tensor, topk_w: torch.Tensor, gate_up: torch.Tensor,
                    down: torch.Tensor, scales=None) -> torch.Tensor:
    """Same function as ``reference_experts``: x [T, H], topk [T, K], gate_up [E, 2I, H], down [E, H, I] -> [T, H].
    Weights in x's dtype only: fp8 experts (``scales``) are the Triton kernel's."""
    if scales is not None:
        raise ValueError("experts impl 'grouped' takes weights in the activations' dtype, not fp8 experts: "
                         "use 'fast' or 'triton'")
    k = topk_ids.shape[1]
    e, _, inter = down.shape
    order, offs = sorted_pairs(topk_ids, e)
    xs = x[order // k]  # [P, H] token rows in expert order
    z = _grouped_mm(xs, gate_up.transpose(1, 2), offs)  # [P, 2I]
    h = F.silu(z[:, :inter]) * z[:, inter:]
    y = _grouped_mm(h, down.transpose(1, 2), offs)  # [P, H]; rows past the last group are not computed
    return unsort_sum(y, order, topk_ids, topk_w, e, x.dtype)


def quack_runs(x: torch.Tensor, pairs: int, choices: KernelChoices) -> bool:
    """Whether ``pairs`` (token, expert) pairs of bf16 experts on x's device go to quack's grouped GEMMs: chosen from
    ``choices.quack_min_pairs`` pairs on, on a GPU where that package runs, and never inside a CUDA-graph capture
    (its first call on a shape compiles)."""
    if not (x.is_cuda and 0 < choices.quack_min_pairs <= pairs) or torch.cuda.is_current_stream_capturing():
        return False
    from .cute import chosen_runs

    return chosen_runs("quack", x, "experts")


def fast_experts(x: torch.Tensor, topk_ids: torch.Tensor, topk_w: torch.Tensor, gate_up: torch.Tensor,
                 down: torch.Tensor, scales=None, choices: KernelChoices = DEFAULT) -> torch.Tensor:
    """On CUDA, by size: quack's grouped GEMMs (kernels.cute) from ``choices.quack_min_pairs`` (token, expert)
    pairs on where that package runs (bf16 weights); else the fused Triton kernel up to
    ``choices.fused_max_pairs`` (and for every P with fp8 experts), grouped GEMM above; the reference elsewhere."""
    pairs = topk_ids.numel()
    if scales is None and quack_runs(x, pairs, choices):
        from .cute import quack_experts

        return quack_experts(x, topk_ids, topk_w, gate_up, down)
    if x.is_cuda and (pairs <= choices.fused_max_pairs or scales is not None):
        from . import fp8_fits
        from .moe_triton import fused_experts  # Triton only where a GPU runs it

        if fp8_fits(scales):
            return fused_experts(x, topk_ids, topk_w, gate_up, down, scales, choices.moe_config(pairs, scales))
    elif x.is_cuda and x.dtype == torch.bfloat16 and has_grouped_mm():
        return grouped_experts(x, topk_ids, topk_w, gate_up, down)
    return reference_experts(x, topk_ids, topk_w, gate_up, down, scales)
