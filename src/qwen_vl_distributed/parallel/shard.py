"""Tensor / expert parallelism applied to a stage's model from outside (the model's code is single-device math).

``shard_stage`` takes a stage built on the meta device and cuts each decoder layer down to one tensor rank's share
(``parallel.grid`` says which heads and experts): the parameters get their local shapes and the attention modules
their local head counts, and it returns, per cut parameter, the ``ParamShard`` the loader reads
(``checkpoint.load_stage(..., shards=...)``). ``attach_reduce`` then gives every sharded attention and MoE block the
group's all-reduce, which completes their partial outputs. Everything else (norms, router, embedding, vision tower,
lm_head) is replicated on every rank of the stage.

Per layer (H hidden, NH / KVH heads of D, E experts of width I, N ranks):
  q_proj [NH*D, H] -> rows of this rank's query heads; k_proj, v_proj [KVH*D, H] -> rows of its kv heads;
  o_proj [H, NH*D] -> columns of its query heads: o = sum over ranks (one all-reduce);
  experts, ep: gate_up_proj [E, 2I, H], down_proj [E, H, I] -> experts [r*E/N, (r+1)*E/N);
  experts, tp: gate_up_proj -> gate rows [r*I/N, (r+1)*I/N) and the same up rows, down_proj -> those columns;
  either way the MoE output = sum over ranks (one all-reduce).
"""

from __future__ import annotations

import torch
from torch import nn

from ..checkpoint.shards import ParamShard
from ..model.attention import TextAttention
from ..model.layers import ReduceFn
from ..model.moe import Experts, SparseMoE
from ..model.qwen3_vl import Qwen3VLMoe
from .grid import Grid, check_grid, experts_of, heads_of


def _cut(module: nn.Module, name: str, prefix: str, shard: ParamShard, shards: dict[str, ParamShard]) -> None:
    """Give ``module.name`` (a meta parameter) its local shape, and record its shard under its full name."""
    p = getattr(module, name)
    if not p.is_meta:
        raise ValueError(f"shard_stage cuts stages built on the meta device; {prefix}{name} is on {p.device}")
    local = shard.local_shape(tuple(p.shape))
    setattr(module, name, nn.Parameter(torch.empty(local, dtype=p.dtype, device=p.device), requires_grad=False))
    shards[prefix + name] = shard


def _rows(a: int, b: int, unit: int, full: int) -> ParamShard:
    return ParamShard(0, ((a * unit, b * unit),), full)


def _shard_attention(attn: TextAttention, prefix: str, cfg, tp: int, r: int, shards: dict) -> None:
    t = cfg.text
    d = t.head_dim
    (qa, qb), (ka, kb) = heads_of(cfg, tp, r)
    _cut(attn.q_proj, "weight", prefix + "q_proj.", _rows(qa, qb, d, t.q_dim), shards)
    for lin in (attn.k_proj, attn.v_proj):
        name = "k_proj." if lin is attn.k_proj else "v_proj."
        _cut(lin, "weight", prefix + name, _rows(ka, kb, d, t.kv_dim), shards)
        lin.out_features = (kb - ka) * d
    _cut(attn.o_proj, "weight", prefix + "o_proj.", ParamShard(1, ((qa * d, qb * d),), t.q_dim), shards)
    attn.q_proj.out_features = attn.o_proj.in_features = (qb - qa) * d
    attn.num_heads, attn.num_kv_heads = qb - qa, kb - ka


def _shard_experts(experts: Experts, prefix: str, cfg, tp: int, r: int, moe: str, shards: dict) -> None:
    t = cfg.text
    e, inter = t.num_experts, t.moe_intermediate_size
    if moe == "ep":
        first, stop = experts_of(cfg, tp, r)
        for name in ("gate_up_proj", "down_proj"):
            _cut(experts, name, prefix, ParamShard(0, ((first, stop),), e), shards)
        experts.expert_range = (first, stop)
        return
    w = inter // tp
    gate, up = (r * w, (r + 1) * w), (inter + r * w, inter + (r + 1) * w)
    _cut(experts, "gate_up_proj", prefix, ParamShard(1, (gate, up), 2 * inter), shards)
    _cut(experts, "down_proj", prefix, ParamShard(2, (gate,), inter), shards)


def shard_stage(model: Qwen3VLMoe, grid: Grid, tp_rank: int) -> dict[str, ParamShard]:
    """Cut ``model`` (a stage on the meta device, before loading and before ``keep_experts_fp8``) to tensor rank
    ``tp_rank``'s share; returns the shards to load (empty with one tensor rank)."""
    if grid.tp == 1:
        return {}
    check_grid(model.cfg, grid)
    shards: dict[str, ParamShard] = {}
    for name, m in model.named_modules():
        if isinstance(m, TextAttention):
            _shard_attention(m, name + ".", model.cfg, grid.tp, tp_rank, shards)
        elif isinstance(m, Experts):
            _shard_experts(m, name + ".", model.cfg, grid.tp, tp_rank, grid.moe, shards)
    return shards


def attach_reduce(model: Qwen3VLMoe, reduce: ReduceFn) -> None:
    """Every attention and MoE block of ``model`` completes its partial output with ``reduce`` (the stage group's
    all-reduce)."""
    for m in model.modules():
        if isinstance(m, (TextAttention, SparseMoE)):
            m.reduce = reduce
