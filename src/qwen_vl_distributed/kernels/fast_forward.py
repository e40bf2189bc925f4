"""A text-only stage step (prompts, prompt chunks, decode rows, mixed) through the fused layer kernels.

Same result as ``Qwen3VLMoe.forward`` for steps without images or videos, computed layer by layer with
``decode_layer.fused_layer``: one kernel each for the norms, the q/k norm + rotary + cache write and the router's
softmax/top-k, instead of the module's chains of small elementwise ops (which at an 8k prompt move ~1 GB per layer).
Attention is the 'fast' cache attention (SDPA with cuDNN first for prompts, split-KV Triton for decode rows).

Shapes: T packed rows of the step, H hidden, V vocab.
"""

from __future__ import annotations

import torch

from ..model.batch import SeqLayout
from ..model.kv_cache import KVCache
from ..model.rope import text_rope_tables
from .attention import fast_cache_attention
from .decode_layer import fused_layer, rmsnorm


def _attend(kv: tuple[torch.Tensor, torch.Tensor], layout: SeqLayout, scale: float):
    return lambda q: fast_cache_attention(q, kv[0], kv[1], layout, scale)


def fused_forward(model, *, positions: torch.Tensor, layout: SeqLayout, cache: KVCache,
                  input_ids: torch.Tensor | None = None, hidden: torch.Tensor | None = None,
                  logits_rows: list[int] | None = None) -> torch.Tensor:
    """``model(...)`` for a text-only step: hidden [T, H] out, or float logits on the last stage."""
    lm = model.model.language_model
    t = model.cfg.text
    h = lm.embed_tokens(input_ids) if model.has_embed else hidden
    cos, sin = text_rope_tables(positions, t.head_dim, t.rope_theta, t.mrope_section, h.dtype)
    row_slots, row_pos = layout.row_tables(h.device)
    for idx in model.layer_ids:
        layer, kv = lm.layers[str(idx)], cache.layer(idx)
        h = fused_layer(layer, h, cos, sin, kv, row_slots, row_pos, _attend(kv, layout, layer.self_attn.scale))
    if not model.has_head:
        return h
    rows = layout.last_rows() if logits_rows is None else logits_rows
    return model.lm_head(rmsnorm(h[rows], lm.norm.weight, lm.norm.eps)).float()
