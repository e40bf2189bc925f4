"""Helpers for the checkpoint tests: small configs, stage models, and surgery on written checkpoints."""

from __future__ import annotations

import dataclasses
import json
import os

import torch
from safetensors.torch import load_file, save_file

from qwen_vl_distributed.checkpoint.index import INDEX_NAME
from qwen_vl_distributed.model.config import ModelConfig, preset
from qwen_vl_distributed.model.qwen3_vl import Qwen3VLMoe

L = "model.language_model.layers."


def small_cfg(vocab: int = 512, **text) -> ModelConfig:
    """The tiny preset with a small vocabulary and I = 32, so H (64) = 2I: gate_up_proj alone cannot tell the fused
    orientation, down_proj must decide it."""
    base = preset("tiny")
    text = {"moe_intermediate_size": 32, "num_hidden_layers": 4, **text}   # pinned: the tests count layers
    return dataclasses.replace(base, text=dataclasses.replace(base.text, vocab_size=vocab, **text))


def odd_cfg(block: tuple[int, int] | None = None) -> ModelConfig:
    """H != 2I and an expert width (24) that is not a multiple of a 16-wide fp8 block: partial edge blocks."""
    cfg = small_cfg(moe_intermediate_size=24)
    if block is not None:
        from qwen_vl_distributed.model.config import QuantizationConfig
        cfg = dataclasses.replace(cfg, quantization=QuantizationConfig(weight_block_size=block))
    return cfg


def stage_model(cfg: ModelConfig, layers=None, vision=True, embed=True, head=True) -> Qwen3VLMoe:
    with torch.device("meta"):
        return Qwen3VLMoe(cfg, layers=layers, vision=vision, embed=embed, head=head)


def index(d) -> dict:
    with open(os.path.join(d, INDEX_NAME)) as f:
        return json.load(f)


def shard_of(d, key: str) -> str:
    return os.path.join(d, index(d)["weight_map"][key])


def edit_shard(d, key: str, fn) -> str:
    """Rewrite the shard holding ``key``: fn(dict of its tensors) edits it in place; the index follows. Returns the
    shard path."""
    path = shard_of(d, key)
    tensors = load_file(path)
    fn(tensors)
    save_file(tensors, path, metadata={"format": "pt"})
    idx = index(d)
    file = os.path.basename(path)
    idx["weight_map"] = {k: v for k, v in idx["weight_map"].items() if v != file}
    idx["weight_map"].update({k: file for k in tensors})
    with open(os.path.join(d, INDEX_NAME), "w") as f:
        json.dump(idx, f)
    return path


def edit_config(d, fn) -> str:
    path = os.path.join(d, "config.json")
    with open(path) as f:
        c = json.load(f)
    fn(c)
    with open(path, "w") as f:
        json.dump(c, f)
    return path


def logits(model: Qwen3VLMoe, ids: list[int]) -> torch.Tensor:
    from paged import prompt_cache

    t = len(ids)
    pos = torch.arange(t).expand(3, t)
    cache, layout = prompt_cache(model, t)
    return model(positions=pos, layout=layout, cache=cache, input_ids=torch.tensor(ids), logits_rows=list(range(t)))
