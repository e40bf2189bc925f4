"""How far ``--vision-fp8`` moves the vision tower: the tower of a preset with random weights, run in bf16 and with its
block linears in fp8 (model.quant.Fp8Linear, the reference path: the GPU's computes the same products), on one image
grid; prints the relative L2 distance of the merged tokens and of each DeepStack tap, and, as the scale of bf16's
own noise, the distance of the bf16 tower from the same tower in float32. docs/parity.md records what it gave.

    PYTHONPATH=src python3 scripts/vision_fp8_error.py [--preset 235b-a22b] [--grid 24x24] [--device cpu]

Random weights are a stand-in: a real checkpoint's activations have outlier channels, which per-row scales absorb
less well, so its error can be larger; bench's vision section reports the same distance on the GPU.
"""

from __future__ import annotations

import argparse
import copy
import json

import torch

from qwen_vl_distributed.bench.models import random_vision_tower
from qwen_vl_distributed.model.config import preset


def rel(a, b) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="235b-a22b")
    ap.add_argument("--grid", default="24x24", help="patches HxW of one image (multiples of the merge size)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.set_grad_enabled(False)
    h, w = (int(v) for v in args.grid.split("x"))
    cfg = preset(args.preset)
    fp32 = random_vision_tower(cfg, args.device, torch.float32, seed=args.seed)
    bf16 = copy.deepcopy(fp32).to(torch.bfloat16)
    f8 = copy.deepcopy(bf16)
    f8.quantize_linears_fp8()
    grid = [(1, h, w)]
    px = torch.randn(h * w, cfg.vision.patch_dim, generator=torch.Generator().manual_seed(args.seed + 1))
    px = px.to(args.device)
    (o32, t32), (o16, t16), (o8, t8) = (m(px.to(dt), grid) for m, dt in
                                        ((fp32, torch.float32), (bf16, torch.bfloat16), (f8, torch.bfloat16)))
    out = {"preset": args.preset, "grid": grid, "patches": h * w, "blocks": cfg.vision.depth,
           "rel_bf16_vs_fp32": rel(o16, o32), "rel_fp8_vs_bf16": rel(o8, o16), "rel_fp8_vs_fp32": rel(o8, o32),
           "taps_rel_bf16_vs_fp32": [rel(a, b) for a, b in zip(t16, t32)],
           "taps_rel_fp8_vs_bf16": [rel(a, b) for a, b in zip(t8, t16)]}
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
