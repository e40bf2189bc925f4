"""On a GPU machine: SDPA's flash backend with each flash implementation torch lists
(``torch.nn.attention.list_flash_attention_impls``, e.g. FA3 / FA4 on Hopper) against cuDNN, on our two attention
shapes: one 1024x1024 image's vision attention (16 heads, 4096 patches, head_dim 72, not causal) and a 2048-token
text prompt (64 query / 4 kv heads, head_dim 128, causal GQA). Error against fp32 math for each.

    PYTHONPATH=src python3 scripts/attention_impl_probe.py
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from qwen_vl_distributed.bench.timing import cuda_time

BF16 = torch.bfloat16
SHAPES = {"vision 16x4096x72": (16, 16, 4096, 72, False), "text 64/4x2048x128 causal": (64, 4, 2048, 128, True),
          "text 64/4x8192x128 causal": (64, 4, 8192, 128, True)}


def case(nh, kvh, n, d):
    g = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(1, n, nh, d, device="cuda", dtype=BF16, generator=g).transpose(1, 2)  # BSHD memory
    k = torch.randn(1, n, kvh, d, device="cuda", dtype=BF16, generator=g).transpose(1, 2)
    v = torch.randn(1, n, kvh, d, device="cuda", dtype=BF16, generator=g).transpose(1, 2)
    return q, k, v


def run(backend, q, k, v, causal):
    with sdpa_kernel([backend]):
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=q.shape[1] != k.shape[1])


def main():
    import torch.nn.attention as A

    impls = A.list_flash_attention_impls() if hasattr(A, "list_flash_attention_impls") else []
    print("flash impls listed:", impls, "current:", getattr(A, "current_flash_attention_impl", lambda: None)())
    ref = {}
    for name, (nh, kvh, n, d, causal) in SHAPES.items():
        q, k, v = case(nh, kvh, n, d)
        ref[name] = run(SDPBackend.MATH, q.float(), k.float(), v.float(), causal)
        for b in (SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION):
            o = run(b, q, k, v, causal)
            err = ((o.float() - ref[name]).norm() / ref[name].norm()).item()
            print(f"{name} {b.name} (built-in): {cuda_time(lambda: run(b, q, k, v, causal), iters=5):.4f} ms, "
                  f"rel {err:.2e}", flush=True)
    for impl in impls:
        try:
            A.activate_flash_attention_impl(impl)
        except Exception as e:  # noqa: BLE001 - report why this impl cannot run here
            print(f"{impl}: cannot activate: {type(e).__name__}: {str(e)[:300]}")
            continue
        for name, (nh, kvh, n, d, causal) in SHAPES.items():
            q, k, v = case(nh, kvh, n, d)
            try:
                o = run(SDPBackend.FLASH_ATTENTION, q, k, v, causal)
                err = ((o.float() - ref[name]).norm() / ref[name].norm()).item()
                ms = cuda_time(lambda: run(SDPBackend.FLASH_ATTENTION, q, k, v, causal), iters=5)
                print(f"{name} FLASH via {impl}: {ms:.4f} ms, rel {err:.2e}, out strides {o.stride()}", flush=True)
            except Exception as e:  # noqa: BLE001
                print(f"{name} FLASH via {impl}: failed: {type(e).__name__}: {str(e)[:300]}")


if __name__ == "__main__":
    main()
