"""Sparse MoE block: router (softmax in fp32 -> top-k -> renormalise) and fused SiLU-gated experts.

Shapes: T tokens, H hidden, E experts, K experts per token, I expert width.
Expert weights follow the transformers-5.x in-memory layout (nn.Linear orientation):
  gate_up_proj [E, 2I, H] (gate rows first, then up), down_proj [E, H, I].
They are in the compute dtype, or (``Experts.keep_fp8``) block-quantised fp8 with fp32 scales as the FP8 releases
store them: half the memory and half the bytes a decode step reads, computing with exactly the weights that
dequantising at load time gives (``model.quant``).

``EXPERTS_IMPLS`` is the one interface for every implementation: the plain loop over experts here is the
reference; grouped-GEMM and fused Triton paths register themselves from ``kernels/``. Every implementation takes
expert ids in [0, E] for the E experts it is given: a pair with id E belongs to no expert held here and contributes
nothing (expert parallel: ``Experts.expert_range``).

Tensor / expert parallel (set from outside by parallel/, never here): an ``Experts`` module may hold a part of each
expert's width, or the experts [first, stop) of the router's E (``expert_range``); either way its output is a partial
sum that ``SparseMoE.reduce`` completes.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .config import TextConfig
from .layers import ReduceFn
from .quant import FP8_DTYPE, ExpertScales, expert_scale_shapes, quantize_experts

# name -> fn(x [T, H], topk_ids [T, K], topk_w [T, K], gate_up [E, 2I, H], down [E, H, I], scales) -> [T, H];
# scales: None, or the ExpertScales of fp8 gate_up / down
ExpertsFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, ExpertScales | None],
                     torch.Tensor]
EXPERTS_IMPLS: dict[str, ExpertsFn] = {}


def register_experts_impl(name: str, fn: ExpertsFn) -> None:
    EXPERTS_IMPLS[name] = fn


def reference_experts(x: torch.Tensor, topk_ids: torch.Tensor, topk_w: torch.Tensor, gate_up: torch.Tensor,
                      down: torch.Tensor, scales: ExpertScales | None = None) -> torch.Tensor:
    """Loop over the experts that were hit, in index order; accumulate weighted outputs into x's dtype. fp8 experts
    are dequantised one at a time, as they are used; W8A8 ones (scales.act_quant) multiply quantised inputs."""
    out = torch.zeros_like(x)
    num, inter = down.shape[0], down.shape[-1]
    w8a8 = scales is not None and scales.act_quant
    for e in torch.unique(topk_ids).tolist():
        if e >= num:  # a pair of an expert held elsewhere
            continue
        tok, slot = torch.where(topk_ids == e)  # tokens routed to e, and which of their K choices it was
        if w8a8:  # inputs quantised per token and group too (model.quant.w8a8_linear)
            z = scales.w8a8_gate_up(e, x[tok], gate_up)
        else:
            w_gu, w_dn = (gate_up[e], down[e]) if scales is None else scales.dequantize(e, gate_up, down, x.dtype)
            z = F.linear(x[tok], w_gu)  # [n, 2I]
        h = F.silu(z[:, :inter]) * z[:, inter:]
        y = (scales.w8a8_down(e, h, down) if w8a8 else F.linear(h, w_dn)) * topk_w[tok, slot, None]
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
        self.fp8_block: tuple[int, int] | None = None
        self.fp8_act_quant = False  # W8A8: inputs quantised per token and group too (model.quant.w8a8_linear)
        self.impl = "reference"
        self.expert_range: tuple[int, int] | None = None  # expert parallel: the router's experts held here

    def local_routing(self, topk_ids: torch.Tensor, topk_w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The router's choices [T, K] in this module's expert ids: with ``expert_range`` [first, stop), expert
        first + j is local j, and a pair of an expert held elsewhere gets id E (held here) and weight 0."""
        if self.expert_range is None:
            return topk_ids, topk_w
        first, stop = self.expert_range
        foreign = (topk_ids < first) | (topk_ids >= stop)
        ids = torch.where(foreign, stop - first, topk_ids - first)
        return ids.to(topk_ids.dtype), topk_w.masked_fill(foreign, 0)

    def keep_fp8(self, block: tuple[int, int], act_quant: bool = False) -> None:
        """Hold the weights as block-quantised fp8 (``block`` = rows, cols of one scale's block) plus fp32 scales,
        ``gate_up_proj_scale_inv`` and ``down_proj_scale_inv`` (shapes: model.quant.ExpertScales). The parameters
        are replaced by empty ones on the same device: call before loading (the loader fills both). ``act_quant``:
        compute W8A8 (the inputs quantised too) instead of with the dequantised weights."""
        e, two_i, h = self.gate_up_proj.shape
        dev = self.gate_up_proj.device
        gs, ds = expert_scale_shapes(e, two_i // 2, h, block)
        new = lambda *shape, dtype: nn.Parameter(torch.empty(*shape, dtype=dtype, device=dev), requires_grad=False)
        self.gate_up_proj = new(e, two_i, h, dtype=FP8_DTYPE)
        self.down_proj = new(e, h, two_i // 2, dtype=FP8_DTYPE)
        self.gate_up_proj_scale_inv = new(*gs, dtype=torch.float32)
        self.down_proj_scale_inv = new(*ds, dtype=torch.float32)
        self.fp8_block = tuple(block)
        self.fp8_act_quant = act_quant

    @torch.no_grad()
    def quantize_fp8(self, block: tuple[int, int], act_quant: bool = False) -> None:
        """Quantise the current weights (gate, up and down of each expert apart, as the releases store them) and
        keep them fp8: for benchmarks and tests of the fp8 paths on weights that were not loaded from fp8."""
        gate_up, down, scales = quantize_experts(self.gate_up_proj, self.down_proj, block)
        self.keep_fp8(block, act_quant)
        self.gate_up_proj.copy_(gate_up)
        self.down_proj.copy_(down)
        self.gate_up_proj_scale_inv.copy_(scales.gate_up)
        self.down_proj_scale_inv.copy_(scales.down)

    @property
    def scales(self) -> ExpertScales | None:
        if self.fp8_block is None:
            return None
        return ExpertScales(self.gate_up_proj_scale_inv, self.down_proj_scale_inv, self.fp8_block, self.fp8_act_quant)

    def forward(self, x: torch.Tensor, topk_ids: torch.Tensor, topk_w: torch.Tensor) -> torch.Tensor:
        ids, w = self.local_routing(topk_ids, topk_w)
        return EXPERTS_IMPLS[self.impl](x, ids, w, self.gate_up_proj, self.down_proj, self.scales)


class SparseMoE(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.top_k = cfg.num_experts_per_tok
        self.normalize = cfg.norm_topk_prob
        self.gate = nn.Linear(cfg.hidden_size, cfg.num_experts, bias=False)  # the router; key mlp.gate.weight
        self.experts = Experts(cfg)
        self.reduce: ReduceFn | None = None  # tensor / expert parallel: sums the ranks' partial outputs

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights, ids = route(self.gate(x), self.top_k, self.normalize)
        out = self.experts(x, ids, weights)
        return out if self.reduce is None else self.reduce(out)
