"""Docs that name code keep naming what the code has."""

from __future__ import annotations

import pathlib
import re

from qwen_vl_distributed.cli.main import COMMANDS

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_architecture_lists_every_command():
    text = (ROOT / "docs" / "architecture.md").read_text()
    line = re.search(r"^cli/\s+qwen-vl ([^\n]*)", text, re.M)
    assert line, "docs/architecture.md: no 'cli/  qwen-vl ...' line"
    assert [c.strip() for c in line.group(1).split("|")] == list(COMMANDS)
