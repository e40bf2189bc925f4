"""Tile shapes of the Triton attention over the KV cache (kernels/extend_attention.py) against SDPA (cuDNN first),
at the 235B's attention shape (64 query heads, 4 kv heads, head_dim 128, bf16): whole prompts, chunks after a
cached prefix, and a mixed step (8 decode rows plus a 512-row chunk). Usage on a GPU machine:

    PYTHONPATH=src python3 scripts/extend_attention_probe.py

``--split``: split-KV of the decode rows of mixed steps, the shipped tiles, in shuffled blocks of 16: each step with
no split (``SplitKV(programs=0)``: one program per row block, in row order) against the shipped split and two other
grid targets, and how far each is from the unsplit output.
"""

from __future__ import annotations

import argparse
import itertools

import torch

from qwen_vl_distributed.kernels import extend_attention as ea
from qwen_vl_distributed.kernels.choices import SplitKV
from qwen_vl_distributed.kernels.attention import prefill_attention
from qwen_vl_distributed.bench.timing import cuda_time
from qwen_vl_distributed.model.batch import SeqLayout


def _paged_step(starts: list[int], lens: list[int], kvh: int, d: int, bs: int = 16):
    """k/v caches in shuffled blocks of ``bs`` holding sequences of starts + lens tokens, and the step's layout."""
    need = [-(-(a + n) // bs) for a, n in zip(starts, lens)]
    order = torch.randperm(sum(need)).tolist()
    tables = [order[sum(need[:i]):sum(need[:i + 1])] for i in range(len(need))]
    k_cache = torch.randn(sum(need), kvh, bs, d, device="cuda", dtype=torch.bfloat16)
    return k_cache, torch.randn_like(k_cache), SeqLayout(tables, starts, lens)


def split_ab() -> None:
    nh, kvh, d = 64, 4, 128
    cases = {
        "8 decode rows at 32k + a 512-row chunk after 1024": ([32768 - 1 - 97 * i for i in range(8)] + [1024],
                                                              [1] * 8 + [512]),
        "8 decode rows at 4k + a 2048-row prompt": ([4096 - 1 - 37 * i for i in range(8)] + [0], [1] * 8 + [2048]),
        "1 decode row at 32k + a 64-row chunk after 64": ([32767, 64], [1, 64]),
    }
    splits = {"no split (programs 0)": SplitKV(programs=0), "to ship (SplitKV())": SplitKV(),
              "programs 132": SplitKV(programs=132), "programs 528": SplitKV(programs=528)}
    scale = d ** -0.5
    for name, (starts, lens) in cases.items():
        k_cache, v_cache, layout = _paged_step(starts, lens, kvh, d)
        q = torch.randn(layout.num_tokens, nh, d, device="cuda", dtype=torch.bfloat16)
        whole = ea.extend_attention(q, k_cache, v_cache, layout, scale, SplitKV(programs=0))
        print(f"{name}:", flush=True)
        for label, split in splits.items():
            out = ea.extend_attention(q, k_cache, v_cache, layout, scale, split)
            err = ((out.float() - whole.float()).norm() / whole.float().norm()).item()
            ms = cuda_time(lambda: ea.extend_attention(q, k_cache, v_cache, layout, scale, split), iters=10, reps=5)
            print(f"   {label:22s} {ms:.3f} ms  rel to no split {err:.1e}", flush=True)
        del k_cache, v_cache


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--split", action="store_true", help="time split-KV of mixed steps' decode rows only")
    if parser.parse_args().split:
        split_ab()
        return
    nh, kvh, d = 64, 4, 128
    # one 8192-token block per sequence (the contiguous layout: the kernels read no block table per key)
    cases = {
        "prompt 2048": SeqLayout([[0]], [0], [2048]),
        "prompt 8192": SeqLayout([[0]], [0], [8192]),
        "chunk 2048 after 6144": SeqLayout([[0]], [6144], [2048]),
        "mixed: 8 decode rows (~4k cached) + chunk 512 after 1024": SeqLayout(
            [[i] for i in range(1, 9)] + [[0]], [4000 + 37 * i for i in range(8)] + [1024], [1] * 8 + [512]),
    }
    k_cache = torch.randn(9, kvh, 8192, d, device="cuda", dtype=torch.bfloat16)
    v_cache = torch.randn_like(k_cache)
    scale = d ** -0.5
    for name, layout in cases.items():
        q = torch.randn(layout.num_tokens, nh, d, device="cuda", dtype=torch.bfloat16)
        ref = prefill_attention(q, k_cache, v_cache, layout, scale)
        sdpa = cuda_time(lambda: prefill_attention(q, k_cache, v_cache, layout, scale), iters=3, reps=3)
        print(f"{name}: sdpa {sdpa:.3f} ms", flush=True)
        for rows, bn, warps, stages in itertools.product((64, 128), (64, 128), (4, 8), (2, 3)):
            ea.CONFIGS = {1 << 30: (rows, bn, warps, stages)}
            try:
                out = ea.extend_attention(q, k_cache, v_cache, layout, scale)
                err = ((out.float() - ref.float()).norm() / ref.float().norm()).item()
                ms = cuda_time(lambda: ea.extend_attention(q, k_cache, v_cache, layout, scale), iters=3, reps=3)
                print(f"   rows {rows:3d} bn {bn:3d} warps {warps} stages {stages}: {ms:.3f} ms  rel {err:.1e}",
                      flush=True)
            except Exception as e:  # noqa: BLE001 (a tile that does not fit: report and go on)
                print(f"   rows {rows:3d} bn {bn:3d} warps {warps} stages {stages}: {type(e).__name__}", flush=True)


if __name__ == "__main__":
    main()
