"""The safetensors file format, read and written by hand.

Layout of a file: 8-byte little-endian header length N, N bytes of JSON header, then the data region. The header maps
each tensor name to ``{dtype, shape, data_offsets: [begin, end]}`` with offsets relative to the data region; an
optional ``__metadata__`` entry holds strings. We parse headers ourselves so that ``inspect`` and stage planning read
only the first few KB of each shard, and we read tensor data through a numpy memmap so that a stage touches only the
pages of its own tensors.
"""

from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass
from typing import Iterable, Sequence

import numpy as np
import torch

from .errors import CorruptFileError

# safetensors dtype string -> (torch dtype, bytes per element)
ST_DTYPES: dict[str, tuple[torch.dtype, int]] = {
    "F64": (torch.float64, 8),
    "F32": (torch.float32, 4),
    "F16": (torch.float16, 2),
    "BF16": (torch.bfloat16, 2),
    "F8_E4M3": (torch.float8_e4m3fn, 1),
    "F8_E5M2": (torch.float8_e5m2, 1),
    "I64": (torch.int64, 8),
    "I32": (torch.int32, 4),
    "I16": (torch.int16, 2),
    "I8": (torch.int8, 1),
    "U8": (torch.uint8, 1),
    "BOOL": (torch.bool, 1),
}
TORCH_TO_ST = {td: name for name, (td, _) in ST_DTYPES.items()}
FLOAT_DTYPES = frozenset({"F64", "F32", "F16", "BF16"})
FP8_DTYPES = frozenset({"F8_E4M3"})

# The reference implementation refuses headers above 100 MB; a larger length field means a corrupt file.
MAX_HEADER_BYTES = 100 * 1024 * 1024


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives: ``file`` (shard name relative to the checkpoint dir), absolute byte range in it."""

    name: str
    file: str
    dtype: str
    shape: tuple[int, ...]
    start: int  # absolute offset of the first byte in the file
    end: int    # absolute offset one past the last byte

    @property
    def nbytes(self) -> int:
        return self.end - self.start

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


def _corrupt(path: str, why: str) -> CorruptFileError:
    return CorruptFileError(f"{path}: corrupt safetensors file: {why}")


def _read_json_header(path: str) -> tuple[dict, int]:
    """The raw header dict and the absolute offset of the data region; checks the length field against the file."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise _corrupt(path, f"file is {size} bytes, shorter than the 8-byte header length")
        (n,) = struct.unpack("<Q", head)
        if n > MAX_HEADER_BYTES or 8 + n > size:
            raise _corrupt(path, f"header length {n} runs past the end of the file ({size} bytes); truncated?")
        raw = f.read(n)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise _corrupt(path, f"header is not valid JSON ({e})") from None
    except RecursionError:
        raise _corrupt(path, "header JSON is nested too deeply") from None
    if not isinstance(header, dict):
        raise _corrupt(path, "header is not a JSON object")
    return header, 8 + n


def _entry(path: str, file: str, name: str, e: object, data_start: int, size: int) -> TensorInfo:
    """Validate one header entry: known dtype, integer shape, offsets consistent with shape and inside the file."""
    if not isinstance(e, dict) or not {"dtype", "shape", "data_offsets"} <= e.keys():
        raise _corrupt(path, f"tensor {name}: header entry lacks dtype/shape/data_offsets")
    dtype, shape, offs = e["dtype"], e["shape"], e["data_offsets"]
    if not isinstance(dtype, str) or dtype not in ST_DTYPES:
        raise _corrupt(path, f"tensor {name}: unknown dtype {dtype!r}")
    ints = lambda xs: isinstance(xs, list) and all(isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in xs)
    if not ints(shape) or not ints(offs) or len(offs) != 2 or offs[0] > offs[1]:
        raise _corrupt(path, f"tensor {name}: bad shape {shape!r} or data_offsets {offs!r}")
    want = math.prod(shape) * ST_DTYPES[dtype][1]
    if offs[1] - offs[0] != want:
        raise _corrupt(path, f"tensor {name}: data_offsets {offs} hold {offs[1] - offs[0]} bytes, "
                             f"but {dtype} {shape} needs {want}")
    if data_start + offs[1] > size:
        raise _corrupt(path, f"tensor {name}: data_offsets {offs} end beyond the end of the file "
                             f"({size} bytes, data region starts at {data_start}); truncated?")
    return TensorInfo(name, file, dtype, tuple(shape), data_start + offs[0], data_start + offs[1])


