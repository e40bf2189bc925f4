"""Where one stage's decode steps spend host and GPU time, in-process (--stages 1), on random real-size layers.

    PYTHONPATH=src python3 scripts/step_profile.py --layers 16 --sequences 8 [--fp8] [--out DIR]

Runs bench-pipeline's warm-up and throughput batches under torch.profiler and prints the ops by self CPU time and
the kernels by GPU time; the wall time of the batch against the GPU time tells how much of a step waits on the host.
"""

from __future__ import annotations

import argparse
import os
import time

import torch

from qwen_vl_distributed.cli.bench_pipeline import _run_batch
from qwen_vl_distributed.engine.build import RunOptions, start_engine


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--sequences", type=int, default=8)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--fp8", action="store_true")
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    args = ap.parse_args()
    opts = RunOptions(model=None, stages=1, device="cuda", dtype="bfloat16", max_batch=args.sequences,
                      max_len=256 + args.new_tokens + 8, quiet=True, random_preset="235b-a22b",
                      random_layers=args.layers, random_fp8=args.fp8)
    handle = start_engine(opts)
    try:
        engine = handle.engine
        _run_batch(engine, args.sequences, 256, 4, seed=1)
        _run_batch(engine, args.sequences, 256, args.new_tokens, seed=2)
        acts = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
        with torch.profiler.profile(activities=acts, with_stack=False) as prof:
            t0 = time.perf_counter()
            elapsed, seqs = _run_batch(engine, args.sequences, 256, args.new_tokens, seed=3)
        wall = time.perf_counter() - t0
    finally:
        handle.close()
    tokens = sum(len(s.output) for s in seqs)
    print(f"batch: {wall * 1e3:.1f} ms wall, {tokens} tokens, {tokens / elapsed:.1f} tokens/s (profiled)")
    ka = prof.key_averages()
    print(ka.table(sort_by="self_cpu_time_total", row_limit=40, max_name_column_width=70))
    print(ka.table(sort_by="self_device_time_total", row_limit=25, max_name_column_width=70))
    path = os.path.join(args.out, "step_trace.json")
    prof.export_chrome_trace(path)
    os.system(f"gzip -f {path}")


if __name__ == "__main__":
    main()
