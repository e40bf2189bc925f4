"""The MoE kernel's tile tuner: times candidate tiles on given inputs and returns the fastest, which ``qwen-vl bench``
passes on in its kernel choices (``KernelChoices.with_moe``). Run before any graph capture, never inside one and
never on the product path."""

from __future__ import annotations

import dataclasses

import torch

from ..kernels.choices import CONFIGS, MoeConfig
from ..kernels.moe_triton import ALIGN_KERNEL_MAX_PAIRS, fused_experts
from ..model.quant import ExpertScales
from .timing import cuda_time


CANDIDATES = [
    MoeConfig(bn=64, bk=128, warps=4, stages=4, down_bn=64, down_bk=128, down_warps=4, down_stages=4),
    MoeConfig(bn=64, bk=128, warps=4, stages=3, down_bn=64, down_bk=128, down_warps=4, down_stages=3),
    MoeConfig(bn=32, bk=128, warps=4, stages=4, down_bn=32, down_bk=128, down_warps=4, down_stages=4),
    MoeConfig(bn=32, bk=256, warps=4, stages=3, down_bn=64, down_bk=256, down_warps=4, down_stages=3),
    MoeConfig(bn=128, bk=128, warps=8, stages=3, down_bn=128, down_bk=128, down_warps=8, down_stages=3),
    MoeConfig(bn=64, bk=256, warps=8, stages=3, down_bn=64, down_bk=256, down_warps=8, down_stages=3),
    MoeConfig(bn=128, bk=64, warps=4, stages=5, down_bn=64, down_bk=128, down_warps=4, down_stages=4),
    MoeConfig(bn=64, bk=128, warps=4, stages=3, down_bn=64, down_bk=128, down_warps=4, down_stages=3, tma=True),
    MoeConfig(bn=32, bk=256, warps=4, stages=3, down_bn=64, down_bk=256, down_warps=4, down_stages=3, tma=True),
]

# prefill-sized P: tensor-core tiles of 64-128 tokens of one expert. The tile shapes are the ones that led on an
# H200 at 2048 and 8192 tokens among 9 measured (BM 64 and BK 128 lost by 5-30%: docs/benchmarks.md); each is
# tried in the column-first launch order with and without half tiles and TMA weight loads.
_PREFILL_TILES = [
    MoeConfig(bm=128, bn=128, bk=64, warps=8, stages=4, down_bn=256, down_bk=64, down_warps=8, down_stages=4),
    MoeConfig(bm=128, bn=128, bk=64, warps=8, stages=3, down_bn=256, down_bk=64, down_warps=8, down_stages=3),
    MoeConfig(bm=128, bn=64, bk=64, warps=8, stages=3, down_bn=128, down_bk=64, down_warps=8, down_stages=3),
    MoeConfig(bm=64, bn=64, bk=64, warps=4, stages=4, down_bn=128, down_bk=64, down_warps=4, down_stages=4),
]
PREFILL_CANDIDATES = [_PREFILL_TILES[0]] + [
    dataclasses.replace(c, cols_first=True, split=split, tma=tma)
    for c in _PREFILL_TILES for split in ((False, True) if c.bm >= 128 else (False,)) for tma in (False, True)]


