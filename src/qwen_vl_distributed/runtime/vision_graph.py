"""CUDA-graph replay of the vision tower.

The tower's 27 blocks launch ~800 small kernels for one image; launched from Python that host time exceeds the GPU
time of the elementwise work (docs/benchmarks.md), so the tower is replayed from CUDA graphs. The blocks run fused
(``kernels.vision_block``) unless ``fused_blocks=False``. A capture (a warm-up run, the capture, new attention
plans) costs ~100 ms; the call that captures answers with its warm-up run (the graph's very kernels on the same
inputs) rather than a replay after it. So that a new image size need not pay for one (``runtime.vision_policy``
decides):
- a bucket graph: the tower over a padded patch count (``BucketTower``) whose per-image data -- pixels, position
  embedding taps, rotary coordinates, each row's segment -- are inputs in device memory. Every grid list of the
  bucket replays it; its attention is one dense SDPA with the segments coded in extra head columns
  (``kernels.vision_attention.coded_attention``). Bucket graphs exist only with fused blocks. A grid list a
  bucket fits runs there on every sight, so its answer never depends on how often its size was seen.
- an exact graph per grid list no bucket fits (more segments than the code slots, long videos), captured once the
  list has been seen ``exact_after`` times; until then it runs eagerly with the kernels the graph will hold (the
  per-segment attention of ``graph_safe``, not the varlen kernel an uncaptured call would take), so it computes
  the same bits on every sight.
All graphs of one runner share one memory pool: they replay one at a time and their outputs are cloned at once,
so the memory they hold is the largest one's activations, not the sum.
"""

from __future__ import annotations

import contextlib

import torch

from ..kernels.vision_attention import CodedSegments, coded_buffer, coded_head_dim, graph_safe
from ..model.vision import VisionTower, segment_lengths
from .vision_policy import BUCKET, CAPTURE, EAGER, VisionGraphPolicy


class BucketTower:
    """The tower over ``rows`` padded patches, reading its per-image data from static buffers: ``load`` fills them
    for a grid list of at most ``rows`` patches, ``forward`` runs the (capturable) computation."""

    def __init__(self, tower: VisionTower, rows: int, pixel_dtype: torch.dtype, device):
        cfg = tower.cfg
        self.tower, self.rows = tower, rows
        self.pad_slot = coded_head_dim(cfg.head_dim) - cfg.head_dim - 1  # the padding rows' own segment
        self.dtype = next(tower.parameters()).dtype
        self.pixels = torch.zeros(rows, cfg.patch_dim, dtype=pixel_dtype, device=device)
        self.tables = (torch.zeros(rows, 4, dtype=torch.long, device=device),
                       torch.zeros(rows, 4, dtype=torch.float32, device=device),
                       torch.zeros(rows, dtype=torch.long, device=device),
                       torch.zeros(rows, dtype=torch.long, device=device))
        self.segment = torch.full((rows,), self.pad_slot, dtype=torch.long, device=device)

    def load(self, pixels: torch.Tensor, grid_thw: list[tuple[int, int, int]]) -> None:
        n = pixels.shape[0]
        lengths = segment_lengths(grid_thw)
        segment = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))
        fills = zip((self.pixels, *self.tables, self.segment),
                    (pixels, *self.tower.position_tables(grid_thw, pixels.device), segment),
                    (0, 0, 0, 0, 0, self.pad_slot))
        for dst, src, pad in fills:  # the padding rows: zero pixels at table entry 0, a segment of their own
            dst[:n].copy_(src)
            dst[n:].fill_(pad)

    def forward(self) -> tuple[torch.Tensor, list[torch.Tensor]]:
        from ..kernels.vision_block import fused_block_forward  # Triton: only where the tower runs on a GPU

        cfg = self.tower.cfg
        core = CodedSegments(coded_buffer(self.segment, cfg.num_heads, cfg.head_dim, self.dtype))
        return self.tower.run_tables(self.pixels, self.tables, [0, self.rows],
                                     lambda block, x, rope, cu: fused_block_forward(block, x, rope, cu, core))

    def __call__(self, pixels: torch.Tensor, grid_thw) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Eagerly, what the bucket graph computes: load, forward, the real rows' outputs."""
        self.load(pixels, grid_thw)
        return unpad(self.forward(), pixels.shape[0])