def read_header(path: str | os.PathLike, file: str | None = None) -> dict[str, TensorInfo]:
    """Parse and validate the header of one safetensors file (reads only the header bytes).

    ``file`` is the name recorded in each TensorInfo (default: the base name of ``path``).
    """
    path = os.fspath(path)
    file = file or os.path.basename(path)
    header, data_start = _read_json_header(path)
    size = os.path.getsize(path)
    header.pop("__metadata__", None)
    infos = {name: _entry(path, file, name, e, data_start, size) for name, e in header.items()}
    _check_no_overlap(path, infos)
    return infos


def _check_no_overlap(path: str, infos: dict[str, TensorInfo]) -> None:
    """Two tensors must never share bytes (a forged or corrupt header could alias them)."""
    spans = sorted((i.start, i.end, i.name) for i in infos.values() if i.end > i.start)
    for (a0, a1, an), (b0, b1, bn) in zip(spans, spans[1:]):
        if b0 < a1:
            raise _corrupt(path, f"tensors {an} and {bn} overlap in the data region")


class ShardReader:
    """Reads tensors of one shard through a read-only memmap: only the pages of requested tensors are touched."""

    def __init__(self, path: str):
        self.path = path
        self._mm = np.memmap(path, dtype=np.uint8, mode="r")

    def read(self, info: TensorInfo, index: tuple | None = None) -> torch.Tensor:
        """A fresh CPU tensor (stored dtype) holding ``info``'s bytes, or with ``index`` (slices, one per leading
        dim) only that part of the tensor: one host copy of what is asked, never of the whole tensor."""
        torch_dtype, size = ST_DTYPES[info.dtype]
        # Byte copies through uint8 views: they work for bf16/fp8, which numpy cannot represent, and for unaligned data.
        raw = self._mm[info.start:info.end]
        if index is not None and info.nbytes:
            part = raw.reshape(*info.shape, size)[index]  # a strided view of the file: nothing is read yet
            out = torch.empty(part.shape[:-1], dtype=torch_dtype)
            out.view(torch.uint8).numpy().reshape(part.shape)[...] = part
            return out
        out = torch.empty(info.shape, dtype=torch_dtype)
        if info.nbytes:
            out.view(-1).view(torch.uint8).numpy()[:] = raw
        return out

    def close(self) -> None:
        mm, self._mm = self._mm, None
        if mm is not None and getattr(mm, "_mmap", None) is not None:
            mm._mmap.close()


# --------------------------------------------------------------------------------------------------------------------
# Writing


def _header_bytes(entries: Sequence[tuple[str, str, tuple[int, ...]]], metadata: dict[str, str] | None) -> tuple[bytes, int]:
    """JSON header padded with spaces to a multiple of 8 (so data stays aligned), and the data region size."""
    header: dict = {"__metadata__": dict(metadata or {"format": "pt"})}
    offset = 0
    for name, dtype, shape in entries:
        n = math.prod(shape) * ST_DTYPES[dtype][1]
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)
    return raw, offset


def write_safetensors(path: str | os.PathLike, entries: Sequence[tuple[str, str, tuple[int, ...]]],
                      tensors: Iterable[torch.Tensor] | None, metadata: dict[str, str] | None = None) -> int:
    """Write a safetensors file, one tensor at a time; returns the data size in bytes.

    ``entries`` is (name, safetensors dtype, shape) in file order. ``tensors`` yields the matching tensors in the same
    order; ``None`` writes a header-only file whose data region is a sparse hole of the right size (a stand-in for a
    huge checkpoint in tests: real headers, no bytes on disk).
    """
    raw, data_size = _header_bytes(entries, metadata)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        if tensors is None:
            f.truncate(8 + len(raw) + data_size)
            return data_size
        it = iter(tensors)
        for name, dtype, shape in entries:
            t = next(it)
            if tuple(t.shape) != tuple(shape) or TORCH_TO_ST.get(t.dtype) != dtype:
                raise ValueError(f"{path}: tensor {name} is {t.dtype} {list(t.shape)}, header says {dtype} {list(shape)}")
            f.write(t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().data)
    return data_size
