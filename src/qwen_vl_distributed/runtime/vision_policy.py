"""Which way the graphed vision tower runs a grid list: pure bookkeeping, no GPU (tests/test_kernels_cpu.py).

- BUCKET: replay the graph of its bucket, a padded patch count whose graph reads the per-image data (tables,
  segments) from device memory, so a new image size costs no capture (``runtime.vision_graph.BucketTower``).
  Every grid list a bucket fits runs there, on every sight: the padded computation's result differs from the
  unpadded one by summation order, and a request must not change its answer with how often its size was seen.
- EXACT: replay the CUDA graph captured for exactly this grid list (least recently used out past ``max_graphs``):
  grid lists no bucket fits, whose unpadded graph computes the very bits the eager tower does.
- CAPTURE: capture one for it now: such a grid list seen ``exact_after`` times (its later calls are the steady
  state).
- EAGER: run the tower without a graph: past ``max_patches`` (launch overhead matters little there, and a graph
  keeps its activations), or a grid list no bucket fits, before its ``exact_after``-th sight.
A bucket fits when the grid list has at most ``slots - 1`` segments (the padding rows take one code slot) and its
one dense attention over the bucket's rows costs at most ``dense_limit`` times the per-segment attention (a video's
slices would pay rows^2 against the sum of their squares), or the bucket is at most ``dense_floor`` rows.
"""

from __future__ import annotations

from collections import OrderedDict

EXACT, CAPTURE, BUCKET, EAGER = "exact", "capture", "bucket", "eager"


def bucket_rows(n: int, floor: int = 256, per_octave: int = 8) -> int:
    """The padded patch count of the bucket holding n patches: ``floor`` up to it, then ``per_octave`` equal steps
    per doubling, so at most 1/per_octave of a bucket is padding. Always a multiple of 4 (a merge block)."""
    if n <= floor:
        return floor
    octave = 1 << ((n - 1).bit_length() - 1)  # the largest power of two below n
    step = max(octave // per_octave, 4)
    return -(-n // step) * step


class VisionGraphPolicy:
    def __init__(self, max_graphs: int = 4, max_patches: int = 16384, exact_after: int | None = 4,
                 buckets: bool = True, slots: int = 8, dense_limit: float = 1.5, dense_floor: int = 1024,
                 remember: int = 1024):
        if exact_after is not None and exact_after < 1:
            raise ValueError(f"exact_after must be >= 1 or None, got {exact_after}")
        self.max_graphs, self.max_patches, self.exact_after = max_graphs, max_patches, exact_after
        self.buckets, self.slots = buckets, slots
        self.dense_limit, self.dense_floor, self.remember = dense_limit, dense_floor, remember
        self.exact: OrderedDict = OrderedDict()  # key -> the runner's graph entry
        self.seen: OrderedDict = OrderedDict()  # key -> sightings, the most recent ``remember`` keys

    def choose(self, key, segments: list[int]) -> tuple[str, int]:
        """(EXACT | CAPTURE | BUCKET | EAGER, bucket rows or 0) for a grid list ``key`` whose attention segments
        have these lengths (one per item and temporal slice)."""
        n = sum(segments)
        if n > self.max_patches:
            return EAGER, 0
        rows = self.bucket(segments)
        if rows:
            return BUCKET, rows
        if key in self.exact:
            self.exact.move_to_end(key)
            return EXACT, 0
        seen = self.seen.pop(key, 0) + 1
        self.seen[key] = seen
        while len(self.seen) > self.remember:
            self.seen.popitem(last=False)
        if self.exact_after is not None and seen >= self.exact_after:
            return CAPTURE, 0
        return EAGER, 0

    def may_capture(self, patches: int) -> bool:
        """Whether a grid list of this many patches that no bucket fits can get a graph of its own (at its
        ``exact_after``-th sight): its eager runs must then compute what that graph will."""
        return self.exact_after is not None and patches <= self.max_patches

    def bucket(self, segments: list[int]) -> int:
        """The bucket's rows for these segments, or 0 where none fits."""
        if not self.buckets or len(segments) > self.slots - 1:
            return 0
        rows = bucket_rows(sum(segments))
        if rows > self.max_patches:
            return 0
        if rows > self.dense_floor and rows * rows > self.dense_limit * sum(s * s for s in segments):
            return 0
        return rows

    def keep(self, key, entry):
        """Hold the graph just captured for ``key``, dropping the least recently used past ``max_graphs``."""
        self.exact[key] = entry
        while len(self.exact) > self.max_graphs:
            self.exact.popitem(last=False)
        self.seen.pop(key, None)
        return entry