# fp8 experts: the decode candidates as they are and with the weights as the MMA's first operand; prompt tiles
# unswapped (CONFIGS_FP8). A program dequantises each [BN, BK] weight tile in registers for its BM rows, so prompts
# also try tiles that spread that work over more rows (BM 256), the whole 128-column scale block per step (one
# scale load and one dequantisation pass per block) and wider down tiles, all with 8 warps; not yet timed.
_FP8_PREFILL_TILES = [
    MoeConfig(bm=128, bn=128, bk=128, warps=8, stages=2, down_bn=256, down_bk=128, down_warps=8, down_stages=2),
    MoeConfig(bm=128, bn=64, bk=128, warps=8, stages=3, down_bn=256, down_bk=128, down_warps=8, down_stages=2),
    MoeConfig(bm=256, bn=64, bk=64, warps=8, stages=3, down_bn=128, down_bk=64, down_warps=8, down_stages=3),
    MoeConfig(bm=256, bn=64, bk=128, warps=8, stages=2, down_bn=128, down_bk=128, down_warps=8, down_stages=2),
]
FP8_CANDIDATES = [dataclasses.replace(c, swap=swap) for c in CANDIDATES for swap in (False, True)]
FP8_PREFILL_CANDIDATES = [dataclasses.replace(CONFIGS[1 << 30], tma=tma, split=split)
                          for tma in (False, True) for split in (False, True)] + [
    dataclasses.replace(c, cols_first=True, split=True, tma=tma)  # unswapped: see CONFIGS_FP8
    for c in (_PREFILL_TILES[2], *_FP8_PREFILL_TILES) for tma in (False, True)]


# W8A8 experts: fp8 products want the whole 128-column group per reduction step (each step's product is scaled and
# added to the accumulator, so fewer, larger steps); decode tries the bf16 tiles and the swapped first three.
W8A8_CANDIDATES = CANDIDATES + [dataclasses.replace(c, swap=True) for c in CANDIDATES[:3]]
_W8A8_PREFILL_TILES = [
    MoeConfig(bm=128, bn=128, bk=128, warps=8, stages=3, down_bn=128, down_bk=128, down_warps=8, down_stages=3),
    MoeConfig(bm=128, bn=128, bk=128, warps=8, stages=4, down_bn=256, down_bk=128, down_warps=8, down_stages=3),
    MoeConfig(bm=64, bn=128, bk=128, warps=4, stages=4, down_bn=128, down_bk=128, down_warps=4, down_stages=4),
]
W8A8_PREFILL_CANDIDATES = [CONFIGS[1 << 30]] + [
    dataclasses.replace(c, cols_first=True, split=split, tma=True, swap=swap)
    for c in _W8A8_PREFILL_TILES for split in ((False, True) if c.bm >= 128 else (False,)) for swap in (False, True)]


def tune(x: torch.Tensor, topk_ids: torch.Tensor, topk_w: torch.Tensor, gate_up: torch.Tensor,
         down: torch.Tensor, candidates=CANDIDATES, reps: int = 20, calls: int = 10,
         scales: ExpertScales | None = None) -> tuple[MoeConfig, dict[str, float]]:
    """Time each candidate on these inputs and return (the fastest, every candidate's time): median of ``reps``
    samples of ``calls`` back-to-back calls. Decode sizes are timed as decode runs them, replayed from a CUDA graph
    (no launch gaps); prefill sizes eagerly (launch cost is noise there)."""
    times: dict = {}
    args = (x, topk_ids, topk_w, gate_up, down, scales)
    for cfg in candidates:
        try:
            times[repr(cfg)] = _time_config(args, cfg, reps, calls, topk_ids.numel() <= ALIGN_KERNEL_MAX_PAIRS)
        except Exception as e:  # a tile shape this GPU or Triton rejects (e.g. shared memory): skip it
            times[repr(cfg)] = f"failed: {type(e).__name__}: {str(e)[:160]}"
    ran = [c for c in candidates if isinstance(times[repr(c)], float)]
    if not ran:
        raise RuntimeError(f"no MoE tile configuration ran here: {times}")
    return min(ran, key=lambda c: times[repr(c)]), times


def _time_config(args, cfg: MoeConfig, reps: int, calls: int, graphed: bool) -> float:
    fused_experts(*args, cfg)
    torch.cuda.synchronize()
    run = lambda: [fused_experts(*args, cfg) for _ in range(calls)]  # noqa: E731
    if graphed:
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            run()
        run = graph.replay
    return cuda_time(run, iters=1, reps=reps, warmup=1) / calls
