"""Reading one rank's part of a parameter: which slice of each stored tensor, into which place of the local parameter.

A tensor-parallel rank holds a shard of some parameters (``ParamShard``: along one dimension, some ranges of the full
parameter, concatenated). The checkpoint is planned against the FULL parameters first (``matching.plan_load``: every
key, shape, dtype and layout checked exactly as without sharding), then each stored tensor of the plan is cut to what
this rank holds (``shard_reads``): a slice of the stored tensor (rows of one projection, columns of o_proj, some
experts...) read straight from the file (``ShardReader.read(info, index)``), never the whole tensor.

FP8 block-quantised tensors are read with the matching slice of their scales, so a shard boundary must fall on a
block boundary of the stored tensor; where it would split a block, ``ShardBoundaryError`` names the tensor, the rows
and the block before any data is read.

Shapes: a parameter of full shape F [n dims]; a stored tensor of shape S (a "piece" of the parameter: the key map's
index into F, possibly transposed in its last two dims).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from .errors import CheckpointError
from .keymap import Piece


class ShardBoundaryError(CheckpointError):
    """A tensor-parallel shard boundary would split an FP8 block of a stored tensor."""


@dataclass(frozen=True)
class ParamShard:
    """This rank's part of a parameter: along ``dim``, the full parameter's index ranges [a, b), concatenated in
    order, make the local parameter; ``full`` is the full parameter's size along ``dim``."""

    dim: int
    ranges: tuple[tuple[int, int], ...]
    full: int

    def __post_init__(self):
        if not all(0 <= a < b <= self.full for a, b in self.ranges):
            raise ValueError(f"shard ranges {self.ranges} are not inside [0, {self.full})")

    @property
    def size(self) -> int:
        return sum(b - a for a, b in self.ranges)

    def local_shape(self, full_shape: tuple[int, ...]) -> tuple[int, ...]:
        return tuple(self.size if d == self.dim else n for d, n in enumerate(full_shape))

    def full_shape(self, local_shape: tuple[int, ...]) -> tuple[int, ...]:
        return tuple(self.full if d == self.dim else n for d, n in enumerate(local_shape))

    def overlaps(self, lo: int, hi: int) -> list[tuple[int, int, int]]:
        """(a, b, local start) for each part of the full range [lo, hi) this rank holds, in local order."""
        out, at = [], 0
        for a, b in self.ranges:
            x, y = max(a, lo), min(b, hi)
            if x < y:
                out.append((x, y, at + x - a))
            at += b - a
        return out


@dataclass(frozen=True)
class Read:
    """One read of a stored tensor: ``stored[src]`` goes to ``param[dst]`` (transposed first if the piece is); for
    an fp8 tensor ``scale[scale_src]`` is its part of the scale. Indices are tuples of ints and slices; a source
    index None reads the whole tensor."""

    src: tuple | None
    dst: tuple
    scale_src: tuple | None = None


def _region(piece: Piece, full_shape: tuple[int, ...], dim: int) -> tuple[int, int, bool]:
    """The piece's extent [lo, hi) along parameter dim ``dim``, and whether the stored tensor lacks that dim (an
    integer index: one expert of a per-expert layout)."""
    if dim < len(piece.index):
        ix = piece.index[dim]
        if isinstance(ix, int):
            return ix, ix + 1, True
        return ix.start, ix.stop, False
    return 0, full_shape[dim], False


def _stored_dim(piece: Piece, dim: int, ndim: int) -> int:
    """The dim of the stored tensor that parameter dim ``dim`` (not dropped) becomes."""
    dropped = sum(1 for ix in piece.index[:dim] if isinstance(ix, int))
    d = dim - dropped
    if piece.transpose and d >= ndim - 2:
        d = (2 * ndim - 3) - d  # the last two dims swap
    return d


def _dst(piece: Piece, dim: int, value) -> tuple:
    index = list(piece.index) + [slice(None)] * max(0, dim + 1 - len(piece.index))
    index[dim] = value
    return tuple(index)


def _scale_slice(key: str, where: str, stored_shape: tuple[int, ...], d: int, a: int, b: int,
                 block: tuple[int, int]) -> slice:
    """The scale rows / columns of stored rows / columns [a, b) along stored dim d (a lead dim maps one to one)."""
    nd = len(stored_shape)
    if d < nd - 2:
        return slice(a, b)
    blk = block[0] if d == nd - 2 else block[1]
    if a % blk or (b % blk and b != stored_shape[d]):
        raise ShardBoundaryError(
            f"{key} in {where}: this rank's part [{a}, {b}) of dim {d} (of {stored_shape[d]}) splits the fp8 "
            f"checkpoint's {blk}-wide blocks; choose a tensor-parallel size (or --moe-parallel ep) whose shard "
            f"boundaries fall on multiples of {blk}")
    return slice(a // blk, math.ceil(b / blk))


def shard_reads(piece: Piece, full_shape: tuple[int, ...], shard: ParamShard | None, fp8_block: tuple[int, int] | None,
                where: str) -> list[Read]:
    """The reads that fill this rank's part of the parameter from one stored tensor (``piece`` of a parameter of
    ``full_shape``); [] when this rank holds none of it. ``fp8_block``: the stored tensor is fp8 with scales in
    these blocks (a shard boundary must not split one). ``where``: the file, for messages."""
    nd = len(piece.stored_shape)
    if shard is None:
        return [Read(None, piece.index)]
    lo, hi, dropped = _region(piece, full_shape, shard.dim)
    reads = []
    for a, b, at in shard.overlaps(lo, hi):
        if dropped:  # the stored tensor is one index of the sharded dim: all of it, or nothing
            reads.append(Read(None, _dst(piece, shard.dim, at)))
            continue
        d = _stored_dim(piece, shard.dim, len(full_shape))
        src = tuple(slice(a - lo, b - lo) if i == d else slice(None) for i in range(nd))
        scale = None
        if fp8_block:
            s = _scale_slice(piece.key, where, piece.stored_shape, d, a - lo, b - lo, fp8_block)
            scale = tuple(s if i == d else slice(None) for i in range(nd))
        reads.append(Read(src, _dst(piece, shard.dim, slice(at, at + b - a)), scale))
    return reads
