"""Rotary position tables.

Text: interleaved multimodal RoPE (M-RoPE). Each token has a 3-D position (t, h, w); frequency j of the head_dim/2
frequencies reads its angle from one axis: with mrope_section (sT, sH, sW), frequency j uses H when j % 3 == 1 and
j < 3*sH, W when j % 3 == 2 and j < 3*sW, and T otherwise. For text (t == h == w) this is ordinary 1-D RoPE.

Vision: 2-D axial rotary over the full head_dim: angles [row * inv (d/4), col * inv (d/4)], duplicated to d.
"""

from __future__ import annotations

import functools

import torch


@functools.lru_cache(maxsize=16)
def mrope_axis_map(half_dim: int, section: tuple[int, int, int]) -> tuple[int, ...]:
    """For each of the head_dim/2 frequencies, which position axis (0 = T, 1 = H, 2 = W) drives it."""
    axis = [0] * half_dim
    for ax, offset in ((1, 1), (2, 2)):
        for j in range(offset, min(3 * section[ax], half_dim), 3):
            axis[j] = ax
    return tuple(axis)


@functools.lru_cache(maxsize=16)
def mrope_axis_tensor(half_dim: int, section: tuple[int, int, int], device: str) -> torch.Tensor:
    """``mrope_axis_map`` on the device, made once (``torch.tensor(..., device=cuda)`` per step waited for the GPU
    to drain). Its first call per device must not run during CUDA-graph capture."""
    return torch.tensor(mrope_axis_map(half_dim, section), device=device)


def text_inv_freq(head_dim: int, theta: float, device=None) -> torch.Tensor:
    return 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=device) / head_dim))


def text_rope_tables(positions: torch.Tensor, head_dim: int, theta: float, section: tuple[int, int, int],
                     dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """positions [3, T] (long) -> cos, sin [T, head_dim] in ``dtype`` (computed in fp32, cast like the reference)."""
    inv = text_inv_freq(head_dim, theta, positions.device)  # [D/2]
    axis = mrope_axis_tensor(head_dim // 2, tuple(section), str(positions.device))
    # angle[t, j] = positions[axis[j], t] * inv[j]
    pos = positions.float()[axis]  # [D/2, T]
    freqs = pos.transpose(0, 1) * inv  # [T, D/2]
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def vision_rope_tables(rows: torch.Tensor, cols: torch.Tensor, head_dim: int,
                       theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """rows, cols [N] patch grid coordinates -> cos, sin [N, head_dim] in fp32."""
    quarter = head_dim // 2
    inv = 1.0 / (theta ** (torch.arange(0, quarter, 2, dtype=torch.float32, device=rows.device) / quarter))
    freqs = torch.cat((rows.float()[:, None] * inv, cols.float()[:, None] * inv), dim=-1)  # [N, D/2]
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos(), emb.sin()
