"""The fingerprint ranks compare before starting holds a real digest of the code, the resolved hub revision and the
process grid."""

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


def _fingerprint(ckpt, opts: RunOptions) -> dict[str, str]:
    grid = opts.grid(ckpt.cfg)
    return fingerprint(ckpt, make_plan(ckpt.cfg, opts, grid), grid, opts)


def test_fingerprint_holds_revision_code_and_grid(tmp_path_factory):
    ckpt = open_checkpoint(tiny_model_dir(tmp_path_factory))
    fp = _fingerprint(ckpt, RunOptions(model=ckpt.dir, revision="0123abcd"))
    assert fp["revision"] == "0123abcd" and fp["code"] == code_digest() and fp["grid"] == "1x1"
    plain = _fingerprint(ckpt, RunOptions(model=ckpt.dir, stages=2, tensor_parallel=2, moe_parallel="ep"))
    assert plain["revision"] == "-" and plain["grid"] == "2x2/ep"
