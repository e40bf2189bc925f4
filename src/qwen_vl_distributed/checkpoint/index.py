"""An HF checkpoint directory: config.json, and either ``model.safetensors.index.json`` + shards or one
``model.safetensors``.

Opening a checkpoint reads config.json and the index only. Shard headers are read on first use and cached, and every
shard whose bytes are touched (header or data) is recorded in ``Checkpoint.opened`` -- that is how tests (and
operators) see that a stage opened only its own shards.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

from ..model.config import ModelConfig, load_config
from .errors import CorruptFileError, CheckpointError
from .safetensors_io import ShardReader, TensorInfo, read_header

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"


@dataclass
class Checkpoint:
    """A checkpoint directory: validated config, key -> shard map, lazily read shard headers."""

    dir: str
    cfg: ModelConfig
    weight_map: dict[str, str]          # checkpoint key -> shard file name (relative to dir)
    index_path: str | None              # None for a single-file checkpoint
    opened: list[str] = field(default_factory=list)   # shard names, in the order first opened
    _headers: dict[str, dict[str, TensorInfo]] = field(default_factory=dict, repr=False)

    @property
    def config_path(self) -> str:
        return os.path.join(self.dir, "config.json")

    @property
    def source(self) -> str:
        """The file that lists the keys (index, or the single shard): what a missing-key message should name."""
        return self.index_path or os.path.join(self.dir, SINGLE_NAME)

    def files(self) -> list[str]:
        return sorted(set(self.weight_map.values()))

    def path(self, file: str) -> str:
        return os.path.join(self.dir, file)

    def header(self, file: str) -> dict[str, TensorInfo]:
        """Validated header of one shard (read once)."""
        if file not in self._headers:
            self._note_open(file)
            self._headers[file] = read_header(self.path(file), file)
        return self._headers[file]

    def info(self, key: str) -> TensorInfo:
        """Where ``key`` lives; reads the header of its shard on first use."""
        file = self.weight_map[key]
        header = self.header(file)
        if key not in header:
            raise CorruptFileError(f"{self.source}: index places tensor {key} in {file}, "
                                   f"but {self.path(file)} holds no tensor of that name")
        return header[key]

    def reader(self, file: str) -> ShardReader:
        self._note_open(file)
        return ShardReader(self.path(file))

    def _note_open(self, file: str) -> None:
        if file not in self.opened:
            self.opened.append(file)


def _read_index(path: str) -> dict[str, str]:
    try:
        with open(path, encoding="utf-8") as f:
            d = json.load(f)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CorruptFileError(f"{path}: not valid JSON ({e})") from None
    wm = d.get("weight_map") if isinstance(d, dict) else None
    if not isinstance(wm, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in wm.items()):
        raise CorruptFileError(f"{path}: no 'weight_map' object of tensor name -> shard file")
    for key, file in wm.items():
        if os.path.basename(file) != file:
            raise CorruptFileError(f"{path}: tensor {key} is placed in {file!r}, which is not a file in this directory")
    return wm


def _check_shards_exist(directory: str, index_path: str, weight_map: dict[str, str]) -> None:
    """Every shard the index names must be there: fail now rather than halfway through a 400 GB load."""
    for key, file in weight_map.items():
        if not os.path.isfile(os.path.join(directory, file)):
            raise CheckpointError(f"{index_path}: names shard {file} (holding {key}), "
                                  f"which does not exist in {directory}")


def open_checkpoint(directory: str | os.PathLike) -> Checkpoint:
    """Open a checkpoint directory: config.json (ConfigError if it is not a Qwen3-VL-MoE model) and the key map.

    Reads no tensor data, and no shard header unless the checkpoint is a single ``model.safetensors``.
    """
    directory = os.fspath(directory)
    if not os.path.isdir(directory):
        raise CheckpointError(f"{directory}: not a directory")
    cfg = load_config(directory)
    index_path = os.path.join(directory, INDEX_NAME)
    if os.path.isfile(index_path):
        wm = _read_index(index_path)
        _check_shards_exist(directory, index_path, wm)
        return Checkpoint(directory, cfg, wm, index_path)
    single = os.path.join(directory, SINGLE_NAME)
    if not os.path.isfile(single):
        raise CheckpointError(f"{directory}: no {INDEX_NAME} and no {SINGLE_NAME} (no weights in this directory)")
    ckpt = Checkpoint(directory, cfg, {}, None)
    ckpt.weight_map = {key: SINGLE_NAME for key in ckpt.header(SINGLE_NAME)}
    return ckpt
