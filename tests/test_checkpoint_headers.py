"""Forged or corrupt safetensors headers end in one CorruptFileError line, never a traceback or aliased tensors."""

from __future__ import annotations

import json
import struct

import pytest

from qwen_vl_distributed.checkpoint.errors import CorruptFileError
from qwen_vl_distributed.checkpoint.safetensors_io import read_header


def _write(path, header, data_len: int) -> str:
    raw = json.dumps(header).encode() if not isinstance(header, bytes) else header
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + b"\0" * data_len)
    return str(path)


@pytest.mark.parametrize("header,data_len,message", [
    ({"a": {"dtype": ["F32"], "shape": [2], "data_offsets": [0, 8]}}, 8, "tensor a: unknown dtype ['F32']"),
    ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
      "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}, 12, "tensors a and b overlap in the data region"),
    (b"[" * 100000 + b"]" * 100000, 0, "header JSON is nested too deeply"),
])
def test_corrupt_headers(tmp_path, header, data_len, message):
    path = _write(tmp_path / "x.safetensors", header, data_len)
    with pytest.raises(CorruptFileError) as e:
        read_header(path)
    assert str(e.value) == f"{path}: corrupt safetensors file: {message}"
