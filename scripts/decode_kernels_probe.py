"""The batch-1 decode step's weight streams, one kernel at a time, for Nsight Compute: one layer of the 235B shapes
(random weights), its q/k/v GEMV, o GEMV and the experts' gate/up and down kernels with the shipped tiles, called
eagerly ``--rounds`` times (the first compiles). What each achieves against the HBM peak, its waves and occupancy
and where its warps stall say whether a stream needs more bytes in flight per SM, more programs, or another tile.
Usage on a GPU machine (~1.5 minutes; ncu flushes the caches before each kernel, so every weight comes from HBM):

    ncu --clock-control none --kernel-name regex:"_gate_up_kernel|_down_kernel|_gemv_kernel" \\
        --launch-skip 4 --launch-count 4 --section SpeedOfLight --section Occupancy --section LaunchStats \\
        --section WarpStateStats --section MemoryWorkloadAnalysis \\
        --metrics dram__bytes_read.sum,dram__bytes_read.sum.per_second,gpu__time_duration.sum \\
        env PYTHONPATH=src python3 scripts/decode_kernels_probe.py

(``--launch-skip 4`` skips the first round's four kernels, which compile.) Without ncu it prints each call's
microseconds from CUDA events, L2 flushed between calls. docs/benchmarks.md records what an H100 gave.
"""

from __future__ import annotations

import argparse

import torch

from qwen_vl_distributed.bench.runner import Bench, BenchOptions
from qwen_vl_distributed.kernels.choices import DEFAULT
from qwen_vl_distributed.kernels.decode_layer import project
from qwen_vl_distributed.kernels.moe_triton import expert_pairs
from qwen_vl_distributed.model.moe import route


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--batch", type=int, default=1)
    args = ap.parse_args()
    bench = Bench(BenchOptions(layers=1, batches=(args.batch,), skip_hf=True, tune=False))
    layer = bench.mid.model.language_model.layers["0"]
    t = bench.cfg.text
    x = torch.randn(args.batch, t.hidden_size, device=bench.dev, dtype=torch.bfloat16)
    o = torch.randn(args.batch, t.q_dim, device=bench.dev, dtype=torch.bfloat16)
    w, ids = route(layer.mlp.gate(x), t.num_experts_per_tok, t.norm_topk_prob)
    tile = DEFAULT.moe_config(ids.numel())
    attn, experts = layer.self_attn, layer.mlp.experts
    calls = {
        "qkv GEMV": lambda: project("qkv", x, attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight),
        "o GEMV": lambda: project("o", o, attn.o_proj.weight),
        "experts (gate/up + down)": lambda: expert_pairs(x, ids, w, experts.gate_up_proj, experts.down_proj, None,
                                                         tile),
    }
    print(f"batch {args.batch}; GEMV tiles {dict(DEFAULT.gemv)}; expert tile {tile}", flush=True)
    flush = torch.empty(256 << 20, dtype=torch.uint8, device=bench.dev)  # larger than any L2
    for r in range(args.rounds):
        times = {}
        for name, fn in calls.items():
            flush.zero_()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times[name] = 1e3 * start.elapsed_time(end)
        print(f"round {r}: " + ", ".join(f"{k} {v:.1f} us" for k, v in times.items()), flush=True)


if __name__ == "__main__":
    main()
