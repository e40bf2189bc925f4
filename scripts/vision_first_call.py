"""What an image of a new size costs on stage 0, as serving runs the tower (fused blocks replayed from CUDA graphs,
``runtime.vision_graph``), under two policies in the same run:
- old: one graph per grid list, captured at its first sight (``buckets=False, exact_after=1``);
- new: the padded bucket graph of its patch count, on every sight (the first size of a bucket pays its capture);
- eager-first: no buckets, a grid list's first sight eager (the graph-safe kernels), its graph captured at the second
  (``exact_after=2``): what a one-off image size costs without a capture.
For each policy, wall time of calls 1..5 of each new grid (call 5 is the steady state). Each policy gets its own
sizes, so that neither finds the other's attention plans.
Real 235B vision dimensions, random weights, bf16. Usage on a GPU machine (~1 minute):

    PYTHONPATH=src python3 scripts/vision_first_call.py
"""

from __future__ import annotations

import time

import torch

from qwen_vl_distributed.bench.models import random_vision_tower
from qwen_vl_distributed.model.config import preset
from qwen_vl_distributed.runtime.vision_graph import GraphedVision

POLICIES = {"old": dict(buckets=False, exact_after=1), "new": dict(buckets=True, exact_after=4),
            "eager-first": dict(buckets=False, exact_after=2)}
SIZES = {"old": [(1, 34, 30), (1, 64, 64), (1, 40, 52), (1, 62, 58), (2, 36, 36)],
         "new": [(1, 30, 34), (1, 64, 62), (1, 52, 40), (1, 58, 62), (2, 34, 36)],
         "eager-first": [(1, 32, 36), (1, 62, 64), (1, 50, 42), (1, 60, 56), (2, 36, 34)]}


def timed(fn) -> float:
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) * 1e3


def main() -> None:
    tower = random_vision_tower(preset("235b-a22b"), "cuda")
    patch_dim = tower.cfg.patch_dim
    with torch.inference_mode():
        for name, kwargs in POLICIES.items():
            tower.runner = GraphedVision(tower, **kwargs)
            warm = torch.randn(16 * 16, patch_dim, device="cuda", dtype=torch.bfloat16)
            print(f"{name}: compiles and the first-ever capture {timed(lambda: tower(warm, [(1, 16, 16)])):.0f} ms")
            for grid in SIZES[name]:
                n = grid[0] * grid[1] * grid[2]
                px = torch.randn(n, patch_dim, device="cuda", dtype=torch.bfloat16)
                times = [timed(lambda: tower(px, [grid])) for _ in range(5)]
                calls = ", ".join(f"{t:6.1f}" for t in times)
                print(f"{name} policy, grid {grid} ({n:5d} patches), ms for calls 1-5: {calls}", flush=True)
    tower.runner = None


if __name__ == "__main__":
    main()
