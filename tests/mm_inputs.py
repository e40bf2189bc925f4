"""Hand-built multimodal prompts (ids + pixel values) that both HF and our model take as they are."""

from __future__ import annotations

import torch

IM_START, IM_END, NL = 151644, 151645, 198
V_START, V_END, IMG, VID = 151652, 151653, 151655, 151656
USER, ASSISTANT = 872, 77091


def chat(user_tokens: list[int]) -> list[int]:
    return [IM_START, USER, NL, *user_tokens, IM_END, NL, IM_START, ASSISTANT, NL, 151667, NL]


def image_tokens(gh: int, gw: int) -> list[int]:
    return [V_START] + [IMG] * (gh * gw // 4) + [V_END]


def video_tokens(gt: int, gh: int, gw: int) -> list[int]:
    """Release format: per temporal patch '<t seconds>' text, then start, pads, end."""
    out = []
    for k in range(gt):
        out += [27, 15 + k, 13, 20, 6486, 29] + [V_START] + [VID] * (gh * gw // 4) + [V_END]
    return out


def pixels(n_patches: int, patch_dim: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n_patches, patch_dim, generator=g) * 2 - 1
