"""Sparse MoE block: router (softmax in fp32 -> top-k -> renormalise) and fused SiLU-gated experts.

Shapes: T tokens, H hidden, E experts, K experts per token, I expert width.
Expert weights follow the transformers-5.x in-memory layout (nn.Linear orientation):
  gate_up_proj [E, 2I, H] (gate rows first, then up), down_proj [E, H, I].

``experts_forward`` is the one interface for every implementation: the plain loop over experts here is the
reference; grouped-GEMM and fused Triton paths register themselves from ``kernels/``.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .config import TextConfig

# name -> fn(x [T, H], topk_ids [T, K], topk_w [T, K], gate_up [E, 2I, H], down [E, H, I]) -> [T, H]
ExpertsFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
EXPERTS_IMPLS: dict[str, ExpertsFn] = {}


def register_experts_impl(name: str, fn: ExpertsFn) -> None:
    EXPERTS_IMPLS[name] = fn


def reference_experts(x: torch.Tensor, topk_ids: torch.Tensor, topk_w: torch.Tensor, gate_up: torch.Tensor,
                      down: torch.Tensor) -> torch.Tensor:
    """Loop over the experts that were hit, in index order; accumulate weighted outputs into x's dtype."""
    out = torch.zeros_like(x)
    inter = down.shape[-1]
    for e in torch.unique(topk_ids).tolist():
        tok, slot = torch.where(topk_ids == e)  # tokens routed to e, and which of their K choices it was
        z = F.linear(x[tok], gate_up[e])  # [n, 2I]
        h = F.silu(z[:, :inter]) * z[:, inter:]
        y = F.linear(h, down[e]) * topk_w[tok, slot, None]
        out.index_add_(0, tok, y.to(out.dtype))
    return out


register_experts_impl("reference", reference_experts)


def route(logits: torch.Tensor, k: int, normalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Router logits [T, E] -> (weights [T, K] in the logits' dtype, expert ids [T, K]); softmax and top-k in fp32."""
    probs = torch.softmax(logits, dim=-1, dtype=torch.float32)
    weights, ids = torch.topk(probs, k, dim=-1)
    if normalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights.to(logits.dtype), ids


class Experts(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        e, i, h = cfg.num_experts, cfg.moe_intermediate_size, cfg.hidden_size
        self.gate_up_proj = nn.Parameter(torch.empty(e, 2 * i, h))
        self.down_proj = nn.Parameter(torch.empty(e, h, i))
        self.impl = "reference"

    def forward(self, x: torch.Tensor, topk_ids: torch.Tensor, topk_w: torch.Tensor) -> torch.Tensor:
        return EXPERTS_IMPLS[self.impl](x, topk_ids, topk_w, self.gate_up_proj, self.down_proj)


class SparseMoE(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.top_k = cfg.num_experts_per_tok
        self.normalize = cfg.norm_topk_prob
        self.gate = nn.Linear(cfg.hidden_size, cfg.num_experts, bias=False)  # the router; key mlp.gate.weight
        self.experts = Experts(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights, ids = route(self.gate(x), self.top_k, self.normalize)
        return self.experts(x, ids, weights)
