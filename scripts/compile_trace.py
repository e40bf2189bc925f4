"""Which Triton kernels compile when, over the phases of ``qwen-vl bench-pipeline`` (S = 1, one process).

A fresh Triton cache (TRITON_CACHE_DIR under $OUT or a temp dir) so every compile shows; each phase prints its wall
time and the kernels compiled in it, with the argument types Triton specialised on (an int that is 1, or a
multiple of 16, gets its own compile). Usage on a GPU machine:

    PYTHONPATH=src python3 scripts/compile_trace.py --layers 4 [--json OUT.json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

os.environ["TRITON_CACHE_DIR"] = tempfile.mkdtemp(prefix="triton-trace-", dir=os.environ.get("OUT"))

import torch  # noqa: E402
import triton  # noqa: E402

from qwen_vl_distributed.cli.bench_pipeline import _run_batch  # noqa: E402
from qwen_vl_distributed.engine.build import RunOptions, start_engine  # noqa: E402

EVENTS: list[dict] = []


def _hook(**kw):
    EVENTS.append({"t": time.perf_counter(), "kernel": str(kw.get("repr"))})
    return None  # go on and compile


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--preset", default="235b-a22b")
    ap.add_argument("--prompt-len", type=int, default=256)
    ap.add_argument("--sequences", type=int, default=8)
    ap.add_argument("--json", default=None)
    ap.add_argument("--no-cudnn", action="store_true", help="also run two phases with cuDNN attention disabled")
    args = ap.parse_args()
    if hasattr(triton, "knobs"):
        triton.knobs.runtime.jit_cache_hook = _hook
    else:
        print("this triton has no jit_cache_hook: phase times only", file=sys.stderr)
    opts = RunOptions(model=None, stages=1, device="cuda", dtype="bfloat16", max_batch=args.sequences,
                      max_len=args.prompt_len + 64 + 8, quiet=True, random_preset=args.preset,
                      random_layers=args.layers)
    phases = []

    def phase(name, fn):
        start, n0 = time.perf_counter(), len(EVENTS)
        out = fn()
        torch.cuda.synchronize()
        phases.append({"phase": name, "wall_s": round(time.perf_counter() - start, 3),
                       "compiled": [e["kernel"][:400] for e in EVENTS[n0:]]})
        p = phases[-1]
        print(f"{name}: {p['wall_s']} s, {len(p['compiled'])} compiles", flush=True)
        for k in p["compiled"]:
            print("   ", k[:300], flush=True)
        return out

    handle = phase("start (load, graph capture)", lambda: start_engine(opts))
    try:
        eng = handle.engine
        n, plen = args.sequences, args.prompt_len
        phase(f"warm-up: {n} x {plen} tokens, 4 new", lambda: _run_batch(eng, n, plen, 4, seed=1))
        phase(f"one sequence of {plen}, 64 new", lambda: _run_batch(eng, 1, plen, 64, seed=2))
        phase(f"one sequence of {plen - 19}, 8 new", lambda: _run_batch(eng, 1, plen - 19, 8, seed=4))
        phase(f"{n} x {plen}, 64 new", lambda: _run_batch(eng, n, plen, 64, seed=3))
        phase("3 x 100, 8 new", lambda: _run_batch(eng, 3, 100, 8, seed=5))
        # new chunk shapes (prefix + chunk lengths) without new kernels: what a first-seen shape costs elsewhere
        phase(f"{n} x {plen - 6}, 4 new", lambda: _run_batch(eng, n, plen - 6, 4, seed=6))
        phase(f"{n} x {plen - 6}, 4 new, again", lambda: _run_batch(eng, n, plen - 6, 4, seed=7))
        phase(f"{n} x {plen - 13}, 4 new", lambda: _run_batch(eng, n, plen - 13, 4, seed=10))
        if args.no_cudnn:
            torch.backends.cuda.enable_cudnn_sdp(False)
            phase(f"{n} x {plen - 11}, 4 new, no cuDNN", lambda: _run_batch(eng, n, plen - 11, 4, seed=8))
            phase(f"{n} x {plen - 11}, 4 new, no cuDNN, again", lambda: _run_batch(eng, n, plen - 11, 4, seed=9))
    finally:
        handle.close()
    if args.json:
        with open(args.json, "w") as f:
            json.dump(phases, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
