"""One experts call of a 235B-sized layer, fp8 experts, 2048 tokens: each prefill tile variant against float32
products of the dequantised weights (does the tile's operand order change the rounding error?).

    PYTHONPATH=src python3 scripts/fp8_swap_check.py
"""

import dataclasses

import torch

from qwen_vl_distributed.kernels.moe_triton import CONFIGS, CONFIGS_FP8, fused_experts
from qwen_vl_distributed.model.moe import reference_experts, route
from qwen_vl_distributed.model.quant import quantize_experts


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


torch.manual_seed(0)
e, h, i, k, t = 128, 4096, 1536, 8, 2048
dev, bf = "cuda", torch.bfloat16
gate_up = (torch.randn(e, 2 * i, h, device=dev) * 0.02).to(bf)
down = (torch.randn(e, h, i, device=dev) * 0.02).to(bf)
gq, dq, scales = quantize_experts(gate_up, down, (128, 128))
deq = [scales.dequantize(j, gq, dq, bf) for j in range(e)]
gd, dd = torch.stack([p[0] for p in deq]), torch.stack([p[1] for p in deq])
del deq, gate_up, down
x = torch.randn(t, h, device=dev).to(bf)
w, ids = route(torch.randn(t, e, device=dev), k, True)
ref = reference_experts(x.float(), ids, w.float(), gd.float(), dd.float())
base = CONFIGS[1 << 30]
for name, cfg in [("bf16 tile, bf16 weights", None), ("fp8 default", CONFIGS_FP8[1 << 30])] + [
        (f"fp8 swap={sw} split={sp}", dataclasses.replace(base, swap=sw, split=sp, bk=64))
        for sw in (False, True) for sp in (False, True)]:
    if cfg is None:
        y = fused_experts(x, ids, w, gd, dd, config=base)
    else:
        y = fused_experts(x, ids, w, gq, dq, scales, config=cfg)
    print(f"{name:32s} rel vs fp32 {rel(y, ref):.3e}")
y16 = fused_experts(x, ids, w, gd, dd, config=dataclasses.replace(base, swap=True))
print(f"{'bf16 weights, swap=True':32s} rel vs fp32 {rel(y16, ref):.3e}")

# decode sizes, and W8A8 (the fp8 tiles reach the MMA as loaded): swap against not, vs float32
w8a8 = scales._replace(act_quant=True)
dec = CONFIGS_FP8[64]
for rows in (8, 32, 2048):
    xs, (ws, ids_s) = x[:rows], route(torch.randn(rows, e, device=dev), k, True)
    r32 = reference_experts(xs.float(), ids_s, ws.float(), gd.float(), dd.float())
    cfg0 = dec if rows <= 32 else dataclasses.replace(base, bk=64)
    out = {}
    for sw in (False, True):
        c = dataclasses.replace(cfg0, swap=sw)
        out[f"fp8 swap={sw}"] = rel(fused_experts(xs, ids_s, ws, gq, dq, scales, config=c), r32)
        c8 = dataclasses.replace(c, bk=128) if rows > 32 else c
        out[f"w8a8 swap={sw}"] = rel(fused_experts(xs, ids_s, ws, gq, dq, w8a8, config=c8), r32)
    out["bf16"] = rel(fused_experts(xs, ids_s, ws, gd, dd, config=cfg0), r32)
    print(rows, {n: f"{v:.3e}" for n, v in out.items()})
