"""The driver's view of the KV cache: a pool of blocks, who holds which, and the prefix cache over them.

Every stage holds a pool of the same number of blocks (model/kv_cache.py) and the driver alone decides which blocks
a sequence uses (its block table, sent with every step), so this one pool stands for every stage's.

Prefix cache. A full block gets a name: a hash of its tokens chained with the previous block's name, so a name
stands for the whole prefix up to the block's end. Image and video placeholders are the same token ids whatever
the picture, so a block that holds placeholders also hashes the digest (grid and pixels) of each image or video
frame they belong to: the same image in two prompts gives the same name, a different image with the same token
count does not. A named block whose last user is done keeps its KV and its name on the free list; a later prompt
whose blocks have the same names takes it back (``lookup``, ``acquire``) instead of computing it again. New blocks
come from the never-named free blocks first, then from the named ones, least recently used first (evicting their
names). A block is shared only while full, so nobody writes into a shared block; reference counts say how many
sequences hold each block (n choices of one prompt share its blocks).
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict, deque
from dataclasses import dataclass
from typing import Callable


class OutOfBlocks(RuntimeError):
    """Fewer free blocks than asked for (the engine checks first; this is its guard)."""


@dataclass(frozen=True)
class MediaSpan:
    """An image or video frame among a sequence's tokens: its placeholder span [start, stop) and its digest."""

    start: int
    stop: int
    digest: bytes


def block_name(parent: bytes | None, tokens: list[int], media: list[MediaSpan]) -> bytes:
    """The name of a full block holding ``tokens``, after the block named ``parent`` (None: the first block), with
    the media whose placeholders it holds."""
    h = hashlib.blake2b(parent or b"root", digest_size=16)
    h.update(array("I", tokens).tobytes())
    for m in media:
        h.update(f"{m.start}:{m.stop}:".encode())
        h.update(m.digest)
    return h.digest()


def name_blocks(tokens: Callable[[int, int], list[int]], n: int, media: list[MediaSpan], block_size: int,
                names: list[bytes]) -> None:
    """Extend ``names`` (the names of a sequence's first len(names) blocks) to every full block of its first n
    tokens; ``tokens(a, b)`` gives its tokens [a, b)."""
    for k in range(len(names), n // block_size):
        lo, hi = k * block_size, (k + 1) * block_size
        inside = [m for m in media if m.start < hi and m.stop > lo]
        names.append(block_name(names[-1] if names else None, tokens(lo, hi), inside))


class BlockPool:
    def __init__(self, num_blocks: int, block_size: int, caching: bool = True):
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"BlockPool: {num_blocks} blocks of {block_size} tokens")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.caching = caching
        self.refs = [0] * num_blocks
        self.plain: deque[int] = deque(range(num_blocks))  # free, holding nothing worth keeping
        self.named: OrderedDict[int, None] = OrderedDict()  # free with a name, least recently used first
        self.name_of: dict[int, bytes] = {}
        self.by_name: dict[bytes, int] = {}

    @property
    def num_free(self) -> int:
        return len(self.plain) + len(self.named)

    @property
    def num_used(self) -> int:
        return self.num_blocks - self.num_free

    def lookup(self, names: list[bytes]) -> list[int]:
        """The blocks of the longest run of ``names`` (from the first) that the cache holds."""
        out = []
        if self.caching:
            for name in names:
                block = self.by_name.get(name)
                if block is None:
                    break
                out.append(block)
        return out

    def free_among(self, blocks: list[int]) -> int:
        """How many of ``blocks`` are free now (acquiring them takes them off the free list)."""
        return sum(1 for b in blocks if self.refs[b] == 0)

    def acquire(self, blocks: list[int]) -> None:
        """Hold blocks found by ``lookup`` (one more holder each)."""
        for b in blocks:
            if self.refs[b] == 0:
                del self.named[b]
            self.refs[b] += 1

    def allocate(self, n: int) -> list[int]:
        """n fresh blocks (held once each): never-named ones first, then the least recently used named ones."""
        if n > self.num_free:
            raise OutOfBlocks(f"{n} KV blocks asked for, {self.num_free} free")
        out = []
        for _ in range(n):
            if self.plain:
                b = self.plain.popleft()
            else:
                b, _ = self.named.popitem(last=False)
                del self.by_name[self.name_of.pop(b)]
            self.refs[b] = 1
            out.append(b)
        return out

    def release(self, blocks: list[int]) -> None:
        """Drop one hold on each block. A block nobody holds goes on the free list, its name kept; the blocks of a
        table are freed last to first, so that a prefix's tail is evicted before its head (a hit needs the head)."""
        for b in reversed(blocks):
            self.refs[b] -= 1
            if self.refs[b] == 0:
                if b in self.name_of:
                    self.named[b] = None
                else:
                    self.plain.append(b)

    def name(self, block: int, name: bytes) -> None:
        """Record that ``block`` (full, held) holds the prefix ``name``; a name already cached keeps its block."""
        if self.caching and name not in self.by_name and block not in self.name_of:
            self.by_name[name] = block
            self.name_of[block] = name
