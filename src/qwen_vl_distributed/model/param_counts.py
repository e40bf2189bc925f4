"""Parameter counts and weight bytes per component, from a ModelConfig alone (pure arithmetic, no torch).

The counts equal what instantiating the HF model on the meta device reports (docs qwen3-vl-moe.md §1.4); the
stage planner builds its memory and decode-cost model on them.

Weight bytes per dtype:
- ``bf16`` / ``fp32``: every parameter at 2 / 4 bytes.
- ``fp8``: the block-quantised release (§6) as a run holds it (``--fp8-experts keep``): every expert matrix at 1
  byte plus one fp32 scale per 128x128 block (``weight_scale_inv`` [ceil(out/128), ceil(in/128)]), counted as
  separate gate / up / down matrices as the release stores them; everything else in bf16, the attention
  projections included (the release stores them in fp8 too; loading dequantises them, ~3% of the weights).

With ``tp`` tensor ranks per stage (parallel.grid), ``component_bytes`` gives ONE rank's bytes: the query heads and
the experts (whole experts or a slice of each one's width: the same bytes) split N ways, the kv heads split or, with
more ranks than kv heads, one kv head per rank; norms, router, vision tower, embedding and lm_head whole on every
rank.
"""

from __future__ import annotations

from dataclasses import dataclass

from .config import ModelConfig

WEIGHT_DTYPES = ("bf16", "fp8", "fp32")
_PLAIN_BYTES = {"bf16": 2, "fp8": 2, "fp32": 4}  # bytes of a parameter that fp8 leaves unquantised
_SCALE_BYTES = 4  # fp32 weight_scale_inv


def _linear(out_features: int, in_features: int, bias: bool = False) -> int:
    return out_features * in_features + (out_features if bias else 0)


def _layer_norm(dim: int) -> int:
    return 2 * dim  # weight and bias


@dataclass(frozen=True)
class VisionParams:
    patch_embed: int
    pos_embed: int
    blocks: int  # all ``depth`` blocks
    merger: int
    deepstack_mergers: int  # all of them

    @property
    def total(self) -> int:
        return self.patch_embed + self.pos_embed + self.blocks + self.merger + self.deepstack_mergers


@dataclass(frozen=True)
class LayerParams:
    """One decoder layer; every layer of the model has the same shapes."""

    attention: int  # q, k, v, o projections
    qk_norm: int
    router: int
    experts: int  # all experts
    expert: int  # one expert (gate + up + down)
    norms: int  # input + post-attention RMSNorm

    @property
    def total(self) -> int:
        return self.attention + self.qk_norm + self.router + self.experts + self.norms


@dataclass(frozen=True)
class ModelParams:
    vision: VisionParams
    embed: int
    layer: LayerParams
    num_layers: int
    final_norm: int
    lm_head: int
    tied: bool  # lm_head shares the embedding matrix (counted once in ``total``)

    @property
    def text(self) -> int:
        head = 0 if self.tied else self.lm_head
        return self.embed + self.num_layers * self.layer.total + self.final_norm + head

    @property
    def total(self) -> int:
        return self.vision.total + self.text


def vision_params(cfg: ModelConfig) -> VisionParams:
    v = cfg.vision
    d, m, out = v.hidden_size, v.merged_dim, v.out_hidden_size
    block = (2 * _layer_norm(d) + _linear(3 * d, d, bias=True) + _linear(d, d, bias=True)
             + _linear(v.intermediate_size, d, bias=True) + _linear(d, v.intermediate_size, bias=True))
    mlp = _linear(m, m, bias=True) + _linear(out, m, bias=True)
    # the main merger normalises each patch (width D) before the 2x2 shuffle; deepstack mergers after it (width 4D)
    return VisionParams(
        patch_embed=_linear(d, v.patch_dim, bias=True),
        pos_embed=v.num_position_embeddings * d,
        blocks=v.depth * block,
        merger=_layer_norm(d) + mlp,
        deepstack_mergers=cfg.num_deepstack * (_layer_norm(m) + mlp),
    )


def layer_params(cfg: ModelConfig) -> LayerParams:
    t = cfg.text
    h, i = t.hidden_size, t.moe_intermediate_size
    expert = 3 * h * i  # gate and up [I, H], down [H, I]
    return LayerParams(
        attention=_linear(t.q_dim, h) + 2 * _linear(t.kv_dim, h) + _linear(h, t.q_dim),
        qk_norm=2 * t.head_dim,
        router=_linear(t.num_experts, h),
        experts=t.num_experts * expert,
        expert=expert,
        norms=2 * h,
    )


