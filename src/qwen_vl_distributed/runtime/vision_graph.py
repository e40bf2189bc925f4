"""CUDA-graph replay of the vision tower, one graph per image/video shape.

The tower's 27 blocks launch ~800 small kernels for one image; launched from Python that host time exceeds the GPU
time of the elementwise work (docs/benchmarks.md). A request's grid list (t, h, w per item) fixes every shape, so
the tower is captured once per grid list and replayed: the pixels are copied into the graph's static input, the
outputs are cloned out. The blocks run fused (``kernels.vision_block``) unless ``fused_blocks=False``. Shapes
past ``max_patches`` run eagerly (launch overhead matters little there, and each graph keeps its own activation
memory); at most ``max_graphs`` shapes are kept, least recently used first out.
"""

from __future__ import annotations

from collections import OrderedDict

import torch

from ..model.vision import VisionTower
from ..kernels.vision_attention import graph_safe


class GraphedVision:
    def __init__(self, tower: VisionTower, max_graphs: int = 4, max_patches: int = 16384, fused_blocks: bool = True):
        self.tower = tower
        self.block_fn = None
        if fused_blocks:
            from ..kernels.vision_block import fused_vision_block  # Triton: only built where the tower runs on a GPU

            self.block_fn = fused_vision_block
        self.max_graphs = max_graphs
        self.max_patches = max_patches
        self.graphs: OrderedDict = OrderedDict()

    def __call__(self, pixels: torch.Tensor, grid_thw: list[tuple[int, int, int]]):
        if not pixels.is_cuda or pixels.shape[0] > self.max_patches:
            return self.tower.run_layers(pixels, grid_thw, self.block_fn)
        key = (tuple(tuple(g) for g in grid_thw), pixels.dtype, pixels.device)
        entry = self.graphs.get(key)
        if entry is None:
            entry = self._capture(pixels, grid_thw)
            self.graphs[key] = entry
            while len(self.graphs) > self.max_graphs:
                self.graphs.popitem(last=False)
        self.graphs.move_to_end(key)
        graph, static_in, (merged, taps) = entry
        static_in.copy_(pixels)
        graph.replay()
        return merged.clone(), [t.clone() for t in taps]

    def _capture(self, pixels: torch.Tensor, grid_thw):
        static_in = pixels.clone()
        side = torch.cuda.Stream(pixels.device)
        side.wait_stream(torch.cuda.current_stream(pixels.device))
        # warm-up: lazy inits, Triton compiles, cuBLAS/cuDNN plans -- for the very calls the capture records
        with torch.cuda.stream(side), torch.inference_mode(), graph_safe():
            self.tower.run_layers(static_in, grid_thw, self.block_fn)
        torch.cuda.current_stream(pixels.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph), torch.inference_mode(), graph_safe():
            out = self.tower.run_layers(static_in, grid_thw, self.block_fn)
        return graph, static_in, out


def enable_vision_graphs(model, fused_blocks: bool = True) -> None:
    """Replay the vision tower of ``model`` (a Qwen3VLMoe stage holding it) from CUDA graphs."""
    if model.has_vision:
        model.model.visual.runner = GraphedVision(model.model.visual, fused_blocks=fused_blocks)
