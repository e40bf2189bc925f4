"""Text self-attention: GQA with per-head q/k RMSNorm, M-RoPE, and a KV cache in blocks (model/kv_cache.py).

Shapes: T packed new tokens, NH query heads, KVH kv heads, D head_dim, NB cache blocks, BS block size.
The attention over the cache goes through ``cache_attention``: a plain per-sequence SDPA reference here, faster
kernels (registered by ``kernels/``) behind the same signature.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .batch import SeqLayout
from .config import TextConfig
from .kv_cache import gather_kv
from .layers import ReduceFn, RMSNorm, apply_rotary

# name -> fn(q [T, NH, D], k_cache [NB, KVH, BS, D], v_cache, layout, scale) -> [T, NH, D]
AttentionFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, SeqLayout, float], torch.Tensor]
CACHE_ATTENTION_IMPLS: dict[str, AttentionFn] = {}


def register_cache_attention(name: str, fn: AttentionFn) -> None:
    CACHE_ATTENTION_IMPLS[name] = fn


def reference_cache_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, layout: SeqLayout,
                              scale: float) -> torch.Tensor:
    """One causal SDPA call per sequence over its cached tokens [0, start + len), gathered from its blocks."""
    out = torch.empty_like(q)
    nh, kvh = q.shape[1], k_cache.shape[1]
    offsets = layout.offsets()
    for i, (table, start, n) in enumerate(zip(layout.block_tables, layout.starts, layout.lens)):
        total = start + n
        qi = q[offsets[i]:offsets[i + 1]].transpose(0, 1).unsqueeze(0)  # [1, NH, n, D]
        ki = gather_kv(k_cache, table, total).unsqueeze(0)  # [1, KVH, total, D]
        vi = gather_kv(v_cache, table, total).unsqueeze(0)
        if nh != kvh:  # GQA: kv head g serves query heads g*rep .. g*rep + rep - 1
            rep = nh // kvh
            ki = ki.repeat_interleave(rep, dim=1)
            vi = vi.repeat_interleave(rep, dim=1)
        if n == 1:
            mask, causal = None, False
        elif start == 0:
            mask, causal = None, True
        else:  # a chunk continuing a cached prefix: query r sees keys [0, start + r]
            rows = torch.arange(n, device=q.device)[:, None] + start
            mask, causal = torch.arange(total, device=q.device)[None, :] <= rows, False
        o = F.scaled_dot_product_attention(qi, ki, vi, attn_mask=mask, is_causal=causal, scale=scale)
        out[offsets[i]:offsets[i + 1]] = o[0].transpose(0, 1)
    return out


register_cache_attention("reference", reference_cache_attention)


def write_cache(k_cache: torch.Tensor, v_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                layout: SeqLayout) -> None:
    """Store the step's new k, v [T, KVH, D] at each row's block and offset (positions [start, start + len) of its
    sequence): one scatter for the whole step, which a CUDA graph can also capture."""
    blocks, offsets = layout.row_tables(k.device, k_cache.shape[2])
    k_cache[blocks, :, offsets] = k
    v_cache[blocks, :, offsets] = v


class TextAttention(nn.Module):
    """``num_heads`` / ``num_kv_heads`` are the heads this module holds: all of them, or (tensor parallel, set from
    outside by parallel/) one rank's share, whose o_proj output ``reduce`` sums over the ranks."""

    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.num_heads = cfg.num_attention_heads
        self.num_kv_heads = cfg.num_key_value_heads
        self.head_dim = cfg.head_dim
        self.scale = cfg.head_dim**-0.5
        bias = cfg.attention_bias
        self.q_proj = nn.Linear(cfg.hidden_size, cfg.q_dim, bias=bias)
        self.k_proj = nn.Linear(cfg.hidden_size, cfg.kv_dim, bias=bias)
        self.v_proj = nn.Linear(cfg.hidden_size, cfg.kv_dim, bias=bias)
        self.o_proj = nn.Linear(cfg.q_dim, cfg.hidden_size, bias=bias)
        self.q_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps)  # per head, before RoPE
        self.k_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps)
        self.impl = "reference"
        self.reduce: ReduceFn | None = None

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], kv: tuple[torch.Tensor, torch.Tensor],
                layout: SeqLayout) -> torch.Tensor:
        t = x.shape[0]
        q = self.q_norm(self.q_proj(x).view(t, self.num_heads, self.head_dim))
        k = self.k_norm(self.k_proj(x).view(t, self.num_kv_heads, self.head_dim))
        v = self.v_proj(x).view(t, self.num_kv_heads, self.head_dim)
        cos, sin = rope
        q = apply_rotary(q, cos, sin)
        k = apply_rotary(k, cos, sin)
        k_cache, v_cache = kv
        write_cache(k_cache, v_cache, k, v, layout)
        o = CACHE_ATTENTION_IMPLS[self.impl](q, k_cache, v_cache, layout, self.scale)
        out = self.o_proj(o.reshape(t, self.num_heads * self.head_dim))
        return out if self.reduce is None else self.reduce(out)
