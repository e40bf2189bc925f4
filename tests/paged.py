"""KV caches in blocks for tests that run a stage model directly: block tables drawn from a shuffled pool, so a
kernel that reads past a block, or in the wrong block, shows."""

from __future__ import annotations

import torch

from qwen_vl_distributed.model.batch import SeqLayout


def shuffled_tables(lengths: list[int], block_size: int, seed: int = 0, spare: int = 3) -> list[list[int]]:
    """Block tables for sequences of ``lengths`` tokens: distinct blocks in a shuffled order out of a pool with
    ``spare`` blocks more than needed (``pool_blocks``)."""
    need = [-(-n // block_size) for n in lengths]
    order = torch.randperm(sum(need) + spare, generator=torch.Generator().manual_seed(seed)).tolist()
    out, at = [], 0
    for k in need:
        out.append(order[at:at + k])
        at += k
    return out


def pool_blocks(tables: list[list[int]]) -> int:
    """Blocks a cache needs for these tables (every block id below it)."""
    return max(b for t in tables for b in t) + 1


def prompt_cache(model, n: int, block_size: int = 4, seed: int = 0):
    """A fresh cache for one n-token prompt in shuffled blocks, and the prompt's layout."""
    tables = shuffled_tables([n], block_size, seed)
    return model.new_cache(pool_blocks(tables), block_size), SeqLayout(tables, [0], [n])
