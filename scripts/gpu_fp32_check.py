"""float32 on a GPU: the Triton products (one-launch GEMV, expert kernels, split-KV decode attention) against torch
float32 with TF32 off, at the 235B's shapes. With IEEE float32 dots (kernels.tiles.mma) the relative error
is summation order (~1e-6); Triton's TF32 default gave ~1e-3.

    PYTHONPATH=src python3 scripts/gpu_fp32_check.py
"""

from __future__ import annotations

import torch

from qwen_vl_distributed.kernels.decode_attention import decode_attention
from qwen_vl_distributed.kernels.gemv import linear_small
from qwen_vl_distributed.kernels.moe_triton import fused_experts
from qwen_vl_distributed.model.attention import reference_cache_attention
from qwen_vl_distributed.model.batch import SeqLayout
from qwen_vl_distributed.model.moe import reference_experts, route


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def main() -> None:
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.manual_seed(0)
    dev, f32 = "cuda", torch.float32
    h, i, e, k = 4096, 1536, 128, 8
    out = {}
    x = torch.randn(4, h, device=dev, dtype=f32)
    w = torch.randn(9216, h, device=dev, dtype=f32) * 0.02
    out["gemv"] = rel(linear_small(x, w)[0], x @ w.T)
    gate_up = torch.randn(e, 2 * i, h, device=dev, dtype=f32) * 0.02
    down = torch.randn(e, h, i, device=dev, dtype=f32) * 0.02
    router = torch.randn(e, h, device=dev, dtype=f32) * h**-0.5
    for t in (1, 8, 512):
        xs = torch.randn(t, h, device=dev, dtype=f32)
        wts, ids = route(xs @ router.T, k, True)
        out[f"experts_{t}"] = rel(fused_experts(xs, ids, wts, gate_up, down),
                                  reference_experts(xs, ids, wts, gate_up, down))
    kc = torch.randn(4 * 64, 4, 16, 128, device=dev, dtype=f32)  # 4 sequences of 1024 tokens in blocks of 16
    vc = torch.randn(4 * 64, 4, 16, 128, device=dev, dtype=f32)
    q = torch.randn(3, 64, 128, device=dev, dtype=f32)
    blocks = torch.randperm(4 * 64).view(4, 64).tolist()
    layout = SeqLayout([blocks[i] for i in (0, 2, 3)], starts=[1000, 17, 512], lens=[1, 1, 1])
    got = decode_attention(q, kc, vc, layout.block_table(dev), layout.tensor("starts", dev), 128**-0.5)
    ref = reference_cache_attention(q, kc, vc, layout, 128**-0.5)
    out["decode_attention"] = rel(got, ref)
    for name, r in out.items():
        print(f"{name:>18}: rel {r:.2e}")
    print("PASS" if max(out.values()) < 1e-5 else "FAIL (above 1e-5: TF32-like)")


if __name__ == "__main__":
    main()
