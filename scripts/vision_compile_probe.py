"""Probe: the vision tower eager vs torch.compile'd blocks (inductor fuses the norms, GELU, rotary), each also
replayed from a CUDA graph. One 1024x1024 image, real 235B vision dims, random weights, bf16."""

import torch

from qwen_vl_distributed.bench.timing import cuda_time
from qwen_vl_distributed.runtime.vision_graph import GraphedVision
from qwen_vl_distributed.model.config import preset
from qwen_vl_distributed.model.vision import VisionTower
from qwen_vl_distributed.checkpoint.synth_weights import randomize_module

cfg = preset("235b-a22b").vision
dev = torch.device("cuda")
with torch.device("meta"):
    tower = VisionTower(cfg)
randomize_module(tower, 0, dev, torch.bfloat16)
from qwen_vl_distributed.kernels import register
register()
for m in tower.modules():
    if type(m).__name__ == "VisionAttention":
        m.impl = "fast"
side = 64
grid = [(1, side, side)]
px = torch.randn(side * side, cfg.patch_dim, device=dev, dtype=torch.bfloat16)
with torch.inference_mode():
    ref = tower(px, grid)[0]
    print("eager", cuda_time(lambda: tower(px, grid), iters=3, reps=5))
    tower.runner = GraphedVision(tower)
    print("eager+graph", cuda_time(lambda: tower(px, grid), iters=3, reps=5))
    tower.runner = None
    for b in tower.blocks:
        b.forward = torch.compile(b.forward, dynamic=False)
    out = tower(px, grid)[0]
    print("compiled", cuda_time(lambda: tower(px, grid), iters=3, reps=5),
          "rel", ((out.float() - ref.float()).norm() / ref.float().norm()).item())
    tower.runner = GraphedVision(tower)
    print("compiled+graph", cuda_time(lambda: tower(px, grid), iters=3, reps=5))
