"""Tiny models and prompts for the GPU tests: checkpoints written by HF transformers' own ``save_pretrained`` (the
pinned 5.17) in odd shapes, and the same prompts for HF and for us (token ids and pixels, no processor)."""

from __future__ import annotations

import dataclasses
import os

import torch
from safetensors.torch import load_file, save_file

from hf_oracle import hf_model
from mm_inputs import chat, image_tokens, pixels, video_tokens
from qwen_vl_distributed.engine.engine import Prompt
from qwen_vl_distributed.model.config import ModelConfig, preset

EOS = [151645, 151643]


def text_config(**fields) -> ModelConfig:
    """The tiny preset with these text fields (the vision tower's output width follows the text width)."""
    base = preset("tiny")
    text = dataclasses.replace(base.text, **fields)
    return dataclasses.replace(base, text=text, vision=dataclasses.replace(base.vision,
                                                                           out_hidden_size=text.hidden_size))


# The shapes that gave wrong tokens on an H100 (issue 16): head_dim 8 is narrower than tl.dot's smallest tile, and
# none of the widths is a power of two. Five layers: a 3 + 2 split at S = 2 (stage 0 owns the DeepStack layers).
NARROW_HEADS = text_config(head_dim=8, hidden_size=48, num_attention_heads=6, num_key_value_heads=3,
                           moe_intermediate_size=20, num_experts=12, num_experts_per_tok=3, mrope_section=(2, 1, 1),
                           num_hidden_layers=5)
# A head_dim past 16 that is not a power of two, one kv head for five query heads, top-4 of 10 experts.
ODD_HEADS = text_config(head_dim=24, hidden_size=80, num_attention_heads=5, num_key_value_heads=1,
                        moe_intermediate_size=28, num_experts=10, num_experts_per_tok=4, mrope_section=(4, 4, 4),
                        num_hidden_layers=4)
CONFIGS = {"narrow-heads": NARROW_HEADS, "odd-heads": ODD_HEADS}


def write_hf_checkpoint(cfg: ModelConfig, directory: str, released: bool = False, seed: int = 0):
    """A random HF model (hf_oracle: non-degenerate routers and norms) saved by its own ``save_pretrained``;
    returns the HF model (float32, CPU). ``released``: the experts rewritten in the official checkpoints'
    input-major orientation ([E, H, 2I], [E, I, H]) instead of transformers 5's ([E, 2I, H], [E, H, I])."""
    hf = hf_model(cfg, seed=seed)
    hf.generation_config.eos_token_id = EOS  # as the released generation_config.json has it
    hf.save_pretrained(directory)
    if released:  # (a tiny model is one file: HF shards past its max_shard_size)
        path = os.path.join(directory, "model.safetensors")
        tensors = load_file(path)
        for k in tensors:
            if k.endswith(("experts.gate_up_proj", "experts.down_proj")):
                tensors[k] = tensors[k].transpose(1, 2).contiguous()
        save_file(tensors, path, metadata={"format": "pt"})
    return hf


def prompts(cfg: ModelConfig) -> list[Prompt]:
    """Text, an image and a 2-frame video: each ends its user turn and opens the assistant's (thinking)."""
    pd = cfg.vision.patch_dim
    return [Prompt(chat([100, 2000, 30000, 400, 5])),
            Prompt(chat(image_tokens(8, 12) + [100, 200]), None, pixels(96, pd, 1), [(1, 8, 12)]),
            Prompt(chat(video_tokens(2, 4, 6) + [7]), None, None, None, pixels(48, pd, 2), [(2, 4, 6)])]


def hf_inputs(prompt: Prompt, device, extra: list[int] = ()) -> dict:
    """HF generate/forward keyword arguments for one of ``prompts``, followed by the ``extra`` (generated) tokens,
    which are text whatever their ids."""
    from mm_inputs import IMG, VID

    prompt_ids = torch.tensor([prompt.input_ids])
    kw = {"input_ids": torch.cat([prompt_ids, torch.tensor([list(extra)], dtype=torch.long)], 1).to(device)}
    if prompt.pixel_values is not None:
        kw.update(pixel_values=prompt.pixel_values.to(device), image_grid_thw=torch.tensor(prompt.image_grid_thw, device=device))
    if prompt.pixel_values_videos is not None:
        kw.update(pixel_values_videos=prompt.pixel_values_videos.to(device),
                  video_grid_thw=torch.tensor(prompt.video_grid_thw, device=device))
    if len(kw) > 1:
        types = (prompt_ids == IMG).int() + 2 * (prompt_ids == VID).int()
        kw["mm_token_type_ids"] = torch.cat([types, torch.zeros(1, len(extra), dtype=torch.int)], 1).to(device)
    return kw
