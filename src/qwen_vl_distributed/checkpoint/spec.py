"""What a stage holds: the parameter names/shapes a config implies, and which checkpoint keys a stage owns.

``param_shapes`` lists the parameters of ``Qwen3VLMoe`` (HF transformers-5.x names and in-memory orientation) from the
config alone, so that ``inspect`` and the synthetic writer need not build the model; a test holds it equal to the
model's own ``named_parameters`` on the meta device.

Shape legend: H text hidden, V vocab, E experts, I expert width, Dh head dim, D vision hidden, Dv vision MLP width,
M = D * merge^2 merged width.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Iterable

from ..model.config import ModelConfig

TEXT = "model.language_model."
LAYER = TEXT + "layers.{i}."
VISUAL = "model.visual."
EMBED = TEXT + "embed_tokens.weight"
FINAL_NORM = TEXT + "norm.weight"
LM_HEAD = "lm_head.weight"

_LAYER_RE = re.compile(r"^model\.language_model\.layers\.(\d+)\.")
_BLOCK_RE = re.compile(r"^model\.visual\.blocks\.(\d+)\.")

Shape = tuple[int, ...]


def layer_of(key: str) -> int | None:
    """Global decoder-layer index of a key, or None for keys outside the decoder layers."""
    m = _LAYER_RE.match(key)
    return int(m.group(1)) if m else None


def vision_block_of(key: str) -> int | None:
    m = _BLOCK_RE.match(key)
    return int(m.group(1)) if m else None


def _vision_shapes(cfg: ModelConfig) -> dict[str, Shape]:
    v = cfg.vision
    D, Dv, M, out = v.hidden_size, v.intermediate_size, v.merged_dim, v.out_hidden_size
    s: dict[str, Shape] = {
        VISUAL + "patch_embed.proj.weight": (D, v.in_channels, v.temporal_patch_size, v.patch_size, v.patch_size),
        VISUAL + "patch_embed.proj.bias": (D,),
        VISUAL + "pos_embed.weight": (v.num_position_embeddings, D),
    }
    for j in range(v.depth):
        b = f"{VISUAL}blocks.{j}."
        s.update({b + "norm1.weight": (D,), b + "norm1.bias": (D,), b + "norm2.weight": (D,), b + "norm2.bias": (D,),
                  b + "attn.qkv.weight": (3 * D, D), b + "attn.qkv.bias": (3 * D,),
                  b + "attn.proj.weight": (D, D), b + "attn.proj.bias": (D,),
                  b + "mlp.linear_fc1.weight": (Dv, D), b + "mlp.linear_fc1.bias": (Dv,),
                  b + "mlp.linear_fc2.weight": (D, Dv), b + "mlp.linear_fc2.bias": (D,)})
    # main merger normalises per patch (D) before the 2x2 shuffle; deepstack mergers after it (M)
    mergers = [(VISUAL + "merger.", D)] + [(f"{VISUAL}deepstack_merger_list.{k}.", M) for k in range(cfg.num_deepstack)]
    for m, norm_dim in mergers:
        s.update({m + "norm.weight": (norm_dim,), m + "norm.bias": (norm_dim,),
                  m + "linear_fc1.weight": (M, M), m + "linear_fc1.bias": (M,),
                  m + "linear_fc2.weight": (out, M), m + "linear_fc2.bias": (out,)})
    return s


def _layer_shapes(cfg: ModelConfig, i: int) -> dict[str, Shape]:
    t = cfg.text
    H, E, I = t.hidden_size, t.num_experts, t.moe_intermediate_size
    p = LAYER.format(i=i)
    return {
        p + "input_layernorm.weight": (H,),
        p + "self_attn.q_proj.weight": (t.q_dim, H),
        p + "self_attn.k_proj.weight": (t.kv_dim, H),
        p + "self_attn.v_proj.weight": (t.kv_dim, H),
        p + "self_attn.o_proj.weight": (H, t.q_dim),
        p + "self_attn.q_norm.weight": (t.head_dim,),
        p + "self_attn.k_norm.weight": (t.head_dim,),
        p + "post_attention_layernorm.weight": (H,),
        p + "mlp.gate.weight": (E, H),
        p + "mlp.experts.gate_up_proj": (E, 2 * I, H),   # transformers 5.x orientation: [E, 2I, H]
        p + "mlp.experts.down_proj": (E, H, I),          # [E, H, I]
    }


def param_shapes(cfg: ModelConfig, layers: tuple[int, int] | None = None, vision: bool = True,
                 embed: bool = True, head: bool = True) -> dict[str, Shape]:
    """Parameter name -> shape of a stage (same arguments as ``Qwen3VLMoe``); ``layers=None`` means all layers."""
    a, b = layers if layers is not None else (0, cfg.text.num_hidden_layers)
    s: dict[str, Shape] = {}
    if vision:
        s.update(_vision_shapes(cfg))
    if embed:
        s[EMBED] = (cfg.text.vocab_size, cfg.text.hidden_size)
    for i in range(a, b):
        s.update(_layer_shapes(cfg, i))
    if head:
        s[FINAL_NORM] = (cfg.text.hidden_size,)
        s[LM_HEAD] = (cfg.text.vocab_size, cfg.text.hidden_size)
    return s


@dataclass(frozen=True)
class StageParts:
    """What one stage holds; decides which checkpoint keys are that stage's to consume.

    Keys of no known part (neither a layer, the vision tower, the embedding nor the head) are given to the stage that
    holds the embedding, so that a stray key is reported once, by stage 0, and not silently skipped by everyone.
    """

    layers: tuple[int, int]   # [start, stop), global indices; (0, 0) for none
    vision: bool
    embed: bool
    head: bool

    def owns(self, key: str) -> bool:
        i = layer_of(key)
        if i is not None:
            return self.layers[0] <= i < self.layers[1]
        if key.startswith(VISUAL):
            return self.vision
        if key.startswith(EMBED.rsplit(".", 1)[0] + "."):
            return self.embed
        if key.startswith((FINAL_NORM.rsplit(".", 1)[0] + ".", LM_HEAD.rsplit(".", 1)[0] + ".")):
            return self.head
        return self.embed

    def describe(self) -> str:
        a, b = self.layers
        parts = [f"layers {a}-{b - 1}" if b > a + 1 else f"layer {a}" if b > a else "no layers"]
        parts += [n for n, on in (("vision", self.vision), ("embed", self.embed), ("head", self.head)) if on]
        return ", ".join(parts)


def parts_of(names: Iterable[str]) -> StageParts:
    """Infer the parts of a stage module from its parameter names (layer range must be contiguous)."""
    names = list(names)
    idx = sorted({i for i in map(layer_of, names) if i is not None})
    if idx and idx != list(range(idx[0], idx[-1] + 1)):
        raise ValueError(f"stage holds non-contiguous decoder layers {idx}")
    return StageParts(
        layers=(idx[0], idx[-1] + 1) if idx else (0, 0),
        vision=any(n.startswith(VISUAL) for n in names),
        embed=EMBED in names,
        head=LM_HEAD in names or FINAL_NORM in names,
    )
