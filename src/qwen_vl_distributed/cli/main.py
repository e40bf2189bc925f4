"""``qwen-vl``: thin entry point. Each sub-command lives in its own module with ``add_parser`` and ``run``."""

from __future__ import annotations

import argparse
import importlib
import sys

from ..errors import UserError

# sub-command -> module under qwen_vl_distributed.cli (imported only when that command runs)
COMMANDS = {
    "generate": "generate",
    "serve": "serve",
    "plan": "plan",
    "inspect": "inspect_cmd",
    "synth": "synth",
    "bench": "bench",
    "bench-pipeline": "bench_pipeline",
    "bench-grammar": "bench_grammar",
    "bench-serve": "bench_serve",
    "demo": "demo",
    "worker": "worker",
}


def build_parser() -> argparse.ArgumentParser:
    from .. import __version__

    parser = argparse.ArgumentParser(prog="qwen-vl", description="Qwen3-VL-MoE pipeline-parallel inference")
    parser.add_argument("--version", action="version", version=f"qwen-vl {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, module in COMMANDS.items():
        try:
            mod = importlib.import_module(f"{__package__}.{module}")
        except ModuleNotFoundError as e:
            if e.name == f"{__package__}.{module}":
                continue  # command not built yet
            raise
        mod.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        rc = args.run(args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return int(rc or 0)


if __name__ == "__main__":
    sys.exit(main())
