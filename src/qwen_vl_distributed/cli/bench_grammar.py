"""``qwen-vl bench-grammar``: a decode step with and without a grammar per sequence (structured output's cost),
at each batch size, on random weights (bench/grammar.py)."""

from __future__ import annotations

import argparse
import json

from ..errors import UserError


def add_parser(sub) -> None:
    p = sub.add_parser("bench-grammar", help="decode step time with and without grammars",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="235b-a22b", help="model dimensions (default: %(default)s)")
    p.add_argument("--layers", type=int, default=4, help="decoder layers to build (default: %(default)s)")
    p.add_argument("--batches", default="1,8", help="batch sizes (default: %(default)s)")
    p.add_argument("--steps", type=int, default=64, help="decode steps timed per case (default: %(default)s)")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cuda")
    p.add_argument("--json", default=None, metavar="OUT", help="write the results here")
    p.set_defaults(run=run)


def run(args) -> int:
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA device is available")
    from ..bench.grammar import mask_cost

    dtype = "bfloat16" if args.device == "cuda" else "float32"
    rows = mask_cost(args.preset, args.layers, [int(b) for b in args.batches.split(",")], args.steps, args.device,
                     dtype)
    print(f"{'batch':>5} {'grammar':>7} {'step ms':>9} {'mask fill ms':>12}")
    for r in rows:
        print(f"{r['batch']:>5} {str(r['grammar']):>7} {r['step_ms']:>9.3f} {r['mask_fill_ms']:>12.3f}")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"device": torch.cuda.get_device_name(0) if args.device == "cuda" else "cpu",
                       "preset": args.preset, "layers": args.layers, "rows": rows}, f, indent=1)
    return 0
