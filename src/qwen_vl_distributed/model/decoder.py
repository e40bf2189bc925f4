"""One text decoder layer: pre-norm attention and pre-norm sparse MoE, each with a residual add.

The module's forward is the 'reference'; another implementation of the whole layer step (kernels registers
'fused': one kernel per norm, the q/k norm + rotary + cache write, the routing) is chosen per layer with
``impl``, like the attention and experts impls inside it.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from .attention import TextAttention
from .batch import SeqLayout
from .config import TextConfig
from .layers import RMSNorm
from .moe import SparseMoE


# (layer, h [T, H], rope (cos, sin) [T, D], kv (k, v caches), layout) -> h [T, H]
LayerFn = Callable[["DecoderLayer", torch.Tensor, tuple[torch.Tensor, torch.Tensor],
                    tuple[torch.Tensor, torch.Tensor], SeqLayout], torch.Tensor]
DECODER_LAYER_IMPLS: dict[str, LayerFn] = {}


def register_decoder_layer_impl(name: str, fn: LayerFn) -> None:
    DECODER_LAYER_IMPLS[name] = fn


class DecoderLayer(nn.Module):
    def __init__(self, cfg: TextConfig, index: int):
        super().__init__()
        self.impl = "reference"
        self.index = index  # global layer number (also the key prefix: model.language_model.layers.{index})
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = TextAttention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = SparseMoE(cfg)

    def forward(self, h: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor],
                kv: tuple[torch.Tensor, torch.Tensor], layout: SeqLayout) -> torch.Tensor:
        if self.impl != "reference":
            return DECODER_LAYER_IMPLS[self.impl](self, h, rope, kv, layout)
        h = h + self.self_attn(self.input_layernorm(h), rope, kv, layout)
        return h + self.mlp(self.post_attention_layernorm(h))
