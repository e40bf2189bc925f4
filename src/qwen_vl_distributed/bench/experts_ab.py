"""One layer's experts call alone at prompt sizes, the fp8 paths side by side with bf16 in one run (``qwen-vl
bench`` section fp8): where the experts' share of a prefill layer goes with fp8 weights, and what W8A8's
quantisation inside the gate/up kernel (kernels.moe_triton.fused_act_quant) saves against its separate launches.
Each path runs the tile the bench's choices hold for it (tuned in this run unless --no-tune); the choices are passed
in, never changed."""

from __future__ import annotations

import dataclasses
import functools

import torch

from ..kernels.choices import KernelChoices
from ..model.moe import route
from .timing import cuda_time

_TIMER = functools.partial(cuda_time, iters=3, reps=7, warmup=2)
PATHS = ("bf16", "fp8", "w8a8_apart", "w8a8_fused", "w8a8_fused_h")


def experts_ab(bf16_model, fp8_model, choices: KernelChoices, rows: list[int], timer=_TIMER) -> dict:
    """Layer 0's experts of ``bf16_model`` (bf16 weights) and ``fp8_model`` (the fp8-resident ones) at each of
    ``rows`` tokens, one routing for all: bf16 as the fast path dispatches it (grouped GEMM or Triton, by
    ``choices.fused_max_pairs``), weight-only fp8, W8A8 with an act_quant launch before each product, W8A8
    quantising x and h inside the gate/up kernel, and W8A8 quantising only h there (x by its launch). Per size: ms
    per call, each path's speed-up over bf16, the tiles, and whether the fused W8A8 paths gave the separate one's
    bits. ``timer(fn) -> ms per call``."""
    from ..kernels.grouped import fast_experts
    from ..kernels.moe_triton import fused_experts

    bf = bf16_model.model.language_model.layers["0"].mlp
    f8 = fp8_model.model.language_model.layers["0"].mlp
    keep = f8.experts.scales._replace(act_quant=False)
    w8a8 = keep._replace(act_quant=True)
    gq, dq = f8.experts.gate_up_proj, f8.experts.down_proj
    text = bf16_model.cfg.text
    res = {}
    for n in rows:
        x = 0.02 * torch.randn(n, text.hidden_size, device=gq.device, dtype=bf.experts.gate_up_proj.dtype)
        w, ids = route(bf.gate(x), text.num_experts_per_tok, text.norm_topk_prob)
        tile8, fused = choices.moe_config(ids.numel(), keep), choices.moe_config(ids.numel(), w8a8)
        fused, apart = (dataclasses.replace(fused, fuse_act_quant=f) for f in (True, False))
        fused_h = dataclasses.replace(fused, fuse_x_quant=False)
        runs = {
            "bf16": lambda: fast_experts(x, ids, w, bf.experts.gate_up_proj, bf.experts.down_proj, choices=choices),
            "fp8": lambda: fused_experts(x, ids, w, gq, dq, keep, tile8),
            "w8a8_apart": lambda: fused_experts(x, ids, w, gq, dq, w8a8, apart),
            "w8a8_fused": lambda: fused_experts(x, ids, w, gq, dq, w8a8, fused),
            "w8a8_fused_h": lambda: fused_experts(x, ids, w, gq, dq, w8a8, fused_h),
        }
        ms = {name: timer(runs[name]) for name in PATHS}
        res[n] = {"ms": ms, "speedup_vs_bf16": {k: ms["bf16"] / v for k, v in ms.items() if k != "bf16"},
                  **{f"{k}_equal": bool(torch.equal(runs[k](), runs["w8a8_apart"]()))
                     for k in ("w8a8_fused", "w8a8_fused_h")},
                  "tiles": {"fp8": repr(tile8), "w8a8": repr(fused)}}
    return res
