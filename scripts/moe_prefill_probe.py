"""On a GPU machine: where the prefill experts' time goes at the 235B shapes, per kernel and per tile config, next
to the two floors (reading every expert's weights once at the measured copy bandwidth; the same FLOPs as one dense
cuBLAS product).

    PYTHONPATH=src python3 scripts/moe_prefill_probe.py [--tokens 2048 8192] [--json out.json]
"""

from __future__ import annotations

import argparse
import dataclasses
import json

import torch

from qwen_vl_distributed.kernels import moe_triton as mt
from qwen_vl_distributed.bench.timing import copy_bandwidth_gbs, cuda_time, matmul_tflops

E, H, I, K = 128, 4096, 1536, 8  # 235B-A22B experts
BF16 = torch.bfloat16
BASE = mt.CONFIGS[1 << 30]
VARIANTS = {
    "default": BASE,
    "no_split": dataclasses.replace(BASE, split=False),
    "no_tma": dataclasses.replace(BASE, tma=False),
    "rows_first": dataclasses.replace(BASE, cols_first=False),
    "down_bn128": dataclasses.replace(BASE, down_bn=128),
    "bm256_bn64": dataclasses.replace(BASE, bm=256, bn=64, stages=3, down_bn=128, down_stages=3),
    "down_bn128_bk128": dataclasses.replace(BASE, down_bn=128, down_bk=128, down_stages=3),
    "down_w4_bn128": dataclasses.replace(BASE, down_bn=128, down_warps=4, down_stages=4),
    "down_s3": dataclasses.replace(BASE, down_stages=3),
    "gate_up_bn64_bk128": dataclasses.replace(BASE, bn=64, bk=128, stages=3),
    # ~96 KB of shared memory per program: two programs per SM, one's epilogue under the other's loads
    "bk32_s4": dataclasses.replace(BASE, bk=32, down_bk=32),
    "s2": dataclasses.replace(BASE, stages=2, down_stages=2),
    "bk32_s4_w4": dataclasses.replace(BASE, bk=32, down_bk=32, warps=4, down_warps=4),
}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, nargs="+", default=[2048, 8192])
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS))
    ap.add_argument("--json")
    a = ap.parse_args()
    torch.manual_seed(0)
    gate_up = torch.randn(E, 2 * I, H, device="cuda", dtype=BF16) * 0.02
    down = torch.randn(E, H, I, device="cuda", dtype=BF16) * 0.02
    copy = copy_bandwidth_gbs()
    peak = matmul_tflops()
    res = {"copy_gbs": copy, "matmul_tflops": peak, "weights_read_floor_ms": (gate_up.nbytes + down.nbytes)
           / (copy * 1e9) * 1e3, "tokens": {}}
    for t in a.tokens:
        x = torch.randn(t, H, device="cuda", dtype=BF16)
        w, ids = torch.softmax(torch.randn(t, E, device="cuda"), -1).topk(K)
        w = (w / w.sum(-1, keepdim=True)).to(BF16)
        p = t * K
        flops = 2 * p * (2 * I * H + H * I)
        xp, hp = torch.randn(p, H, device="cuda", dtype=BF16), torch.randn(p, I, device="cuda", dtype=BF16)
        dense_gu = cuda_time(lambda: xp @ gate_up[0].t(), iters=5, reps=5)
        dense_dn = cuda_time(lambda: hp @ down[0].t(), iters=5, reps=5)
        row = {"flops_floor_ms": flops / (peak * 1e12) * 1e3, "dense_cublas_ms": {"gate_up": dense_gu,
                                                                                   "down": dense_dn},
               "configs": {}}
        counts = torch.bincount(ids.flatten(), minlength=E)
        row["rows_per_expert"] = {"min": int(counts.min()), "max": int(counts.max()), "mean": p / E}
        flat = ids.reshape(-1)
        row["align_torch_ms"] = cuda_time(lambda: mt.align_torch(flat, E, BASE.bm), iters=5, reps=7)
        row["align_equals_torch"] = all(torch.equal(u, v) for u, v in zip(mt.align(ids, E, BASE.bm),
                                                                           mt.align_torch(flat, E, BASE.bm)))
        for name in a.variants:
            cfg = VARIANTS[name]
            try:
                rows, be = mt.align(ids, E, cfg.bm)
                h = mt.gate_up_pairs(x, ids.shape, rows, be, gate_up, cfg)
                r = {"align": cuda_time(lambda: mt.align(ids, E, cfg.bm), iters=5, reps=7),
                     "gate_up": cuda_time(lambda: mt.gate_up_pairs(x, ids.shape, rows, be, gate_up, cfg), iters=5, reps=7),
                     "down": cuda_time(lambda: mt.down_pairs(h, w, rows, be, down, cfg), iters=5, reps=7),
                     "total": cuda_time(lambda: mt.fused_experts(x, ids, w, gate_up, down, config=cfg), iters=5, reps=7)}
                r["tflops"] = flops / (r["total"] * 1e-3) / 1e12
            except Exception as e:  # a tile this GPU or Triton rejects
                r = {"failed": f"{type(e).__name__}: {str(e)[:200]}"}
            row["configs"][name] = r
            print(t, name, json.dumps(r), flush=True)
        res["tokens"][t] = row
    print(json.dumps(res, indent=1))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
