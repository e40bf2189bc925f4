"""``qwen-vl bench``: our fast paths and HF transformers side by side, on identical random weights, on one GPU.

Sections (``--sections``): ceilings (copy bandwidth, bf16 matmul rate), parity (kernels vs references, logits vs
HF, greedy tokens vs HF), decode (ms per layer and GB/s at each batch; ours under CUDA-graph replay), prefill (ms
per layer and MFU), vision (one image), fp8 (the layers with fp8-resident experts against the same weights
dequantised to bf16: bit equality, then decode and prefill timed), tp (only when asked: one tensor rank's shard of
the real layers at each --tensor-parallel-size, decode timed without the collectives, and a whole-model projection
with a given all-reduce latency). Decode runs over the KV cache in blocks and, in turn with it, over a contiguous
cache (what paging costs). A section that fails records its error and the others still run. Prints a table and
writes the same numbers as JSON (``--json``).
"""

from __future__ import annotations

import argparse
import json
import traceback

from ..errors import UserError
from ..pipeline.plan import DEFAULT_KV_BLOCK_SIZE


def add_parser(sub) -> None:
    p = sub.add_parser("bench", help="GPU benchmark of the fast paths against HF transformers",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="235b-a22b", help="model dimensions (default: %(default)s)")
    p.add_argument("--layers", type=int, default=4, help="decoder layers to build (default: %(default)s)")
    p.add_argument("--batches", default="1,8,32", help="decode batch sizes (default: %(default)s)")
    p.add_argument("--context", type=int, default=512, help="cached tokens per sequence at decode")
    p.add_argument("--kv-block-size", type=int, default=DEFAULT_KV_BLOCK_SIZE,
                   help="tokens per KV-cache block (default: %(default)s); the decode section also times a "
                        "contiguous cache (one block per sequence) beside it")
    p.add_argument("--prefill", default="2048,8192", help="prompt lengths for prefill (default: %(default)s)")
    p.add_argument("--image", type=int, default=1024, help="side of the square test image in pixels")
    p.add_argument("--greedy-tokens", type=int, default=16, help="greedy tokens compared with HF")
    p.add_argument("--sections", default="ceilings,parity,decode,prefill,vision,fp8",
                   help="any of ceilings, parity, decode, prefill, vision, fp8, tp (default: all but tp)")
    p.add_argument("--tensor-parallel-size", "--tp", dest="tp", default="1,2,4,8", metavar="N[,N...]",
                   help="the tp section: tensor-parallel sizes whose one-rank shard of the real layers is timed "
                        "(default: %(default)s)")
    p.add_argument("--allreduce-us", type=float, default=15.0,
                   help="the tp section's whole-model projection: one all-reduce's latency in microseconds (an "
                        "input: the section measures no collective; default %(default)s)")
    p.add_argument("--skip-hf", action="store_true", help="time only our paths (no HF model is run)")
    p.add_argument("--no-tune", action="store_true", help="use the built-in MoE tile table, do not time variants")
    p.add_argument("--json", default=None, metavar="OUT", help="write the results here")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda", help="torch device to run on (default: %(default)s)")
    p.set_defaults(run=run)


def _ints(text: str, flag: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise UserError(f"{flag} {text!r}: expected comma-separated integers") from None


def bench_options(args):
    from ..bench.runner import BenchOptions

    return BenchOptions(preset=args.preset, layers=args.layers, batches=_ints(args.batches, "--batches"),
                        context=args.context, prefill=_ints(args.prefill, "--prefill"), image=args.image,
                        greedy_tokens=args.greedy_tokens, skip_hf=args.skip_hf, tune=not args.no_tune,
                        seed=args.seed, device=args.device, tp=_ints(args.tp, "--tensor-parallel-size"),
                        allreduce_us=args.allreduce_us, kv_block_size=args.kv_block_size)


def run(args) -> int:
    import torch

    if not torch.cuda.is_available():
        raise UserError("qwen-vl bench needs a CUDA GPU (none is visible)")
    if args.layers < 1:
        raise UserError("--layers must be at least 1")
    if args.kv_block_size < 1:
        raise UserError("--kv-block-size must be at least 1")
    from ..bench.runner import Bench

    bench = Bench(bench_options(args))
    for name in args.sections.split(","):
        name = name.strip()
        if not hasattr(bench, f"section_{name}"):
            raise UserError(f"unknown section {name!r}")
        try:
            getattr(bench, f"section_{name}")()
        except Exception as e:  # keep the other sections' numbers
            bench.results.setdefault("errors", {})[name] = f"{type(e).__name__}: {e}"
            traceback.print_exc()
    bench.finish()
    print(bench.table())
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(bench.results, f, indent=2)
    return 1 if bench.results.get("errors") else 0
