"""What a first image of a new size costs on stage 0, as serving runs the tower (fused blocks replayed from a CUDA
graph per shape, ``runtime.vision_graph``): wall time of the first call of each new grid against a second call.
Real 235B vision dimensions, random weights, bf16. Usage on a GPU machine:

    PYTHONPATH=src python3 scripts/vision_first_call.py
"""

from __future__ import annotations

import time

import torch

from qwen_vl_distributed.checkpoint.synth_weights import randomize_module
from qwen_vl_distributed.kernels import enable_fast_paths
from qwen_vl_distributed.model.config import preset
from qwen_vl_distributed.model.qwen3_vl import Qwen3VLMoe


def main() -> None:
    cfg = preset("235b-a22b")
    with torch.device("meta"):
        model = Qwen3VLMoe(cfg, layers=(0, cfg.num_deepstack), vision=True, embed=True, head=False)
    randomize_module(model, 0, torch.device("cuda"), torch.bfloat16)
    enable_fast_paths(model.eval())
    vis = model.model.visual
    for grid in [(1, 32, 32), (1, 32, 32), (1, 34, 30), (1, 64, 64), (1, 40, 52), (1, 40, 54), (2, 36, 36)]:
        n = grid[0] * grid[1] * grid[2]
        px = torch.randn(n, cfg.vision.patch_dim, device="cuda", dtype=torch.bfloat16)
        times = []
        for _ in range(2):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            with torch.inference_mode():
                vis(px, [grid])
            torch.cuda.synchronize()
            times.append((time.perf_counter() - t0) * 1e3)
        print(f"grid {grid} ({n} patches): first {times[0]:8.1f} ms, again {times[1]:6.1f} ms", flush=True)


if __name__ == "__main__":
    main()
