"""``qwen-vl worker``: one pipeline stage other than 0 (started by the driver's supervisor, not by hand)."""

from __future__ import annotations

import argparse
import signal
import sys

from ..engine.build import RunOptions, run_worker
from ..pipeline.launch import Placement
from ..pipeline.transport import StageFailure


def add_parser(sub) -> None:
    p = sub.add_parser("worker", help=argparse.SUPPRESS)
    p.add_argument("--options", required=True, help="RunOptions.to_json() of the driver")
    p.add_argument("--rank", type=int, required=True)
    p.add_argument("--world-size", type=int, required=True)
    p.add_argument("--init-method", required=True)
    p.set_defaults(run=run)


def run(args) -> int:
    # Ctrl-C reaches the whole process group, and a service manager's SIGTERM often every process of the service
    # (systemd's default); the driver decides: it drains, then sends 'stop' round the ring (or, if the pipeline is
    # broken, kills us). Exiting here at once would cut the requests the driver is letting finish and make a clean
    # shutdown look like a failed stage. We die with the driver in any case (PR_SET_PDEATHSIG).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:
        opts = RunOptions.from_json(args.options)
        where = Placement(args.rank, args.world_size, args.rank, args.world_size, args.init_method)
        return run_worker(opts, where)
    except StageFailure as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 3
