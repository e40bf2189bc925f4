"""``qwen-vl inspect DIR|ORG/NAME [--revision R] [--stages S] [--json]``: describe a checkpoint from its headers
(reads no tensor data)."""

from __future__ import annotations

import argparse
import json


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("inspect", help="describe a checkpoint directory (headers only)")
    p.add_argument("dir", metavar="DIR|ORG/NAME",
                   help="HF checkpoint directory (config.json + safetensors), Hugging Face cache folder or hub repo id")
    p.add_argument("--revision", default=None, help="branch, tag or commit of a hub repo id (default: main)")
    p.add_argument("--stages", type=int, default=1, help="show bytes per stage of a plan with S stages (default 1)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from ..checkpoint.hub import resolve_model
    from ..checkpoint.index import open_checkpoint
    from ..checkpoint.inspect import format_report, inspect_checkpoint
    from ..checkpoint.spec import StageParts
    from ..pipeline.plan import plan_stages

    path = resolve_model(args.dir, args.revision).path
    cfg = open_checkpoint(path).cfg
    dtype = "fp8" if cfg.quantization else {"float32": "fp32"}.get(cfg.torch_dtype, "bf16")  # the weights as stored
    plan = plan_stages(cfg, args.stages, dtype=dtype, require_fit=False)
    parts = [StageParts((s.start, s.stop), s.holds_vision, s.holds_embed, s.holds_head) for s in plan.stages]
    report = inspect_checkpoint(path, parts)
    print(json.dumps(report, indent=2) if args.json else format_report(report))
    return 0
