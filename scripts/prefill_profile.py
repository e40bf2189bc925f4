"""On a GPU machine: where a prefill layer's time goes (real 235B text dims, random weights, bf16), through the
model's forward with the 'fused' layer impl (kernels.fast_forward): wall time per layer and MFU, CUDA kernel time by kernel
name, and the q/k/v stage's options (packed q/k/v GEMM; heads per program of the q/k norm + rotary kernel).

    PYTHONPATH=src python3 scripts/prefill_profile.py [--tokens 2048 8192] [--layers 2]
"""

from __future__ import annotations

import argparse
import dataclasses

import torch

from qwen_vl_distributed.kernels import decode_layer, enable_fast_paths
from qwen_vl_distributed.bench.models import default_dtype, prefill_layer_flops, randomize_
from qwen_vl_distributed.bench.timing import cuda_time, kernel_gaps, matmul_tflops, print_kernel_table
from qwen_vl_distributed.model.batch import SeqLayout
from qwen_vl_distributed.model.config import preset
from qwen_vl_distributed.model.qwen3_vl import Qwen3VLMoe
from qwen_vl_distributed.model.rope import text_rope_tables

BF16 = torch.bfloat16


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, nargs="+", default=[2048, 8192])
    ap.add_argument("--layers", type=int, default=4)
    a = ap.parse_args()
    base = preset("235b-a22b")
    cfg = dataclasses.replace(base, text=dataclasses.replace(base.text, num_hidden_layers=a.layers))
    t = cfg.text
    torch.manual_seed(0)
    torch.set_grad_enabled(False)
    with default_dtype(BF16), torch.device("cuda"):
        model = Qwen3VLMoe(cfg, layers=(0, a.layers), vision=False, embed=False, head=False).eval()
    randomize_(model, 0, t.hidden_size)
    enable_fast_paths(model)
    peak = matmul_tflops()
    print(f"matmul peak {peak:.0f} TFLOP/s")
    layer = model.model.language_model.layers["0"]
    attn = layer.self_attn
    heads_default = dict(decode_layer.QKV_POST_HEADS)
    for n in a.tokens:
        cache = model.new_cache(-(-n // 16), 16)
        x = 0.02 * torch.randn(n, t.hidden_size, device="cuda", dtype=BF16)
        pos = torch.arange(n, device="cuda").expand(3, n)
        layout = SeqLayout([list(range(cache.num_blocks))], [0], [n])
        step = lambda: model(positions=pos, layout=layout, cache=cache, hidden=x)  # noqa: E731

        def wall(label):
            ms = cuda_time(step, iters=2, reps=7, warmup=3) / a.layers
            mfu = prefill_layer_flops(cfg, n) / (ms * 1e-3) / 1e12 / peak
            print(f"{n} tokens, {label}: {ms:.3f} ms/layer, MFU {mfu:.1%}", flush=True)

        print(f"\n== {n} tokens")
        wall("default")
        # the q/k/v stage alone: projections, then the norm + rotary + cache write kernel
        xs = 0.02 * torch.randn(n, t.hidden_size, device="cuda", dtype=BF16)
        packed = torch.cat([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight])
        three = lambda: [torch.nn.functional.linear(xs, w) for w in (attn.q_proj.weight, attn.k_proj.weight,  # noqa: E731
                                                                     attn.v_proj.weight)]
        print(f"q/k/v GEMMs: three {cuda_time(three):.4f} ms, packed one "
              f"{cuda_time(lambda: torch.nn.functional.linear(xs, packed)):.4f} ms")
        q, k, v = torch.nn.functional.linear(xs, packed).split([t.q_dim, t.kv_dim, t.kv_dim], dim=1)
        cos, sin = text_rope_tables(pos, t.head_dim, t.rope_theta, t.mrope_section, BF16)
        blocks, offsets = layout.row_tables("cuda", 16)
        qc, kc, vc = q.contiguous(), k.contiguous(), v.contiguous()
        for hb, warps in ((1, 1), (4, 4), (8, 4), (16, 4)):
            decode_layer.QKV_POST_HEADS[1 << 30] = (hb, warps)
            run = lambda: decode_layer.qkv_post(q, k, v, attn, cos, sin, cache.layer(0), blocks, offsets)  # noqa: E731
            runc = lambda: decode_layer.qkv_post(qc, kc, vc, attn, cos, sin, cache.layer(0), blocks,  # noqa: E731
                                                 offsets)
            print(f"qkv_post heads {hb} warps {warps}: packed views {1e3 * cuda_time(run):.1f} us, "
                  f"contiguous {1e3 * cuda_time(runc):.1f} us", flush=True)
        decode_layer.QKV_POST_HEADS.update(heads_default)
        old_packed = decode_layer.packed_qkv
        decode_layer.packed_qkv = lambda _attn: None
        decode_layer.QKV_POST_HEADS[1 << 30] = (1, 1)
        wall("three q/k/v GEMMs, one head per program")
        decode_layer.packed_qkv = old_packed
        decode_layer.QKV_POST_HEADS.update(heads_default)
        wall("default again")
        total = print_kernel_table(step, top=16)
        print(f"kernel time per layer {total / a.layers:.3f} ms")
        g = kernel_gaps(step, calls=4, top=12)
        print(f"4 back-to-back steps: kernels busy {g['busy_ms']:.3f} ms of a {g['span_ms']:.3f} ms span "
              f"({g['busy_ms'] / (4 * a.layers):.3f} ms/layer busy); idle by kernel pair (us, count, before, after):")
        for gap in g["gaps_us"]:
            print("   ", gap)


if __name__ == "__main__":
    main()
