"""The Qwen3-VL-MoE model, or any pipeline stage of it.

A stage is this module holding a contiguous range of decoder layers [start, stop) (addressed by their global index)
and optionally the vision tower + embedding (stage 0) and the final norm + lm_head (the last stage). What a stage
does not own is absent, not faked. Parameter names equal the HF checkpoint keys:
  model.visual.*, model.language_model.embed_tokens.weight, model.language_model.layers.{i}.*,
  model.language_model.norm.weight, lm_head.weight

Shapes: T packed tokens of the step, H hidden, V vocab, M visual tokens in the step.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import nn

from .batch import SeqLayout
from .config import ModelConfig
from .attention import TextAttention
from .decoder import DecoderLayer
from .kv_cache import KVCache
from .layers import RMSNorm
from .moe import Experts
from .quant import Fp8Linear
from .rope import text_rope_tables
from .vision import VisionAttention, VisionTower


@dataclass
class VisualInputs:
    """Images and videos of one step, in sequence order, and where their placeholder tokens sit in the T rows."""

    pixel_values: torch.Tensor | None = None  # [N_img_patches, C]
    image_grid_thw: list[tuple[int, int, int]] | None = None
    pixel_values_videos: torch.Tensor | None = None  # [N_vid_patches, C]
    video_grid_thw: list[tuple[int, int, int]] | None = None
    image_mask: torch.Tensor | None = None  # [T] bool: rows that take image features
    video_mask: torch.Tensor | None = None  # [T] bool: rows that take video features

    def to(self, device) -> "VisualInputs":
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        return VisualInputs(move(self.pixel_values), self.image_grid_thw, move(self.pixel_values_videos),
                            self.video_grid_thw, move(self.image_mask), move(self.video_mask))


class LanguageModel(nn.Module):
    """Holds what a stage owns of the text model; ``layers`` is keyed by the global layer index."""

    def __init__(self, cfg: ModelConfig, start: int, stop: int, embed: bool, final_norm: bool):
        super().__init__()
        t = cfg.text
        self.embed_tokens = nn.Embedding(t.vocab_size, t.hidden_size) if embed else None
        self.layers = nn.ModuleDict({str(i): DecoderLayer(t, i) for i in range(start, stop)})
        self.norm = RMSNorm(t.hidden_size, t.rms_norm_eps) if final_norm else None


class Inner(nn.Module):
    def __init__(self, cfg: ModelConfig, start: int, stop: int, vision: bool, embed: bool, head: bool):
        super().__init__()
        self.visual = VisionTower(cfg.vision) if vision else None
        self.language_model = LanguageModel(cfg, start, stop, embed, head)


class Qwen3VLMoe(nn.Module):
    def __init__(self, cfg: ModelConfig, layers: tuple[int, int] | None = None, vision: bool = True,
                 embed: bool = True, head: bool = True):
        super().__init__()
        n = cfg.text.num_hidden_layers
        start, stop = layers if layers is not None else (0, n)
        if not 0 <= start <= stop <= n:
            raise ValueError(f"layer range [{start}, {stop}) is outside [0, {n})")
        if vision and not embed:
            raise ValueError("the vision tower's features replace token embeddings: a stage with vision needs embed")
        if vision and start != 0 or vision and stop < min(cfg.num_deepstack, n):
            raise ValueError(f"the stage holding the vision tower must own decoder layers 0..{cfg.num_deepstack - 1} "
                             f"(they receive DeepStack features); got [{start}, {stop})")
        self.cfg = cfg
        self.start, self.stop = start, stop
        self.model = Inner(cfg, start, stop, vision, embed, head)
        self.lm_head = nn.Linear(cfg.text.hidden_size, cfg.text.vocab_size, bias=False) if head else None

    # -- what this stage holds -----------------------------------------------------------------------------------
    @property
    def layer_ids(self) -> range:
        return range(self.start, self.stop)

    @property
    def has_vision(self) -> bool:
        return self.model.visual is not None

    @property
    def has_embed(self) -> bool:
        return self.model.language_model.embed_tokens is not None

    @property
    def has_head(self) -> bool:
        return self.lm_head is not None

    def new_cache(self, num_blocks: int, block_size: int, max_seq_len: int | None = None,
                  dtype: torch.dtype | None = None, device=None) -> KVCache:
        """A pool of ``num_blocks`` KV blocks (plus the scratch block) for this stage's layers, of the kv heads its
        attention holds (all of them, or a tensor rank's share); block tables cover up to ``max_seq_len`` tokens
        (default: the whole pool)."""
        p = next(self.parameters())
        kv_heads = {layer.self_attn.num_kv_heads for layer in self.model.language_model.layers.values()}
        text = dataclasses.replace(self.cfg.text, num_key_value_heads=kv_heads.pop()) if kv_heads else self.cfg.text
        return KVCache(text, self.layer_ids, num_blocks, block_size, max_seq_len or num_blocks * block_size,
                       dtype or p.dtype, device or p.device)

    def set_impl(self, experts: str | None = None, attention: str | None = None, vision_attention: str | None = None,
                 layer: str | None = None, vision_linear: str | None = None):
        """Choose the implementation behind each kernel interface (see model.moe / model.attention / model.vision /
        model.decoder; ``vision_linear``: the vision tower's fp8 linears, model.quant.Fp8Linear)."""
        choices = ((DecoderLayer, layer), (Experts, experts), (TextAttention, attention),
                   (VisionAttention, vision_attention), (Fp8Linear, vision_linear))
        for m in self.modules():
            for kind, impl in choices:
                if impl and isinstance(m, kind):
                    m.impl = impl

    def keep_experts_fp8(self, block: tuple[int, int], quantize: bool = False, act_quant: bool = False) -> None:
        """Hold every expert weight of this stage in block-quantised fp8 (model.moe.Experts.keep_fp8): before
        loading an fp8 checkpoint, whose experts are then copied as stored instead of dequantised. ``quantize``:
        quantise the weights the experts hold now instead (random-weight benchmarks). ``act_quant``: W8A8."""
        for m in self.modules():
            if isinstance(m, Experts):
                (m.quantize_fp8 if quantize else m.keep_fp8)(block, act_quant)

    # -- forward pieces --------------------------------------------------------------------------------------------
    def embed(self, input_ids: torch.Tensor, visual: VisualInputs | None
              ) -> tuple[torch.Tensor, torch.Tensor | None, list[torch.Tensor] | None]:
        """Token embeddings with image/video features written over their placeholder rows.

        Returns (h [T, H], visual row mask [T] or None, DeepStack features per tap [M, H] or None)."""
        h = self.model.language_model.embed_tokens(input_ids)
        if visual is None:
            return h, None, None
        masks, deepstack = [], []
        for pixels, grid, mask in ((visual.pixel_values, visual.image_grid_thw, visual.image_mask),
                                   (visual.pixel_values_videos, visual.video_grid_thw, visual.video_mask)):
            if pixels is None:
                continue
            feats, taps = self.model.visual(pixels, grid)
            if int(mask.sum()) != feats.shape[0]:
                raise ValueError(f"{int(mask.sum())} placeholder tokens but {feats.shape[0]} visual features")
            h = h.masked_scatter(mask[:, None], feats.to(h.dtype))
            masks.append(mask)
            deepstack.append(taps)
        if not masks:
            return h, None, None
        vis_mask = masks[0] if len(masks) == 1 else masks[0] | masks[1]
        if len(deepstack) == 1:
            return h, vis_mask, deepstack[0]
        # images and videos both present: interleave each tap's features in row order over the joint mask
        img_rows, vid_rows = masks[0][vis_mask], masks[1][vis_mask]
        joint = []
        for img, vid in zip(*deepstack):
            j = img.new_zeros(int(vis_mask.sum()), img.shape[-1])
            j[img_rows], j[vid_rows] = img, vid
            joint.append(j)
        return h, vis_mask, joint

    def forward(self, *, positions: torch.Tensor, layout: SeqLayout, cache: KVCache,
                input_ids: torch.Tensor | None = None, hidden: torch.Tensor | None = None,
                visual: VisualInputs | None = None, logits_rows: list[int] | None = None) -> torch.Tensor:
        """Run this stage on one packed step.

        positions [3, T] M-RoPE positions; stage 0 takes ``input_ids`` [T] (+ ``visual``), later stages ``hidden``
        [T, H]. Returns hidden [T, H], or on the last stage float logits [len(logits_rows), V] (default: each
        sequence's last row)."""
        vis_mask, deepstack = None, None
        if self.has_embed:
            if input_ids is None:
                raise ValueError("stage 0 needs input_ids")
            h, vis_mask, deepstack = self.embed(input_ids, visual)
        else:
            if hidden is None:
                raise ValueError("a stage without embedding needs hidden states from the previous stage")
            h = hidden
        t = self.cfg.text
        rope = text_rope_tables(positions, t.head_dim, t.rope_theta, t.mrope_section, h.dtype)
        for idx in self.layer_ids:
            h = self.model.language_model.layers[str(idx)](h, rope, cache.layer(idx), layout)
            if deepstack is not None and idx < len(deepstack):
                h = h.clone()
                h[vis_mask] = h[vis_mask] + deepstack[idx].to(h.dtype)
        if not self.has_head:
            return h
        rows = layout.last_rows() if logits_rows is None else logits_rows
        h = self.model.language_model.norm(h[rows])
        return self.lm_head(h).float()