def unpad(out: tuple[torch.Tensor, list[torch.Tensor]], n: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Copies of the merged rows of the first n patches (4 patches per merged row)."""
    merged, taps = out
    return merged[: n // 4].clone(), [t[: n // 4].clone() for t in taps]


# Bucket graphs are off: once captured they replay 5-30% slower than exact graphs (H200 and H100, docs/benchmarks.md).
# A grid list's first sight runs eagerly (the graph-safe kernels its graph will hold: the same bits) and its own graph
# is captured at its second sight. On an H100 (scripts/vision_first_call.py, 2026-12-08) a new size cost 72-83 ms at
# its first sight this way against 116-131 ms when its graph was captured there, and the first two or three sights
# together cost less too (71.8 + 28.5 + 4.4 against 116.1 + 3.8 + 3.7 ms at 1024 patches); later sights replay the
# same graph either way.
BUCKETS, EXACT_AFTER = False, 2


class GraphedVision:
    def __init__(self, tower: VisionTower, max_graphs: int = 4, max_patches: int = 16384, fused_blocks: bool = True,
                 buckets: bool = BUCKETS, exact_after: int | None = EXACT_AFTER):
        self.tower = tower
        self.block_fn = None
        if fused_blocks:
            from ..kernels.vision_block import fused_vision_block  # Triton: only built where the tower runs on a GPU

            self.block_fn = fused_vision_block
        slots = coded_head_dim(tower.cfg.head_dim) - tower.cfg.head_dim
        self.policy = VisionGraphPolicy(max_graphs, max_patches, exact_after, buckets and fused_blocks, slots)
        self.buckets: dict = {}  # (rows, dtype, device) -> (graph, BucketTower, outputs); at most one per bucket
        self.pool = None  # the memory pool every graph of this runner shares

    def __call__(self, pixels: torch.Tensor, grid_thw: list[tuple[int, int, int]]):
        if not pixels.is_cuda:
            return self.tower.run_layers(pixels, grid_thw, self.block_fn)
        key = (tuple(tuple(g) for g in grid_thw), pixels.dtype, pixels.device)
        kind, rows = self.policy.choose(key, segment_lengths(grid_thw))
        if kind == EAGER:
            return self.eager(pixels, grid_thw)
        if kind == BUCKET:
            bkey = (rows, pixels.dtype, pixels.device)
            if bkey not in self.buckets:  # a new bucket: the capture's warm-up computed this call's answer
                bucket = BucketTower(self.tower, rows, pixels.dtype, pixels.device)
                bucket.load(pixels, grid_thw)
                graph, out, first = self._capture(bucket.forward, pixels)
                self.buckets[bkey] = (graph, bucket, out)
                return unpad(first, pixels.shape[0])
            graph, bucket, out = self.buckets[bkey]
            bucket.load(pixels, grid_thw)
            graph.replay()
            return unpad(out, pixels.shape[0])
        if kind == CAPTURE:  # the capture's warm-up ran the graph's very kernels on these pixels: its answer
            static_in = pixels.clone()
            graph, out, first = self._capture(lambda: self.tower.run_layers(static_in, grid_thw, self.block_fn),
                                              pixels)
            self.policy.keep(key, (graph, static_in, out))
            merged, taps = first  # copies made here, as a replay's are: the warm-up's are inference tensors
            return merged.clone(), [t.clone() for t in taps]
        graph, static_in, (merged, taps) = self.policy.exact[key]
        static_in.copy_(pixels)
        graph.replay()
        return merged.clone(), [t.clone() for t in taps]

    def eager(self, pixels: torch.Tensor, grid_thw: list[tuple[int, int, int]]):
        """The tower without a graph. A list that may get its own graph later runs as that graph will
        (tests/gpu/test_vision_buckets_gpu.py: varlen attention differed from the per-segment SDPA by a bf16
        rounding, so its first sights gave other bits than its graph)."""
        with graph_safe() if self.policy.may_capture(pixels.shape[0]) else contextlib.nullcontext():
            return self.tower.run_layers(pixels, grid_thw, self.block_fn)

    def _capture(self, fn, like: torch.Tensor):
        """(a CUDA graph of ``fn()``, the outputs it replays into, the warm-up's outputs); ``fn`` reads only static
        tensors. The warm-up runs the very kernels the capture records on the same inputs, so its outputs are what
        a first replay would give (tests/gpu/test_vision_buckets_gpu.py holds them equal): the call that captures
        returns them and skips that replay."""
        current = torch.cuda.current_stream(like.device)
        side = torch.cuda.Stream(like.device)
        side.wait_stream(current)
        # warm-up: lazy inits, Triton compiles, cuBLAS/cuDNN plans -- for the very calls the capture records
        with torch.cuda.stream(side), torch.inference_mode(), graph_safe():
            first = fn()
        current.wait_stream(side)
        merged, taps = first
        for t in (merged, *taps):  # made on the side stream, read on this one
            t.record_stream(current)
        if self.pool is None:
            self.pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool), torch.inference_mode(), graph_safe():
            out = fn()
        return graph, out, first


def enable_vision_graphs(model, fused_blocks: bool = True) -> None:
    """Replay the vision tower of ``model`` (a Qwen3VLMoe stage holding it) from CUDA graphs."""
    if model.has_vision:
        model.model.visual.runner = GraphedVision(model.model.visual, fused_blocks=fused_blocks)
