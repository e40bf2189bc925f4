"""Load one pipeline stage's parameters from a checkpoint, strictly, one tensor at a time.

Order of work: plan from headers (every check that needs no tensor data, raising the first problem), then read each
stored tensor through its shard's memmap, convert it on the way to the target device and dtype, and write it into its
parameter. At most one stored tensor (plus, for fp8, its fp32 dequantised copy) is held on the host at a time, so a
stage never materialises more than its own parameters.

A tensor-parallel rank (``shards``: parameter -> ``ParamShard``) holds parts of some parameters: the plan is made and
checked against the full parameters, then each stored tensor is read only in the slice this rank holds
(``checkpoint.shards``).
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass
from typing import Mapping, TextIO

import torch
from torch import nn

from ..model.quant import FP8_DTYPE, dequantize_blockwise
from .fp8 import SCALE_SUFFIX, Fp8Dequantize, place_scale, resident_scale_shape
from .index import Checkpoint
from .matching import Item, LoadPlan, plan_load
from .safetensors_io import ShardReader
from .shards import ParamShard, Read, shard_reads
from .spec import parts_of


@dataclass(frozen=True)
class LoadReport:
    stage_name: str
    bytes: int            # bytes read from the checkpoint (weights + fp8 scales)
    seconds: float
    files: list[str]      # shards this stage read, sorted
    tensors: int          # stored tensors read
    params: int           # parameters filled


class Progress:
    """Loading progress through tqdm: bytes done / total and the rate. On a terminal each stage's bar keeps its own
    line (``position``: the stages of one machine share the terminal); into a file or pipe, one line per stage when
    it is done, instead of a bar redrawn into the log."""

    def __init__(self, total: int, label: str, enabled: bool = True, stream: TextIO | None = None,
                 position: int = 0):
        from tqdm import tqdm

        self.stream = stream or sys.stderr
        self.enabled, self.label = enabled, label
        self.live = enabled and self.stream.isatty()
        self.bar = tqdm(total=total, desc=f"loading {label}", unit="B", unit_scale=True, file=self.stream,
                        disable=not self.live, position=position, leave=True, mininterval=0.1, dynamic_ncols=True)
        self.t0 = time.monotonic()
        self.done = 0

    def update(self, n: int) -> None:
        self.done += n
        self.bar.update(n)

    def close(self) -> None:
        self.bar.close()
        if self.enabled and not self.live:
            secs = max(time.monotonic() - self.t0, 1e-9)
            print(f"loaded {self.label}: {self.done / 1e9:.2f} GB in {secs:.1f} s ({self.done / 1e6 / secs:.1f} MB/s)",
                  file=self.stream, flush=True)


def _destination(param: torch.Tensor, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """Reuse the parameter's storage when it already is on the target device and dtype, else allocate."""
    if not param.is_meta and param.device == device and param.dtype == dtype:
        return param.data
    return torch.empty(param.shape, dtype=dtype, device=device)


def _install(module: nn.Module, name: str, value: torch.Tensor) -> None:
    owner, _, leaf = name.rpartition(".")
    mod = module.get_submodule(owner) if owner else module
    old = mod._parameters[leaf]
    if old is not None and old.data is value:
        old.requires_grad_(False)
    else:
        mod._parameters[leaf] = nn.Parameter(value, requires_grad=False)


def _fill(dst: torch.Tensor, item: Item, read: Read, reader: ShardReader, scale_reader: ShardReader | None,
          block: tuple[int, int] | None, dequantize: Fp8Dequantize, scale_dst: torch.Tensor | None) -> None:
    """Read (this rank's slice of) one stored tensor and write it into its place in ``dst`` (transposed /
    dequantised as the key map says; an fp8 parameter, ``scale_dst`` its scale, takes the stored bytes and scale as
    they are)."""
    piece = item.piece
    src = reader.read(item.info, read.src)
    if dst.device.type != "cpu":  # copy the contiguous bytes over first; transpose and convert on the device
        src = src.to(dst.device)
    if item.scale is not None:
        scale = scale_reader.read(item.scale, read.scale_src).to(dst.device)
        if scale_dst is not None:
            place_scale(scale_dst, piece.param, tuple(dst.shape), read.dst, scale, block, piece.transpose)
        else:
            src = dequantize(src.to(dst.device), scale, block, dst.dtype)
    if piece.transpose:
        src = src.transpose(-2, -1)
    dst[read.dst].copy_(src)


def _plan_reads(plan: LoadPlan, ckpt: Checkpoint, shards: Mapping[str, ParamShard]
                ) -> dict[str, list[tuple[Item, Read, int]]]:
    """Per parameter, each read of a stored tensor this rank makes and the bytes it reads (all shard boundaries
    checked before any data is read)."""
    out = {}
    for name, items in plan.items.items():
        reads = []
        for item in items:
            block = plan.fp8_block if item.scale is not None else None
            for r in shard_reads(item.piece, plan.params[name], shards.get(name), block, ckpt.path(item.info.file)):
                reads.append((item, r, _nbytes(item, r)))
        out[name] = reads
    return out


