"""Probe: where one 1024x1024 image's vision-tower time goes on the GPU (real 235B vision dims, random weights,
bf16), and what the candidate changes would buy.

1. CUDA kernel time per kernel name for one eager pass of the tower with the 'fast' impls and the fused blocks
   (torch.profiler).
2. Attention at head_dim 72 in the layout the fast path passes (q, k contiguous [N, heads, d]; v strided inside
   the qkv output) against contiguous (1, heads, N, d), and with head_dim zero-padded to 80 / 96 / 128.
3. fc1 + tanh-GELU: addmm then GELU against cuBLASLt's GELU epilogue (torch._addmm_activation).
4. The rotary and LayerNorm kernels' launch shapes.

    PYTHONPATH=src python3 scripts/vision_profile.py
"""

import torch
import torch.nn.functional as F

from qwen_vl_distributed.checkpoint.synth_weights import randomize_module
from qwen_vl_distributed.kernels import register
from qwen_vl_distributed.bench.timing import cuda_time, print_kernel_table
from qwen_vl_distributed.model.config import preset
from qwen_vl_distributed.model.vision import VisionTower

cfg = preset("235b-a22b").vision
dev = torch.device("cuda")
BF16 = torch.bfloat16
with torch.device("meta"):
    tower = VisionTower(cfg)
randomize_module(tower, 0, dev, BF16)
register()
for m in tower.modules():
    if type(m).__name__ == "VisionAttention":
        m.impl = "fast"
side = 64
n = side * side
grid = [(1, side, side)]
px = torch.randn(n, cfg.patch_dim, device=dev, dtype=BF16)

with torch.inference_mode():
    from qwen_vl_distributed.kernels.vision_block import fused_vision_block

    print("tower eager fast ms", cuda_time(lambda: tower(px, grid), iters=3, reps=5))
    fused = lambda: tower.run_layers(px, grid, fused_vision_block)  # noqa: E731
    print("tower eager fused blocks ms", cuda_time(fused, iters=3, reps=5))
    print_kernel_table(fused)

    heads, d = cfg.num_heads, cfg.head_dim
    qkv = torch.randn(n, 3 * heads * d, device=dev, dtype=BF16)
    q, k = (torch.randn(n, heads, d, device=dev, dtype=BF16) for _ in range(2))
    v = qkv.view(n, 3, heads, d)[:, 2]
    bshd = lambda: F.scaled_dot_product_attention(*(x.transpose(0, 1)[None] for x in (q, k, v)))  # noqa: E731
    print("attention, fast-path layout ms", cuda_time(bshd, iters=5, reps=5))
    for dd in (72, 80, 96, 128):
        qs, ks, vs = (torch.randn(1, heads, n, dd, device=dev, dtype=BF16) for _ in range(3))
        f = lambda: F.scaled_dot_product_attention(qs, ks, vs, scale=d**-0.5)  # noqa: E731
        print(f"attention, contiguous (1, heads, N, {dd}) ms", cuda_time(f, iters=5, reps=5))

    x = torch.randn(n, cfg.hidden_size, device=dev, dtype=BF16)
    fc1 = tower.blocks[0].mlp.linear_fc1
    plain = lambda: F.gelu(fc1(x), approximate="tanh")  # noqa: E731
    fused = lambda: torch._addmm_activation(fc1.bias, x, fc1.weight.t(), use_gelu=True)  # noqa: E731
    print("fc1+gelu plain ms", cuda_time(plain, iters=5, reps=5), "epilogue ms", cuda_time(fused, iters=5, reps=5))
    a, b = plain().float(), fused().float()
    print("epilogue rel diff", ((a - b).norm() / a.norm()).item())

    from qwen_vl_distributed.kernels.vision_block import layer_norm
    from qwen_vl_distributed.kernels.vision_rotary import rotate_qk
    from qwen_vl_distributed.model.rope import vision_rope_tables

    idx = torch.arange(n, device=dev)
    rope = vision_rope_tables(idx // side, idx % side, d, cfg.rope_theta)
    for bt, w in ((32, 2), (64, 4), (128, 4), (128, 8), (256, 8)):
        us = 1e3 * cuda_time(lambda: rotate_qk(qkv, rope, heads, bt, w), iters=10, reps=5)
        print(f"rotary bt {bt} warps {w} us", us)
    norm = tower.blocks[0].norm2
    r = torch.randn_like(x)
    print("torch layer_norm us", 1e3 * cuda_time(lambda: norm(x), iters=10, reps=5))
    for rows, w in ((1, 4), (2, 4), (4, 4), (4, 8), (8, 8)):
        plain = 1e3 * cuda_time(lambda: layer_norm(x, norm, None, rows, w), iters=10, reps=5)
        res = 1e3 * cuda_time(lambda: layer_norm(x, norm, r, rows, w), iters=10, reps=5)
        print(f"layer_norm rows {rows} warps {w} us", plain, "with residual", res)
