"""The decoder-layer impl 'fused': one layer's step through the fused layer kernels, for any step.

Same result as ``DecoderLayer.forward`` with the 'fast' implementations (prompts, prompt chunks, decode rows,
mixed steps; the model's forward around it adds image/video features and DeepStack as for any layer), computed
by ``decode_layer.fused_layer``: one kernel each for the norms, the q/k norm + rotary + cache write and the router's
softmax/top-k, instead of the module's chains of small elementwise ops (which at an 8k prompt move ~1 GB per layer).
Attention is the 'fast' cache attention (kernels.attention: Triton over the cache for prompt rows, split-KV Triton
for decode steps).

The kernels take every head_dim the config allows (the attention kernels pad a head's tile) and fp8 experts in
blocks the expert kernels tile: ``kernels.fused_layers_fit`` says whether a model can use them.
"""

from __future__ import annotations

import torch

from ..model.batch import SeqLayout
from .attention import fast_cache_attention
from .choices import DEFAULT, KernelChoices
from .decode_layer import fused_layer


def fused_decoder_layer(layer, h: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor],
                        kv: tuple[torch.Tensor, torch.Tensor], layout: SeqLayout,
                        choices: KernelChoices = DEFAULT) -> torch.Tensor:
    """``layer(h, rope, kv, layout)`` (a DecoderLayer) through the fused kernels."""
    row_blocks, row_offsets = layout.row_tables(h.device, kv[0].shape[2])  # once per step, shared by the layers
    scale = layer.self_attn.scale
    return fused_layer(layer, h, rope[0], rope[1], kv, row_blocks, row_offsets,
                       lambda q: fast_cache_attention(q, kv[0], kv[1], layout, scale, choices), choices)