def _nbytes(item: Item, read: Read) -> int:
    """Bytes of the stored tensor (and its scale) that ``read`` takes."""
    def part(shape, index) -> float:
        if index is None:
            return 1.0
        return math.prod(len(range(*ix.indices(n))) / n if n else 1.0 for ix, n in zip(index, shape))

    total = item.info.nbytes * part(item.info.shape, read.src)
    if item.scale is not None:
        total += item.scale.nbytes * part(item.scale.shape, read.scale_src)
    return round(total)


def _run(module: nn.Module, ckpt: Checkpoint, plan: LoadPlan, reads: dict[str, list[tuple[Item, Read, int]]],
         device: torch.device, dtype: torch.dtype, bar: Progress, dequantize: Fp8Dequantize) -> int:
    params = dict(module.named_parameters())
    readers: dict[str, ShardReader] = {}

    def reader(file: str) -> ShardReader:
        if file not in readers:
            readers[file] = ckpt.reader(file)
        return readers[file]

    count = 0
    try:
        for name, todo in reads.items():
            resident = name in plan.resident
            dst = _destination(params[name], device, FP8_DTYPE if resident else dtype)
            scale_dst = _destination(params[name + SCALE_SUFFIX], device, torch.float32) if resident else None
            for item, read, nbytes in todo:
                scale_reader = reader(item.scale.file) if item.scale else None
                _fill(dst, item, read, reader(item.info.file), scale_reader, plan.fp8_block, dequantize, scale_dst)
                bar.update(nbytes)
                count += 1
            _install(module, name, dst)
            if resident:
                _install(module, name + SCALE_SUFFIX, scale_dst)
    finally:
        for r in readers.values():
            r.close()
    return count


def load_stage(module: nn.Module, ckpt: Checkpoint, device: str | torch.device = "cpu",
               dtype: torch.dtype | None = None, stage_name: str | None = None, progress: bool = True,
               progress_line: int = 0, fp8_dequantize: Fp8Dequantize = dequantize_blockwise,
               shards: Mapping[str, ParamShard] | None = None) -> LoadReport:
    """Fill every parameter of ``module`` (a stage: a contiguous range of decoder layers and optional vision tower,
    embedding, head, parameters named by their HF keys) from ``ckpt``, on ``device`` in ``dtype``.

    ``dtype`` defaults to the checkpoint's config dtype; parameters that are fp8 in ``module`` (experts after
    ``Qwen3VLMoe.keep_experts_fp8``) take the stored fp8 bytes and scales instead of being dequantised. Parameters
    may start on any device, including meta: they are replaced by loaded tensors (requires_grad off). Buffers are
    not touched. Raises a CheckpointError subclass, before reading any tensor data, for any missing, unexpected,
    mis-shaped or unconvertible tensor or config mismatch, and (``shards``: the parameters this rank holds a part
    of, in their local shapes) for a shard boundary that splits an fp8 block.
    """
    device = torch.device(device)
    dtype = dtype or getattr(torch, ckpt.cfg.torch_dtype)
    shards = shards or {}
    named = dict(module.named_parameters())
    # Experts.keep_fp8: filled as stored; their scales come with them
    resident = {n: tuple(named[n + SCALE_SUFFIX].shape) for n, p in named.items() if p.dtype == FP8_DTYPE}
    scales = {n + SCALE_SUFFIX for n in resident}
    shapes = {n: shards[n].full_shape(tuple(p.shape)) if n in shards else tuple(p.shape)
              for n, p in named.items() if n not in scales}
    parts = parts_of(shapes)
    name = stage_name or f"stage ({parts.describe()})"
    plan = plan_load(ckpt, shapes, parts, name, _full_scales(resident, shards, named, ckpt))
    plan.check()
    reads = _plan_reads(plan, ckpt, shards)
    nbytes = sum(n for todo in reads.values() for _, _, n in todo)
    t0 = time.monotonic()
    bar = Progress(nbytes, name, enabled=progress, position=progress_line)
    count = _run(module, ckpt, plan, reads, device, dtype, bar, fp8_dequantize)
    bar.close()
    files = sorted({item.info.file for todo in reads.values() for item, _, _ in todo})
    return LoadReport(name, nbytes, time.monotonic() - t0, files, count, len(plan.items))


def _full_scales(resident: dict[str, tuple], shards: Mapping[str, ParamShard], named: dict, ckpt: Checkpoint
                 ) -> dict[str, tuple]:
    """The scale shapes the plan checks against the config's block: a sharded parameter's local scale stands for
    the full parameter's when it is what the config's blocks give for the local weight."""
    q = ckpt.cfg.quantization
    out = dict(resident)
    for n in resident.keys() & shards.keys():
        if q is not None and resident[n] == resident_scale_shape(n, tuple(named[n].shape), q.weight_block_size):
            out[n] = resident_scale_shape(n, shards[n].full_shape(tuple(named[n].shape)), q.weight_block_size)
    return out
