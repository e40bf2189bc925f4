"""``qwen-vl inspect DIR [--stages S] [--json]``: describe a checkpoint from its headers (reads no tensor data)."""

from __future__ import annotations

import argparse
import json


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("inspect", help="describe a checkpoint directory (headers only)")
    p.add_argument("dir", help="HF checkpoint directory (config.json + safetensors)")
    p.add_argument("--stages", type=int, default=1, help="show bytes per stage of a plan with S stages (default 1)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from ..checkpoint.index import open_checkpoint
    from ..checkpoint.inspect import format_report, inspect_checkpoint
    from ..checkpoint.spec import StageParts
    from ..pipeline.plan import plan_stages
    from .plan import default_dtype

    cfg = open_checkpoint(args.dir).cfg
    plan = plan_stages(cfg, args.stages, dtype=default_dtype(cfg), require_fit=False)
    parts = [StageParts((s.start, s.stop), s.holds_vision, s.holds_embed, s.holds_head) for s in plan.stages]
    report = inspect_checkpoint(args.dir, parts)
    print(json.dumps(report, indent=2) if args.json else format_report(report))
    return 0
