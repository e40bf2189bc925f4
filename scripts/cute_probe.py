"""The optional CuTe-DSL kernels (kernels/cute.py) against what runs now, at the 235B shapes with random weights, in
one process: whether each package imports here, what its first call costs (the DSL compiles), its steady time and
its error.

- vision: one 1024x1024 image's attention (16 heads of 72, 4096 patches) through cuDNN SDPA, FlashAttention 4 (one
  dense call; two segments as one varlen call), and the whole tower as serving runs it (exact CUDA graph, fused
  blocks) with the default backends against "FA4" first; and the first sight of three new image sizes (eager, as
  serving runs it: cuDNN plans each new shape, as for prompts; FA4 compiles once per process);
- experts: one layer's experts call at each --tokens (128 experts, top-8, 4096 -> 1536) through the path the default
  choices dispatch (the Triton prompt tile) and quack's grouped GEMMs, with its default tile and tuned;
- prompt: causal GQA attention (64 query / 4 kv heads of 128) at each --tokens, cuDNN SDPA against FlashAttention 4.
A part that fails prints its error and the next one runs.

Usage on a GPU machine with the `hopper` extra installed (scripts/cute_wheels.sh carries it to one without network):

    PYTHONPATH=$(scripts/cute_wheels.sh path):src python3 scripts/cute_probe.py

bench's vision and prefill sections time the same choices inside whole layers (docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch
import torch.nn.functional as F

from qwen_vl_distributed.bench.timing import cuda_time
from qwen_vl_distributed.kernels import register
from qwen_vl_distributed.kernels.choices import DEFAULT, KernelChoices
from qwen_vl_distributed.kernels.cute import fa4_segment_attention, quack_experts, unavailable
from qwen_vl_distributed.kernels.grouped import fast_experts
from qwen_vl_distributed.model.config import preset
from qwen_vl_distributed.model.moe import reference_experts

BF16 = torch.bfloat16


def rel(a, b) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def first_call_s(fn) -> float:
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    return time.perf_counter() - t0


def vision(out: dict) -> None:
    from qwen_vl_distributed.bench.models import random_vision_tower
    from qwen_vl_distributed.kernels.vision_attention import _sdpa
    from qwen_vl_distributed.runtime.vision_graph import GraphedVision

    cfg = preset("235b-a22b")
    v = cfg.vision
    n, heads, d, scale = 4096, v.num_heads, v.head_dim, v.head_dim**-0.5
    qkv = torch.randn(n, 3 * heads * d, device="cuda", dtype=BF16)
    q, k, w = qkv.view(n, 3, heads, d).unbind(1)
    exact = F.scaled_dot_product_attention(*(t.float().transpose(0, 1) for t in (q, k, w)), scale=scale)
    exact = exact.transpose(0, 1)
    r = out.setdefault("vision", {})
    r["sdpa_first_call_s"] = first_call_s(lambda: _sdpa(q, k, w, scale))
    r["sdpa_ms"] = cuda_time(lambda: _sdpa(q, k, w, scale), iters=5, reps=5)
    r["sdpa_rel_vs_fp32"] = rel(_sdpa(q, k, w, scale), exact)
    why = unavailable("fa4", "cuda")
    r["fa4"] = why or "runs"
    if why is None:
        one = lambda: fa4_segment_attention(q, k, w, [0, n], scale)  # noqa: E731
        two = lambda: fa4_segment_attention(q, k, w, [0, 1000, n], scale)  # noqa: E731
        r["fa4_first_call_s"] = first_call_s(one)
        r["fa4_ms"] = cuda_time(one, iters=5, reps=5)
        r["fa4_rel_vs_fp32"] = rel(one(), exact)
        r["fa4_varlen_first_call_s"] = first_call_s(two)
        r["fa4_varlen_two_segments_ms"] = cuda_time(two, iters=5, reps=5)
    print("vision attention:", json.dumps(r), flush=True)
    tower = random_vision_tower(cfg, "cuda")
    px = torch.randn(n, v.patch_dim, device="cuda", dtype=BF16)
    grid = [(1, 64, 64)]
    orders = {"default": None}
    if why is None:
        orders["FA4"] = ("FA4", "CUDNN_ATTENTION", "FLASH_ATTENTION", "EFFICIENT_ATTENTION", "MATH")
    outs = {}
    try:
        for name, order in orders.items():
            register(KernelChoices(vision_backends=order))
            runner = GraphedVision(tower, exact_after=1)  # the exact graph from the first call
            r[f"tower_{name}_first_call_s"] = first_call_s(lambda: runner(px, grid))
            r[f"tower_{name}_graph_ms"] = cuda_time(lambda: runner(px, grid), iters=3, reps=5)
            outs[name] = runner(px, grid)[0]
            # a new image size's first sight as serving runs it (eager; cuDNN plans each new shape, FA4 does not)
            sights = GraphedVision(tower)
            for h, w in ((48, 64), (40, 56), (64, 40)):
                new = torch.randn(h * w, v.patch_dim, device="cuda", dtype=BF16)
                r.setdefault(f"tower_{name}_new_size_first_sight_s", []).append(
                    first_call_s(lambda: sights(new, [(1, h, w)])))
    finally:
        register(DEFAULT)
    if "FA4" in outs:
        r["tower_rel_fa4_vs_default"] = rel(outs["FA4"], outs["default"])
    print("vision tower:", json.dumps({k: x for k, x in r.items() if k.startswith("tower")}), flush=True)


def experts(out: dict, tokens: list[int]) -> None:
    t = preset("235b-a22b").text
    e, h, i, k = t.num_experts, t.hidden_size, t.moe_intermediate_size, t.num_experts_per_tok
    gu = (torch.randn(e, 2 * i, h, device="cuda") * h**-0.5).to(BF16)
    dn = (torch.randn(e, h, i, device="cuda") * i**-0.5).to(BF16)
    why = unavailable("quack", "cuda")
    r = out.setdefault("experts", {"quack": why or "runs"})
    for n in tokens:
        x = 0.5 * torch.randn(n, h, device="cuda", dtype=BF16)
        logits = torch.randn(n, e, device="cuda")
        wts, ids = torch.topk(torch.softmax(logits, -1), k)
        wts = (wts / wts.sum(-1, keepdim=True)).to(BF16)
        flops = 2.0 * n * k * 3 * h * i
        row = {}
        calls = {"dispatched": lambda: fast_experts(x, ids, wts, gu, dn, choices=DEFAULT)}
        if why is None:
            calls["quack"] = lambda: quack_experts(x, ids, wts, gu, dn)
            calls["quack_tuned"] = lambda: quack_experts(x, ids, wts, gu, dn, tuned=True)
        ref = reference_experts(x, ids, wts, gu, dn) if n <= 2048 else None
        for name, fn in calls.items():
            row[f"{name}_first_call_s"] = first_call_s(fn)
            ms = cuda_time(fn, iters=2, reps=7, warmup=2)
            row[f"{name}_ms"], row[f"{name}_tflops"] = ms, flops / (ms * 1e-3) / 1e12
            if ref is not None:
                row[f"{name}_rel_vs_reference"] = rel(fn(), ref)
        r[n] = row
        print(f"experts T={n}:", json.dumps(row), flush=True)


def prompt(out: dict, tokens: list[int]) -> None:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    t = preset("235b-a22b").text
    why = unavailable("fa4", "cuda")
    r = out.setdefault("prompt_attention", {"fa4": why or "runs"})
    for n in tokens:
        q = torch.randn(1, t.num_attention_heads, n, t.head_dim, device="cuda", dtype=BF16)
        k, v = (torch.randn(1, t.num_key_value_heads, n, t.head_dim, device="cuda", dtype=BF16) for _ in range(2))
        with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
            cudnn = lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)  # noqa: E731
            row = {"cudnn_first_call_s": first_call_s(cudnn), "cudnn_ms": cuda_time(cudnn, iters=3, reps=5)}
            ref = cudnn()
        if why is None:
            from flash_attn.cute import flash_attn_func

            qs, ks, vs = (x.transpose(1, 2) for x in (q, k, v))
            fa4 = lambda: flash_attn_func(qs, ks, vs, causal=True)  # noqa: E731
            row["fa4_first_call_s"] = first_call_s(fa4)
            row["fa4_ms"] = cuda_time(fa4, iters=3, reps=5)
            row["fa4_rel_vs_cudnn"] = rel(fa4()[0].transpose(1, 2), ref)
        r[n] = row
        print(f"prompt attention T={n}:", json.dumps(row), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", default="2048,8192", help="prompt lengths of the experts calls")
    ap.add_argument("--skip", default="", help="comma list of parts to skip: vision, experts, prompt")
    args = ap.parse_args()
    torch.set_grad_enabled(False)
    register()
    out = {"device": torch.cuda.get_device_name(), "torch": torch.__version__}
    tokens = [int(s) for s in args.tokens.split(",")]
    for part, fn in (("vision", lambda: vision(out)), ("experts", lambda: experts(out, tokens)),
                     ("prompt", lambda: prompt(out, tokens))):
        if part in args.skip.split(","):
            continue
        try:
            fn()
        except Exception as e:  # (a package that installed but does not run here: the other parts still do)
            out[f"{part}_failed"] = f"{type(e).__name__}: {e}"
            print(f"{part} failed: {type(e).__name__}: {e}", flush=True)
    if os.environ.get("OUT"):
        with open(os.path.join(os.environ["OUT"], "cute_probe.json"), "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
