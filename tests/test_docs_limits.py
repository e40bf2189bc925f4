"""The table of limits in docs/server.md is ``server.limits.limits_table`` with the `serve` options' defaults.

After changing a limit, regenerate it with ``python tests/test_docs_limits.py --update``.
"""

from __future__ import annotations

import argparse
import pathlib
import re
import sys

from qwen_vl_distributed.cli.main import build_parser
from qwen_vl_distributed.server.limits import LIMITS, limits_table

DOC = pathlib.Path(__file__).resolve().parents[1] / "docs" / "server.md"
BLOCK = re.compile(r"(<!-- limits table: generated -->\n)(.*?)(<!-- end of limits table -->)", re.S)


def serve_parser() -> argparse.ArgumentParser:
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices["serve"]


def serve_defaults() -> dict:
    return {opt: a.default for a in serve_parser()._actions for opt in a.option_strings}


def test_doc_table_equals_the_code():
    shown = BLOCK.search(DOC.read_text())
    assert shown, "docs/server.md has no limits table markers"
    assert shown[2] == limits_table(serve_defaults()), "stale limits table: run tests/test_docs_limits.py --update"


def test_every_limit_option_is_in_the_table():
    group = next(g for g in serve_parser()._action_groups if g.title == "limits")
    flags = {a.option_strings[0] for a in group._group_actions}
    assert flags <= {lim.flag for lim in LIMITS}, flags - {lim.flag for lim in LIMITS}


def update() -> None:
    text = DOC.read_text()
    DOC.write_text(BLOCK.sub(lambda m: m[1] + limits_table(serve_defaults()) + m[3], text))


if __name__ == "__main__":
    if sys.argv[1:] != ["--update"]:
        sys.exit("usage: python tests/test_docs_limits.py --update")
    update()
