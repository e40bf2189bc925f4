"""Synthetic checkpoints: random but deterministic weights for any config, in any expert layout, optionally FP8.

Written exactly like a real HF checkpoint directory (sharded safetensors, ``model.safetensors.index.json``,
``config.json``, ``generation_config.json``), so the whole loading path runs on it. Stored tensors are derived from
the model parameters through the key map, so the three layouts of one seed hold the same model.

Each parameter's values depend only on (seed, parameter name): layouts and shard sizes do not change them.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import zlib
from typing import Iterator

import torch

from ..model.config import ModelConfig, QuantizationConfig, config_to_dict
from . import keymap
from .errors import CheckpointError
from ..model.quant import quantize_blockwise, scale_shape
from .fp8 import scale_key
from .index import INDEX_NAME
from .safetensors_io import ST_DTYPES, TORCH_TO_ST, write_safetensors
from .spec import EMBED, LAYER, Shape, param_shapes

GENERATION_CONFIG = {
    "bos_token_id": 151643,
    "eos_token_id": [151645, 151643],
    "pad_token_id": 151643,
    "do_sample": True,
    "top_k": 20,
    "top_p": 0.95,
    "temperature": 0.6,
}

_NORM_RE = re.compile(r"(norm\d?|layernorm|q_norm|k_norm)\.weight$")
_ROUTER_RE = re.compile(r"\.mlp\.gate\.weight$")
# what FP8 releases quantise: attention projections and (per-expert) expert projections
_FP8_RE = re.compile(r"\.(self_attn\.[qkvo]_proj|mlp\.experts\.\d+\.(gate|up|down)_proj)\.weight$")

def _generator(seed: int, name: str) -> torch.Generator:
    return torch.Generator().manual_seed((seed * 0x9E3779B1 + zlib.crc32(name.encode())) % 2**63)


def synthetic_param(name: str, shape: Shape, seed: int, dtype: torch.dtype) -> torch.Tensor:
    """The value of one parameter: norms 1 + 0.1 N (so they matter), routers 0.5 N (so routing is not degenerate),
    biases and matrices 0.02 N."""
    x = torch.randn(shape, generator=_generator(seed, name), dtype=torch.float32)
    if _NORM_RE.search(name):
        x = 1.0 + 0.1 * x
    elif _ROUTER_RE.search(name):
        x = 0.5 * x
    else:
        x = 0.02 * x
    return x.to(dtype)


class _Source:
    """Produces stored tensors in entry order, caching the one parameter (and quantisation) being split up."""

    def __init__(self, cfg: ModelConfig, seed: int, dtype: torch.dtype, block: tuple[int, int] | None):
        self.cfg, self.seed, self.dtype, self.block = cfg, seed, dtype, block
        self._param: tuple[str, torch.Tensor] | None = None
        self._quant: tuple[str, tuple[torch.Tensor, torch.Tensor]] | None = None

    def param(self, name: str, shape: Shape) -> torch.Tensor:
        if self._param is None or self._param[0] != name:
            self._param = (name, synthetic_param(name, shape, self.seed, self.dtype))
        return self._param[1]

    def stored(self, piece: keymap.Piece, shape: Shape) -> torch.Tensor:
        t = self.param(piece.param, shape)[piece.index]
        return (t.transpose(-2, -1) if piece.transpose else t).contiguous()

    def quantized(self, piece: keymap.Piece, shape: Shape) -> tuple[torch.Tensor, torch.Tensor]:
        if self._quant is None or self._quant[0] != piece.key:
            self._quant = (piece.key, quantize_blockwise(self.stored(piece, shape), self.block))
        return self._quant[1]


def _entries(cfg: ModelConfig, layout: str, block: tuple[int, int] | None, src: _Source | None) -> Iterator:
    """(key, dtype, shape, producer) for every stored tensor, in file order; producer() makes the tensor."""
    st = TORCH_TO_ST[getattr(torch, cfg.torch_dtype)]
    written = set()
    for name, shape in param_shapes(cfg).items():
        for piece in keymap.pieces(name, shape, layout, tied=cfg.tie_word_embeddings):
            if piece.key in written:  # a tied head is the embedding, stored once
                continue
            written.add(piece.key)
            if block is not None and _FP8_RE.search(piece.key):
                yield piece.key, "F8_E4M3", piece.stored_shape, lambda p=piece, s=shape: src.quantized(p, s)[0]
                yield (scale_key(piece.key), "F32", scale_shape(piece.stored_shape, block),
                       lambda p=piece, s=shape: src.quantized(p, s)[1])
            else:
                yield piece.key, st, piece.stored_shape, lambda p=piece, s=shape: src.stored(p, s)


def _shards(entries: list, shard_bytes: int) -> list[list]:
    """Greedy packing in order; a tensor larger than shard_bytes gets a shard of its own."""
    shards: list[list] = [[]]
    size = 0
    for e in entries:
        n = math.prod(e[2]) * ST_DTYPES[e[1]][1]
        if shards[-1] and size + n > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(e)
        size += n
    return shards


def _fp8_config(cfg: ModelConfig) -> ModelConfig:
    block = cfg.quantization.weight_block_size if cfg.quantization else (128, 128)
    keep = ["lm_head", "model.visual", EMBED.rsplit(".", 1)[0]]
    keep += [LAYER.format(i=i) + "mlp.gate" for i in range(cfg.text.num_hidden_layers)]
    return dataclasses.replace(cfg, quantization=QuantizationConfig(weight_block_size=tuple(block),
                                                                    modules_to_not_convert=tuple(keep)))


def _write_json(path: str, obj: object) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")


def _write(directory: str, cfg: ModelConfig, seed: int, layout: str, fp8: bool, shard_bytes: int,
           data: bool) -> ModelConfig:
    if layout not in keymap.LAYOUTS:
        raise CheckpointError(f"unknown expert layout {layout!r} (choose from {', '.join(keymap.LAYOUTS)})")
    if fp8 and layout != "per-expert":
        raise CheckpointError(f"fp8 checkpoints store experts per expert, as Qwen's FP8 releases do: "
                              f"use layout 'per-expert', not {layout!r}")
    cfg = _fp8_config(cfg) if fp8 else dataclasses.replace(cfg, quantization=None)
    block = tuple(cfg.quantization.weight_block_size) if fp8 else None
    os.makedirs(directory, exist_ok=True)
    src = _Source(cfg, seed, getattr(torch, cfg.torch_dtype), block) if data else None
    shards = _shards(list(_entries(cfg, layout, block, src)), shard_bytes)
    weight_map, total = {}, 0
    for k, shard in enumerate(shards, 1):
        file = f"model-{k:05d}-of-{len(shards):05d}.safetensors"
        tensors = (make() for _, _, _, make in shard) if data else None
        total += write_safetensors(os.path.join(directory, file), [e[:3] for e in shard], tensors)
        weight_map.update({e[0]: file for e in shard})
    _write_json(os.path.join(directory, INDEX_NAME), {"metadata": {"total_size": total}, "weight_map": weight_map})
    _write_json(os.path.join(directory, "config.json"),
                config_to_dict(cfg, spelling="hf" if layout == "hf" else "released"))
    _write_json(os.path.join(directory, "generation_config.json"), GENERATION_CONFIG)
    return cfg


def write_synthetic_weights(directory: str | os.PathLike, cfg: ModelConfig, seed: int = 0, layout: str = "hf",
                            fp8: bool = False, shard_bytes: int = 1 << 30) -> ModelConfig:
    """Write a random checkpoint of ``cfg`` to ``directory``; returns the config written (with its
    quantization_config when ``fp8``).

    layout: 'hf' (transformers 5.x fused experts), 'released' (official fused orientation) or 'per-expert'.
    fp8: block-quantise attention and expert projections (needs layout 'per-expert'); vision, embedding, lm_head,
    norms and routers stay in cfg.torch_dtype. The block size is cfg.quantization.weight_block_size if set, else 128.
    """
    return _write(os.fspath(directory), cfg, seed, layout, fp8, shard_bytes, data=True)


def write_header_only_checkpoint(directory: str | os.PathLike, cfg: ModelConfig, layout: str = "released",
                                 fp8: bool = False, shard_bytes: int = 5 << 30) -> ModelConfig:
    """Like write_synthetic_weights, but every shard's data region is a sparse hole: real headers and file sizes,
    no bytes on disk. For testing ``inspect`` and planning on full-size (235B) checkpoints."""
    return _write(os.fspath(directory), cfg, 0, layout, fp8, shard_bytes, data=False)


def randomize_module(module: torch.nn.Module, seed: int, device: torch.device, dtype: torch.dtype) -> None:
    """Give every parameter of ``module`` (e.g. a stage built on the meta device) a random value made directly on
    ``device``, with the scales of ``synthetic_param``. For benchmarks of real-size models, where writing and reading
    a checkpoint would cost more than the run; deterministic per (seed, name, device type)."""
    for name, p in list(module.named_parameters()):
        g = torch.Generator(device=device).manual_seed((seed * 0x9E3779B1 + zlib.crc32(name.encode())) % 2**63)
        x = torch.empty(p.shape, dtype=dtype, device=device)
        x.normal_(generator=g)
        if _NORM_RE.search(name):
            x.mul_(0.1).add_(1.0)
        else:
            x.mul_(0.5 if _ROUTER_RE.search(name) else 0.02)
        owner, _, leaf = name.rpartition(".")
        setattr(module.get_submodule(owner), leaf, torch.nn.Parameter(x, requires_grad=False))