def model_params(cfg: ModelConfig) -> ModelParams:
    t = cfg.text
    return ModelParams(
        vision=vision_params(cfg),
        embed=t.vocab_size * t.hidden_size,
        layer=layer_params(cfg),
        num_layers=t.num_hidden_layers,
        final_norm=t.hidden_size,
        lm_head=t.vocab_size * t.hidden_size,
        tied=cfg.tie_word_embeddings,
    )


# --------------------------------------------------------------------------------------------------------------------
# Bytes


@dataclass(frozen=True)
class ComponentBytes:
    """Weight bytes per component for one dtype. ``layer_active`` is what one decode token reads from a layer."""

    dtype: str
    vision: int
    embed: int
    layer: int  # one decoder layer with all its experts
    layer_active: int  # attention + norms + router + top-k experts
    final_norm: int
    lm_head: int


def _check_dtype(dtype: str) -> None:
    if dtype not in WEIGHT_DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(WEIGHT_DTYPES)}, got {dtype!r}")


def _block_size(cfg: ModelConfig) -> tuple[int, int]:
    q = cfg.quantization
    return tuple(q.weight_block_size) if q is not None else (128, 128)


def _fp8_matrix(out_features: int, in_features: int, block: tuple[int, int]) -> int:
    """fp8 weight plus its fp32 scale per (block_out x block_in) block."""
    scales = -(-out_features // block[0]) * -(-in_features // block[1])
    return out_features * in_features + _SCALE_BYTES * scales


def local_kv_heads(cfg: ModelConfig, tp: int) -> int:
    """The kv heads one of ``tp`` tensor ranks holds: its share, or one (replicated) with more ranks than heads."""
    return max(cfg.text.num_key_value_heads // tp, 1)


def _attention(cfg: ModelConfig, tp: int) -> int:
    """q, k, v, o projection parameters of one tensor rank."""
    t = cfg.text
    q = t.q_dim // tp
    kv = local_kv_heads(cfg, tp) * t.head_dim
    return 2 * _linear(q, t.hidden_size) + 2 * _linear(kv, t.hidden_size)


def _quantised_bytes(cfg: ModelConfig, dtype: str, tp: int) -> tuple[int, int]:
    """(attention projections, all experts) in bytes on one of ``tp`` tensor ranks: the matrices the fp8 release
    quantises, of which a run keeps the experts in fp8."""
    p, e = layer_params(cfg), cfg.text.num_experts
    b = _PLAIN_BYTES[dtype]
    attention = b * _attention(cfg, tp)
    if dtype != "fp8":
        return attention, b * e * p.expert // tp
    t, blk = cfg.text, _block_size(cfg)
    h, i = t.hidden_size, t.moe_intermediate_size
    return attention, e * (2 * _fp8_matrix(i, h, blk) + _fp8_matrix(h, i, blk)) // tp


def component_bytes(cfg: ModelConfig, dtype: str, tp: int = 1) -> ComponentBytes:
    """Weight bytes per component on one of ``tp`` tensor ranks of a stage (the whole model's with tp = 1)."""
    _check_dtype(dtype)
    p, plain = model_params(cfg), _PLAIN_BYTES[dtype]
    attention, experts = _quantised_bytes(cfg, dtype, tp)
    rest = plain * (p.layer.qk_norm + p.layer.router + p.layer.norms)  # never quantised
    t = cfg.text
    return ComponentBytes(
        dtype=dtype,
        vision=plain * p.vision.total,
        embed=plain * p.embed,
        layer=attention + rest + experts,
        layer_active=attention + rest + t.num_experts_per_tok * experts // t.num_experts,
        final_norm=plain * p.final_norm,
        lm_head=plain * p.lm_head,
    )


def total_weight_bytes(cfg: ModelConfig, dtype: str) -> int:
    """Bytes of the whole model held once (a tied lm_head counted once)."""
    b = component_bytes(cfg, dtype)
    head = 0 if cfg.tie_word_embeddings else b.lm_head
    return b.vision + b.embed + cfg.text.num_hidden_layers * b.layer + b.final_norm + head
