"""``qwen-vl worker``: one pipeline stage other than 0 (started by the driver's supervisor, not by hand)."""

from __future__ import annotations

import argparse
import signal
import sys

from ..engine.build import run_worker
from ..pipeline.launch import Placement
from ..pipeline.transport import StageFailure
from .options import add_run_args, run_options


def add_parser(sub) -> None:
    p = sub.add_parser("worker", help=argparse.SUPPRESS)
    add_run_args(p)
    p.add_argument("--rank", type=int, required=True)
    p.add_argument("--world-size", type=int, required=True)
    p.add_argument("--init-method", required=True)
    p.add_argument("--random-preset", default=None)
    p.add_argument("--random-layers", type=int, default=None)
    p.add_argument("--random-fp8", action="store_true")
    p.set_defaults(run=run)


def run(args) -> int:
    # Ctrl-C reaches the whole process group; the driver decides: it sends 'stop' round the ring (or, if the
    # pipeline is broken, kills us). Exiting here at once would make a clean shutdown look like a failed stage.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        opts = run_options(args)
        opts.random_preset, opts.random_layers = args.random_preset, args.random_layers
        opts.random_fp8 = args.random_fp8
        where = Placement(args.rank, args.world_size, args.rank, args.world_size, args.init_method)
        return run_worker(opts, where)
    except StageFailure as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 3
