"""One text decoder layer: pre-norm attention and pre-norm sparse MoE, each with a residual add."""

from __future__ import annotations

import torch
from torch import nn

from .attention import TextAttention
from .batch import SeqLayout
from .config import TextConfig
from .layers import RMSNorm
from .moe import SparseMoE


class DecoderLayer(nn.Module):
    def __init__(self, cfg: TextConfig, index: int):
        super().__init__()
        self.index = index  # global layer number (also the key prefix: model.language_model.layers.{index})
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = TextAttention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = SparseMoE(cfg)

    def forward(self, h: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor],
                kv: tuple[torch.Tensor, torch.Tensor], layout: SeqLayout) -> torch.Tensor:
        h = h + self.self_attn(self.input_layernorm(h), rope, kv, layout)
        return h + self.mlp(self.post_attention_layernorm(h))
