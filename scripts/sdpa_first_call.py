"""Host cost of the first SDPA call per attention shape, as the prompt path calls it (kernels/attention.py):
GQA (64 query heads, 4 kv heads, head_dim 128, bf16), cuDNN first. For each kind -- a whole prompt (causal), a chunk
continuing a cached prefix (boolean mask), a decode row in a mixed step (one query, no mask) -- it times the first
call of a new shape and a second call of the same shape. Usage on a GPU machine:

    PYTHONPATH=src python3 scripts/sdpa_first_call.py
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F

from qwen_vl_distributed.kernels.attention import fast_sdpa_backends


def call(n: int, total: int, kind: str) -> float:
    q = torch.randn(1, 64, n, 128, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(1, 4, total, 128, device="cuda", dtype=torch.bfloat16)
    v = torch.randn_like(k)
    mask = None
    if kind == "chunk":
        rows = torch.arange(n, device="cuda")[:, None] + (total - n)
        mask = torch.arange(total, device="cuda")[None, :] <= rows
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    with fast_sdpa_backends():
        F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=kind == "prompt", enable_gqa=True)
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) * 1e3


def main() -> None:
    call(64, 64, "prompt")  # library loading, not per shape
    for kind, shapes in (("prompt", [(n, n) for n in (237, 238, 1000, 3001)]),
                         ("chunk", [(72, 328), (72, 329), (73, 329), (73, 330), (184, 512), (500, 2900),
                                    (501, 2901), (100, 400)]),
                         ("decode-row", [(1, 300), (1, 301), (1, 302), (1, 303), (1, 2000), (1, 2001), (1, 2002)])):
        for n, total in shapes:
            first, second = call(n, total, kind), call(n, total, kind)
            print(f"{kind:10s} q {n:5d} kv {total:5d}: first {first:8.2f} ms, again {second:6.2f} ms", flush=True)


if __name__ == "__main__":
    main()
