"""Vision tower: patch embedding, interpolated learned positions, 2-D rotary, per-item attention, DeepStack.

Shapes: N patches (all items packed), D vision hidden, C = 3*Tp*P*P pixel row (1536), M merged tokens = N / 4,
O out_hidden_size (= text hidden). Patches of each item arrive in merge-block order (t, block-row, block-col,
in-block row, in-block col); every per-patch table here is produced in that order.
"""

from __future__ import annotations

import itertools
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .config import VisionConfig
from .layers import rotate_half
from .quant import Fp8Linear
from .rope import vision_rope_tables

# The attention core of a vision block, between the qkv and output projections: 2-D rotary on q and k, then
# bidirectional attention inside each segment (one image, or one temporal slice of a video).
# name -> fn(qkv [N, 3*heads*d] (the qkv projection's output), rope (cos, sin [N, d] fp32), cu_seqlens list[int],
#            heads, scale) -> [N, heads*d]
VisionAttentionFn = Callable[[torch.Tensor, tuple[torch.Tensor, torch.Tensor], list[int], int, float], torch.Tensor]
VISION_ATTENTION_IMPLS: dict[str, VisionAttentionFn] = {}


def vision_rotary(x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """x [N, heads, d] rotated in fp32 like the reference, rounded once to x's dtype."""
    cos, sin = (t[:, None, :] for t in rope)
    xf = x.float()
    return (xf * cos + rotate_half(xf) * sin).to(x.dtype)


def reference_segment_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: list[int],
                                scale: float) -> torch.Tensor:
    """q, k, v [N, heads, d] -> [N, heads, d]: one SDPA per segment."""
    out = torch.empty_like(q)
    for a, b in zip(cu_seqlens[:-1], cu_seqlens[1:]):
        qs, ks, vs = (x[a:b].transpose(0, 1).unsqueeze(0) for x in (q, k, v))
        out[a:b] = F.scaled_dot_product_attention(qs, ks, vs, scale=scale)[0].transpose(0, 1)
    return out


def reference_vision_attention(qkv: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], cu_seqlens: list[int],
                               heads: int, scale: float) -> torch.Tensor:
    n = qkv.shape[0]
    q, k, v = qkv.view(n, 3, heads, -1).unbind(1)
    o = reference_segment_attention(vision_rotary(q, rope), vision_rotary(k, rope), v, cu_seqlens, scale)
    return o.reshape(n, -1)


VISION_ATTENTION_IMPLS["reference"] = reference_vision_attention


# ------------------------------------------------------------------------------------------------------------------
# Per-patch tables (pure functions of grid_thw)


