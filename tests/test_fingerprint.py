"""The fingerprint ranks compare before starting holds a real digest of the code, and the resolved hub revision."""

from __future__ import annotations

import os
import shutil

import qwen_vl_distributed
from qwen_vl_distributed.checkpoint.index import open_checkpoint
from qwen_vl_distributed.engine.build import RunOptions, code_digest, fingerprint, make_plan, source_digest
from synth_model import tiny_model_dir


def test_code_digest_follows_every_source_byte(tmp_path):
    copy = tmp_path / "pkg"
    shutil.copytree(os.path.dirname(qwen_vl_distributed.__file__), copy,
                    ignore=shutil.ignore_patterns("__pycache__"))
    assert source_digest(str(copy)) == code_digest()
    (copy / "__pycache__").mkdir(exist_ok=True)
    (copy / "__pycache__" / "x.cpython-311.pyc").write_bytes(b"\0")
    (copy / "notes.txt").write_text("not code")
    assert source_digest(str(copy)) == code_digest()
    path = copy / "model" / "moe.py"
    path.write_text(path.read_text() + " ")
    assert source_digest(str(copy)) != code_digest()


def test_fingerprint_holds_revision_and_code(tmp_path_factory):
    ckpt = open_checkpoint(tiny_model_dir(tmp_path_factory))
    opts = RunOptions(model=ckpt.dir, revision="0123abcd")
    fp = fingerprint(ckpt, make_plan(ckpt.cfg, opts), opts)
    assert fp["revision"] == "0123abcd" and fp["code"] == code_digest()
    plain = RunOptions(model=ckpt.dir)
    assert fingerprint(ckpt, make_plan(ckpt.cfg, plain), plain)["revision"] == "-"
