"""The KV cache of one stage: a pool of fixed-size blocks for the decoder layers the stage holds.

Layout per layer: k, v of shape [NB + 1 blocks, KVH kv heads, BS block_size, D head_dim]. A sequence's keys and
values live in the blocks its block table lists, in order: token p sits in block ``table[p // BS]`` at offset
``p % BS``. The driver (engine) decides every table; the same table serves every stage, whose pools have the same
number of blocks. Block NB, the last, is the scratch block: no sequence owns it; CUDA-graph padding rows and the
start-up warm-up write there, and nothing reads what they leave.

A cache whose one block holds a whole sequence (``block_size >= max_seq_len``) is the contiguous per-sequence
layout: the kernels then address a sequence's keys from its one block without a table lookup per key (what
``qwen-vl bench`` times the paged decode against).
"""

from __future__ import annotations

import torch

from .config import TextConfig


class KVCache:
    def __init__(self, cfg: TextConfig, layer_ids: range, num_blocks: int, block_size: int, max_seq_len: int,
                 dtype: torch.dtype, device: torch.device | str = "cpu"):
        if num_blocks < 1 or block_size < 1 or max_seq_len < 1:
            raise ValueError(f"KVCache: num_blocks {num_blocks}, block_size {block_size} and max_seq_len "
                             f"{max_seq_len} must be at least 1")
        self.layer_ids = layer_ids
        self.num_blocks = num_blocks  # blocks sequences may own: 0 .. num_blocks - 1
        self.block_size = block_size
        self.max_seq_len = max_seq_len  # the longest sequence a block table may describe
        shape = (num_blocks + 1, cfg.num_key_value_heads, block_size, cfg.head_dim)
        self.k = {i: torch.zeros(shape, dtype=dtype, device=device) for i in layer_ids}
        self.v = {i: torch.zeros(shape, dtype=dtype, device=device) for i in layer_ids}

    @property
    def scratch_block(self) -> int:
        return self.num_blocks

    @property
    def max_blocks_per_seq(self) -> int:
        """The width of a block table that covers ``max_seq_len`` tokens."""
        return -(-self.max_seq_len // self.block_size)

    def layer(self, idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.k[idx], self.v[idx]


def blocks_for(tokens: int, block_size: int) -> int:
    """Blocks that hold ``tokens`` tokens."""
    return -(-tokens // block_size)


def gather_kv(cache: torch.Tensor, blocks: list[int], n: int) -> torch.Tensor:
    """The first n positions of the sequence whose block table is ``blocks``: [KVH, n, D] out of the layer's cache
    [NB, KVH, BS, D]; a view (no copy) when one block holds them."""
    bs = cache.shape[2]
    nb = blocks_for(n, bs)
    if nb == 1:
        return cache[blocks[0], :, :n]
    idx = torch.tensor(blocks[:nb], dtype=torch.long, device=cache.device)
    return cache[idx].transpose(0, 1).reshape(cache.shape[1], nb * bs, cache.shape[3])[:, :n]