def merge_block_coords(h: int, w: int, merge: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Row and column of every patch of an h x w grid, listed in merge-block order."""
    rows = torch.arange(h, device=device)[:, None].expand(h, w)
    cols = torch.arange(w, device=device)[None, :].expand(h, w)
    shape = (h // merge, merge, w // merge, merge)
    return (rows.reshape(shape).transpose(1, 2).flatten(), cols.reshape(shape).transpose(1, 2).flatten())


def bilinear_taps(h: int, w: int, side: int, merge: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices [h*w, 4] into the side x side table and weights [h*w, 4] (fp32), align-corners bilinear resampling."""
    rows, cols = merge_block_coords(h, w, merge, device)

    def axis(idx: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        src = idx.float() * (side - 1) / max(n - 1, 1)
        lo = src.floor()
        frac = src - lo
        lo = lo.long().clamp(0, side - 1)
        return lo, (lo + 1).clamp(max=side - 1), frac

    r0, r1, fr = axis(rows, h)
    c0, c1, fc = axis(cols, w)
    idx = torch.stack([r0 * side + c0, r0 * side + c1, r1 * side + c0, r1 * side + c1], dim=1)
    wts = torch.stack([(1 - fr) * (1 - fc), (1 - fr) * fc, fr * (1 - fc), fr * fc], dim=1)
    return idx, wts


def segment_lengths(grid_thw: list[tuple[int, int, int]]) -> list[int]:
    """The patch count of each attention segment (one per item and temporal slice), in order."""
    return [h * w for t, h, w in grid_thw for _ in range(t)]


def segment_bounds(grid_thw: list[tuple[int, int, int]]) -> list[int]:
    """cu_seqlens: the bounds of the attention segments."""
    return [0, *itertools.accumulate(segment_lengths(grid_thw))]


# ------------------------------------------------------------------------------------------------------------------
# Modules (names follow the checkpoint keys under model.visual.)


class PatchEmbed(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        k = (cfg.temporal_patch_size, cfg.patch_size, cfg.patch_size)
        self.proj = nn.Conv3d(cfg.in_channels, cfg.hidden_size, kernel_size=k, stride=k, bias=True)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        # A pixel row is laid out (C, Tp, P, P), exactly the conv kernel's input layout, so the strided conv is one
        # matmul with the flattened kernel.
        w = self.proj.weight
        return F.linear(pixels.to(w.dtype), w.reshape(w.shape[0], -1), self.proj.bias)


class VisionAttention(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.num_heads = cfg.num_heads
        self.head_dim = cfg.head_dim
        self.qkv = nn.Linear(cfg.hidden_size, 3 * cfg.hidden_size, bias=True)
        self.proj = nn.Linear(cfg.hidden_size, cfg.hidden_size, bias=True)
        self.impl = "reference"

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], cu_seqlens: list[int]) -> torch.Tensor:
        o = VISION_ATTENTION_IMPLS[self.impl](self.qkv(x), rope, cu_seqlens, self.num_heads, self.head_dim**-0.5)
        return self.proj(o)


class VisionMLP(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.linear_fc1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=True)
        self.linear_fc2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=True)
        self.approximate = "tanh" if cfg.hidden_act == "gelu_pytorch_tanh" else "none"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if isinstance(self.linear_fc2, Fp8Linear):  # the GELU where fc2 quantises its input
            return self.linear_fc2(self.linear_fc1(x), act=self.approximate)
        return self.linear_fc2(F.gelu(self.linear_fc1(x), approximate=self.approximate))


class VisionBlock(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.norm2 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.attn = VisionAttention(cfg)
        self.mlp = VisionMLP(cfg)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], cu_seqlens: list[int]) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), rope, cu_seqlens)
        return x + self.mlp(self.norm2(x))


