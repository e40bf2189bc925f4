"""The plan tables in docs/distributed_design.md are the output of the commands written above them.

Each ```console block that starts with ``$ qwen-vl plan ...`` must equal what that command prints (stdout, then
stderr). After changing the planner, regenerate the blocks with ``python tests/test_docs_plan.py --update``.
"""

from __future__ import annotations

import contextlib
import io
import pathlib
import re
import shlex
import sys

from qwen_vl_distributed.cli.main import main

DOC = pathlib.Path(__file__).resolve().parents[1] / "docs" / "distributed_design.md"
BLOCK = re.compile(r"```console\n\$ (qwen-vl plan [^\n]*)\n(.*?)```", re.S)


def command_output(command: str) -> str:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        main(shlex.split(command)[1:])
    return out.getvalue() + err.getvalue()


def test_doc_tables_equal_command_output():
    blocks = BLOCK.findall(DOC.read_text())
    assert len(blocks) >= 6, "expected the S = 2, 4, 8 x bf16, fp8 tables"
    for command, shown in blocks:
        assert shown == command_output(command), f"stale table for `{command}`: run tests/test_docs_plan.py --update"


def update() -> None:
    text = DOC.read_text()
    DOC.write_text(BLOCK.sub(lambda m: f"```console\n$ {m[1]}\n{command_output(m[1])}```", text))


if __name__ == "__main__":
    if sys.argv[1:] != ["--update"]:
        sys.exit("usage: python tests/test_docs_plan.py --update")
    update()
