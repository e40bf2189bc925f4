"""3-D (t, h, w) position ids for M-RoPE.

Walk a prompt's tokens in runs of one type (0 text, 1 image placeholder, 2 video placeholder), keeping a cursor:
- a text run of n tokens gets cursor .. cursor+n-1 on all three axes; cursor += n;
- a visual run is one image or ONE video frame (videos are split into per-frame grids: frames are separated by
  their timestamp text), merged grid lh x lw: token (r, c) gets (cursor, cursor + r, cursor + c);
  cursor += max(lh, lw).
rope_delta = max position + 1 - number of tokens. A token at absolute index n decoded later (no new visual tokens)
gets n + rope_delta on every axis -- whatever its id, even <|image_pad|>.
"""

from __future__ import annotations

from typing import Sequence

import torch

TEXT, IMAGE, VIDEO = 0, 1, 2


def token_types(input_ids: Sequence[int], image_token_id: int, video_token_id: int) -> list[int]:
    """Types of a PROMPT's tokens (placeholders are only recognised in prompts, never in generated text)."""
    return [IMAGE if t == image_token_id else VIDEO if t == video_token_id else TEXT for t in input_ids]


def _runs(types: Sequence[int]) -> list[tuple[int, int, int]]:
    runs: list[tuple[int, int, int]] = []
    start = 0
    for i in range(1, len(types) + 1):
        if i == len(types) or types[i] != types[start]:
            runs.append((types[start], start, i))
            start = i
    return runs


def rope_positions(types: Sequence[int], image_grid_thw: Sequence[Sequence[int]] | None,
                   video_grid_thw: Sequence[Sequence[int]] | None, merge: int) -> tuple[torch.Tensor, int]:
    """Positions [3, L] (long) and rope_delta for one unpadded prompt."""
    grids = {IMAGE: iter([tuple(g) for g in image_grid_thw or []]),
             VIDEO: iter([(1, h, w) for t, h, w in (video_grid_thw or []) for _ in range(t)])}
    pos = torch.empty(3, len(types), dtype=torch.long)
    cur = 0
    for kind, a, b in _runs(types):
        if kind == TEXT:
            pos[:, a:b] = torch.arange(cur, cur + b - a)
            cur += b - a
            continue
        name = "image" if kind == IMAGE else "video frame"
        try:
            _, gh, gw = next(grids[kind])
        except StopIteration:
            raise ValueError(f"more {name} placeholder runs in the prompt than {name} grids") from None
        lh, lw = gh // merge, gw // merge
        if b - a != lh * lw:
            raise ValueError(f"{name} placeholder run of {b - a} tokens does not match its grid "
                             f"({lh}x{lw} = {lh * lw} merged tokens)")
        r = torch.arange(lh).repeat_interleave(lw)
        c = torch.arange(lw).repeat(lh)
        pos[0, a:b] = cur
        pos[1, a:b] = cur + r
        pos[2, a:b] = cur + c
        cur += max(lh, lw)
    for kind, it in grids.items():
        if next(it, None) is not None:
            raise ValueError(f"more {'image' if kind == IMAGE else 'video frame'} grids than placeholder runs")
    delta = int(pos.max()) + 1 - len(types) if len(types) else 0
    return pos, delta


def batch_rope_positions(input_ids: torch.Tensor, attention_mask: torch.Tensor | None, image_token_id: int,
                         video_token_id: int, image_grid_thw, video_grid_thw, merge: int
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded batch [B, L] -> positions [3, B, L] (0 at padding) and rope deltas [B]; images and videos are
    consumed in row order, as the processor lists them."""
    b, l = input_ids.shape
    mask = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
    out = torch.zeros(3, b, l, dtype=torch.long)
    deltas = []
    img = [tuple(g) for g in (image_grid_thw.tolist() if torch.is_tensor(image_grid_thw) else image_grid_thw or [])]
    vid = [tuple(g) for g in (video_grid_thw.tolist() if torch.is_tensor(video_grid_thw) else video_grid_thw or [])]
    for row in range(b):
        ids = input_ids[row][mask[row]].tolist()
        types = token_types(ids, image_token_id, video_token_id)
        n_img = sum(1 for k, _, _ in _runs(types) if k == IMAGE)
        n_vid_frames = sum(1 for k, _, _ in _runs(types) if k == VIDEO)
        vids = []
        while n_vid_frames > 0:
            vids.append(vid.pop(0))
            n_vid_frames -= vids[-1][0]
        pos, delta = rope_positions(types, img[:n_img], vids, merge)
        img = img[n_img:]
        out[:, row, mask[row]] = pos
        deltas.append(delta)
    return out, torch.tensor(deltas)


def visual_items(types: Sequence[int], image_grid_thw: Sequence[Sequence[int]] | None,
                 video_grid_thw: Sequence[Sequence[int]] | None) -> list[tuple[int, int, int, tuple, int]]:
    """The units a prompt may not be cut inside, in prompt order: each image, and each temporal frame of a video,
    as (kind, token start, token end, grid (t, h, w), first pixel row). The tokens [start, end) are the unit's
    placeholders; its patches are rows [row, row + t*h*w) of pixel_values (images) or pixel_values_videos (videos).
    A video frame is a unit of its own: the vision tower attends within one frame and adds no temporal position,
    so a video's frames encoded in separate steps give the same features as the whole video at once."""
    grids = {IMAGE: iter([tuple(g) for g in image_grid_thw or []]),
             VIDEO: iter([(1, h, w) for t, h, w in (video_grid_thw or []) for _ in range(t)])}
    rows = {IMAGE: 0, VIDEO: 0}
    items = []
    for kind, a, b in _runs(types):
        if kind == TEXT:
            continue
        grid = next(grids[kind])
        items.append((kind, a, b, grid, rows[kind]))
        rows[kind] += grid[0] * grid[1] * grid[2]
    return items


def decode_positions(abs_index: int, rope_delta: int, n: int = 1) -> torch.Tensor:
    """Positions [3, n] for tokens at absolute indices abs_index .. abs_index+n-1 after the prompt."""
    return (torch.arange(abs_index, abs_index + n) + rope_delta).expand(3, n).clone()
