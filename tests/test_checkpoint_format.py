"""The hand-written safetensors reader/writer: compatibility with the reference library, and corrupt files."""

from __future__ import annotations

import json
import os
import struct

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from checkpoint_testlib import small_cfg, stage_model
from qwen_vl_distributed.checkpoint import errors as E
from qwen_vl_distributed.checkpoint.index import open_checkpoint
from qwen_vl_distributed.checkpoint.loader import load_stage
from qwen_vl_distributed.checkpoint.safetensors_io import ShardReader, read_header, write_safetensors
from qwen_vl_distributed.checkpoint.synth_weights import write_synthetic_weights
from qwen_vl_distributed.model.config import config_to_dict

TENSORS = {
    "a": torch.randn(3, 5),
    "b": torch.randn(7).to(torch.bfloat16),
    "c": torch.randn(2, 3).to(torch.float8_e4m3fn),
    "d": torch.arange(6, dtype=torch.int64).reshape(2, 3),
    "e": torch.randn(1, 3).to(torch.float16),
}


def test_reader_reads_reference_writer(tmp_path):
    path = tmp_path / "x.safetensors"
    save_file(TENSORS, str(path))
    header = read_header(path)
    assert {k: (i.dtype, i.shape) for k, i in header.items()} == {
        "a": ("F32", (3, 5)), "b": ("BF16", (7,)), "c": ("F8_E4M3", (2, 3)), "d": ("I64", (2, 3)), "e": ("F16", (1, 3))}
    r = ShardReader(str(path))
    for k, t in TENSORS.items():
        got = r.read(header[k])
        assert got.dtype == t.dtype and torch.equal(got.view(torch.uint8), t.view(torch.uint8))
    r.close()


def test_reference_reader_reads_our_writer(tmp_path):
    path = tmp_path / "y.safetensors"
    entries = [(k, {torch.float32: "F32", torch.bfloat16: "BF16", torch.float8_e4m3fn: "F8_E4M3",
                    torch.int64: "I64", torch.float16: "F16"}[t.dtype], tuple(t.shape)) for k, t in TENSORS.items()]
    write_safetensors(path, entries, TENSORS.values())
    with safe_open(str(path), framework="pt") as f:
        for k, t in TENSORS.items():
            assert torch.equal(f.get_tensor(k).view(torch.uint8), t.view(torch.uint8))


def test_single_file_checkpoint(tmp_path):
    """``model.safetensors`` without an index loads like a sharded one."""
    sharded, single = tmp_path / "sharded", tmp_path / "single"
    cfg = small_cfg()
    write_synthetic_weights(sharded, cfg, seed=2, shard_bytes=1 << 40)
    single.mkdir()
    os.rename(sharded / "model-00001-of-00001.safetensors", single / "model.safetensors")
    with open(single / "config.json", "w") as f:
        json.dump(config_to_dict(cfg), f)
    ckpt = open_checkpoint(single)
    assert ckpt.index_path is None and ckpt.opened == ["model.safetensors"]
    m = stage_model(cfg)
    report = load_stage(m, ckpt, progress=False)
    assert report.files == ["model.safetensors"] and report.params == len(list(m.parameters()))


@pytest.fixture
def shard(tmp_path):
    path = tmp_path / "s.safetensors"
    save_file({"w": torch.ones(64, 64), "v": torch.ones(16)}, str(path))
    return path


def test_header_length_beyond_file(shard):
    with open(shard, "r+b") as f:
        f.write(struct.pack("<Q", 10**6))
    with pytest.raises(E.CorruptFileError) as e:
        read_header(shard)
    size = os.path.getsize(shard)
    assert str(e.value) == (f"{shard}: corrupt safetensors file: header length 1000000 runs past the end of the file "
                            f"({size} bytes); truncated?")


def test_header_not_json(shard):
    with open(shard, "r+b") as f:
        f.seek(8)
        f.write(b"{not json")
    with pytest.raises(E.CorruptFileError, match=r"s\.safetensors: corrupt safetensors file: header is not valid JSON"):
        read_header(shard)


def test_truncated_data(tmp_path):
    p = tmp_path / "t.safetensors"
    write_safetensors(p, [("v", "F32", (16,)), ("w", "F32", (64, 64))], [torch.ones(16), torch.ones(64, 64)])
    data_start = read_header(p)["v"].start
    os.truncate(p, data_start + 64 + 100)                 # v intact, w cut short
    with pytest.raises(E.CorruptFileError) as e:
        read_header(p)
    assert str(e.value) == (f"{p}: corrupt safetensors file: tensor w: data_offsets [64, 16448] end beyond the end of "
                            f"the file ({data_start + 164} bytes, data region starts at {data_start}); truncated?")


def test_too_short_for_header_length(tmp_path):
    p = tmp_path / "tiny.safetensors"
    p.write_bytes(b"\x01\x02")
    with pytest.raises(E.CorruptFileError) as e:
        read_header(p)
    assert str(e.value) == f"{p}: corrupt safetensors file: file is 2 bytes, shorter than the 8-byte header length"


def test_offsets_inconsistent_with_shape(tmp_path):
    p = tmp_path / "bad.safetensors"
    raw = json.dumps({"x": {"dtype": "F32", "shape": [4], "data_offsets": [0, 12]}}).encode()
    p.write_bytes(struct.pack("<Q", len(raw)) + raw + bytes(16))
    with pytest.raises(E.CorruptFileError) as e:
        read_header(p)
    assert str(e.value) == (f"{p}: corrupt safetensors file: tensor x: data_offsets [0, 12] hold 12 bytes, but F32 [4] "
                            f"needs 16")


def test_truncated_shard_fails_at_open_of_stage_not_midway(tmp_path, monkeypatch):
    d = tmp_path / "ck"
    write_synthetic_weights(d, small_cfg(), seed=1, shard_bytes=150_000)
    ckpt = open_checkpoint(d)
    last = ckpt.path(ckpt.weight_map["lm_head.weight"])
    os.truncate(last, os.path.getsize(last) - 1)
    monkeypatch.setattr(ShardReader, "read", lambda self, info: pytest.fail("read data before validating headers"))
    with pytest.raises(E.CorruptFileError, match="end beyond the end of the file"):
        load_stage(stage_model(ckpt.cfg), ckpt, progress=False)


def test_index_not_json(tmp_path):
    d = tmp_path / "ck"
    write_synthetic_weights(d, small_cfg(), seed=1)
    (d / "model.safetensors.index.json").write_text("{")
    with pytest.raises(E.CorruptFileError, match=r"model\.safetensors\.index\.json: not valid JSON"):
        open_checkpoint(d)
