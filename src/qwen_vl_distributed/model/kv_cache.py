"""A KV cache preallocated per sequence slot, for the decoder layers one stage holds.

Layout per layer: k, v of shape [S slots, KVH kv heads, L max_len, D head_dim] -- a sequence owns one slot for its
whole life; ``starts[i]`` tokens of slot i are valid before a step writes ``lens[i]`` more.
"""

from __future__ import annotations

import torch

from .config import TextConfig


class KVCache:
    def __init__(self, cfg: TextConfig, layer_ids: range, num_slots: int, max_len: int,
                 dtype: torch.dtype, device: torch.device | str = "cpu"):
        self.layer_ids = layer_ids
        self.num_slots = num_slots
        self.max_len = max_len
        shape = (num_slots, cfg.num_key_value_heads, max_len, cfg.head_dim)
        self.k = {i: torch.zeros(shape, dtype=dtype, device=device) for i in layer_ids}
        self.v = {i: torch.zeros(shape, dtype=dtype, device=device) for i in layer_ids}

    def layer(self, idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.k[idx], self.v[idx]