class PatchMerger(nn.Module):
    """4 patches of one 2x2 block -> one text-width token. ``post_shuffle``: LayerNorm over the concatenated 4*D
    (DeepStack mergers) instead of per patch (main merger). GELU here is the exact erf form."""

    def __init__(self, cfg: VisionConfig, post_shuffle: bool):
        super().__init__()
        self.post_shuffle = post_shuffle
        self.merged = cfg.merged_dim
        self.norm = nn.LayerNorm(cfg.merged_dim if post_shuffle else cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.linear_fc1 = nn.Linear(cfg.merged_dim, cfg.merged_dim, bias=True)
        self.linear_fc2 = nn.Linear(cfg.merged_dim, cfg.out_hidden_size, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm(x.view(-1, self.merged)) if self.post_shuffle else self.norm(x).view(-1, self.merged)
        return self.linear_fc2(F.gelu(self.linear_fc1(x)))


BlockFn = Callable[[VisionBlock, torch.Tensor, tuple[torch.Tensor, torch.Tensor], list[int]], torch.Tensor]


class VisionTower(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.cfg = cfg
        self.patch_embed = PatchEmbed(cfg)
        self.pos_embed = nn.Embedding(cfg.num_position_embeddings, cfg.hidden_size)
        self.blocks = nn.ModuleList(VisionBlock(cfg) for _ in range(cfg.depth))
        self.merger = PatchMerger(cfg, post_shuffle=False)
        self.deepstack_merger_list = nn.ModuleList(PatchMerger(cfg, post_shuffle=True)
                                                   for _ in cfg.deepstack_visual_indexes)
        # Optional replacement of forward (kernels/: CUDA-graph replay per image shape); it calls run_layers.
        self.runner = None

    def quantize_linears_fp8(self) -> None:
        """``--vision-fp8``: every block's four linears (qkv, proj, fc1, fc2: ~98% of the tower's FLOPs) held in fp8
        with one scale per weight row and their inputs quantised per row at run time (model.quant.Fp8Linear).
        The patch embedding and the mergers stay in the model's dtype. Call it after loading."""
        for i, block in enumerate(self.blocks):
            for owner, name in ((block.attn, "qkv"), (block.attn, "proj"), (block.mlp, "linear_fc1"),
                                (block.mlp, "linear_fc2")):
                lin = getattr(owner, name)
                if not isinstance(lin, Fp8Linear):
                    part = "attn" if owner is block.attn else "mlp"
                    setattr(owner, name, Fp8Linear.from_linear(lin, f"visual.blocks.{i}.{part}.{name}"))

    @property
    def fp8_linears(self) -> bool:
        return any(isinstance(m, Fp8Linear) for m in self.modules())

    def position_tables(self, grid_thw: list[tuple[int, int, int]], device):
        """Bilinear taps/weights into pos_embed and rotary (row, col) per patch, all items packed."""
        idx, wts, rows, cols = [], [], [], []
        m, side = self.cfg.spatial_merge_size, self.cfg.pos_grid
        for t, h, w in grid_thw:
            i, wt = bilinear_taps(h, w, side, m, device)
            r, c = merge_block_coords(h, w, m, device)
            idx.append(i.repeat(t, 1))  # no temporal embedding: every slice gets the same table
            wts.append(wt.repeat(t, 1))
            rows.append(r.repeat(t))
            cols.append(c.repeat(t))
        return torch.cat(idx), torch.cat(wts), torch.cat(rows), torch.cat(cols)

    def forward(self, pixels: torch.Tensor, grid_thw: list[tuple[int, int, int]]
                ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """pixels [N, C] -> merged tokens [M, O] and one [M, O] tensor per DeepStack tap (in block order)."""
        self.check_inputs(pixels, grid_thw)
        if self.runner is not None:
            return self.runner(pixels, grid_thw)
        return self.run_layers(pixels, grid_thw)

    def check_inputs(self, pixels: torch.Tensor, grid_thw: list[tuple[int, int, int]]) -> None:
        for t, h, w in grid_thw:
            if h % self.cfg.spatial_merge_size or w % self.cfg.spatial_merge_size:
                raise ValueError(f"vision grid {h}x{w} is not a multiple of spatial_merge_size")
        expected = sum(t * h * w for t, h, w in grid_thw)
        if pixels.shape != (expected, self.cfg.patch_dim):
            raise ValueError(f"pixel_values shape {tuple(pixels.shape)} does not match grid_thw "
                             f"({expected} patches of {self.cfg.patch_dim})")

    def run_layers(self, pixels: torch.Tensor, grid_thw: list[tuple[int, int, int]], block_fn: BlockFn | None = None
                   ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """The computation itself: no host synchronisation, so it can be captured in a CUDA graph. ``block_fn``
        (block, x, rope, cu_seqlens) -> x replaces the blocks' own forward (kernels/: a fused block)."""
        tables = self.position_tables(grid_thw, pixels.device)
        return self.run_tables(pixels, tables, segment_bounds(grid_thw), block_fn)

    def run_tables(self, pixels: torch.Tensor, tables: tuple[torch.Tensor, ...], cu_seqlens: list[int],
                   block_fn: BlockFn | None = None) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """``run_layers`` from the per-patch tables of ``position_tables``: a CUDA graph that reads them from device
        memory serves every grid of its patch count (runtime/vision_graph.py)."""
        x = self.patch_embed(pixels)
        idx, wts, rows, cols = tables
        # weighted sum of the 4 taps in fp32, one cast to the hidden dtype (as the reference does)
        pos = (self.pos_embed(idx) * wts[:, :, None]).sum(1)
        x = x + pos.to(x.dtype)
        rope = vision_rope_tables(rows, cols, self.cfg.head_dim, self.cfg.rope_theta)
        taps = list(self.cfg.deepstack_visual_indexes)
        deepstack: list[torch.Tensor] = []
        for i, block in enumerate(self.blocks):
            x = block_fn(block, x, rope, cu_seqlens) if block_fn is not None else block(x, rope, cu_seqlens)
            if i in taps:
                deepstack.append(self.deepstack_merger_list[taps.index(i)](x))
        return self.merger(x), deepstack
