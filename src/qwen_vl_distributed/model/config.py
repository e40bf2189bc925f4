"""Model configuration: frozen dataclasses built by one function from an HF ``config.json``.

config.json is read by transformers' own ``Qwen3VLMoeConfig`` first, so every spelling transformers accepts loads
here too and means the same: the release's ``rope_scaling`` + ``rope_theta`` and transformers 5's
``rope_parameters``, ``num_experts`` and its alias ``num_local_experts``, ``torch_dtype`` and ``dtype``, and
transformers' defaults for absent fields. Our dataclasses are then built from that object and validated strictly.
Every error names the offending field (``text_config.num_key_value_heads``, ...).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import re
from dataclasses import dataclass, field
from typing import Any, Mapping

from ..errors import UserError

ARCHITECTURE = "Qwen3VLMoeForConditionalGeneration"
MODEL_TYPE = "qwen3_vl_moe"


class ConfigError(UserError, ValueError):
    """A config.json that cannot describe a Qwen3-VL-MoE model; the message names the field."""


@dataclass(frozen=True)
class TextConfig:
    vocab_size: int = 151936
    hidden_size: int = 4096
    num_hidden_layers: int = 94
    num_attention_heads: int = 64
    num_key_value_heads: int = 4
    head_dim: int = 128
    moe_intermediate_size: int = 1536
    num_experts: int = 128
    num_experts_per_tok: int = 8
    norm_topk_prob: bool = True
    rms_norm_eps: float = 1e-6
    rope_theta: float = 5_000_000.0
    mrope_section: tuple[int, int, int] = (24, 20, 20)
    mrope_interleaved: bool = True
    max_position_embeddings: int = 262144
    attention_bias: bool = False
    hidden_act: str = "silu"
    intermediate_size: int = 12288  # dense MLP width; unused (every layer is MoE) but kept for round-trips

    @property
    def q_dim(self) -> int:
        return self.num_attention_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.num_key_value_heads * self.head_dim


@dataclass(frozen=True)
class VisionConfig:
    depth: int = 27
    hidden_size: int = 1152
    num_heads: int = 16
    intermediate_size: int = 4304
    hidden_act: str = "gelu_pytorch_tanh"
    in_channels: int = 3
    patch_size: int = 16
    temporal_patch_size: int = 2
    spatial_merge_size: int = 2
    num_position_embeddings: int = 2304
    out_hidden_size: int = 4096
    deepstack_visual_indexes: tuple[int, ...] = (8, 16, 24)
    rope_theta: float = 10000.0
    layer_norm_eps: float = 1e-6

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def patch_dim(self) -> int:
        """Length of one pixel row: C * Tp * P * P (1536 for the released models)."""
        return self.in_channels * self.temporal_patch_size * self.patch_size**2

    @property
    def merged_dim(self) -> int:
        """Width of one merged 2x2 block of patches (4608)."""
        return self.hidden_size * self.spatial_merge_size**2

    @property
    def pos_grid(self) -> int:
        """Side of the learned position-embedding grid (48 for 2304 embeddings)."""
        return int(round(self.num_position_embeddings**0.5))


@dataclass(frozen=True)
class QuantizationConfig:
    """Block-wise FP8 (``quant_method: fp8``): weight = fp8 * weight_scale_inv per block."""

    quant_method: str = "fp8"
    weight_block_size: tuple[int, int] = (128, 128)
    activation_scheme: str = "dynamic"
    modules_to_not_convert: tuple[str, ...] = ()


@dataclass(frozen=True)
class ModelConfig:
    text: TextConfig = field(default_factory=TextConfig)
    vision: VisionConfig = field(default_factory=VisionConfig)
    image_token_id: int = 151655
    video_token_id: int = 151656
    vision_start_token_id: int = 151652
    vision_end_token_id: int = 151653
    tie_word_embeddings: bool = False
    torch_dtype: str = "bfloat16"
    quantization: QuantizationConfig | None = None

    @property
    def num_deepstack(self) -> int:
        return len(self.vision.deepstack_visual_indexes)


# --------------------------------------------------------------------------------------------------------------------
# Reading


def _typed(value: Any, kind: type, name: str) -> Any:
    if kind is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"config.json: {name} must be true or false, got {value!r}")
        return value
    if kind is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"config.json: {name} must be an integer, got {value!r}")
        return value
    if kind is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"config.json: {name} must be a number, got {value!r}")
        return float(value)
    if kind is str:
        if not isinstance(value, str):
            raise ConfigError(f"config.json: {name} must be a string, got {value!r}")
        return value
    raise TypeError(kind)


def _scalars(cls: type, hf: Any, prefix: str, skip: tuple[str, ...] = ()) -> dict[str, Any]:
    """The scalar fields of our dataclass ``cls``, read from the attribute of the same name of transformers' config
    object ``hf`` (which has resolved aliases such as ``num_experts`` -> ``num_local_experts`` and filled HF's
    defaults). ``skip``: fields HF does not read from the config (ours keep their default)."""
    out: dict[str, Any] = {}
    defaults = cls()
    for f in dataclasses.fields(cls):
        kind = type(getattr(defaults, f.name))
        if f.name in skip or kind not in (int, float, bool, str):
            continue
        value = getattr(hf, f.name, None)
        if value is None:
            raise ConfigError(f"config.json: missing field {prefix}{f.name}")
        out[f.name] = _typed(value, kind, prefix + f.name)
    return out


def _rope_parameters(hf: Any, where: str) -> Mapping[str, Any]:
    """transformers has already merged the legacy spelling (``rope_scaling`` + ``rope_theta``) into
    ``rope_parameters``."""
    params = getattr(hf, "rope_parameters", None)
    if not isinstance(params, Mapping):
        raise ConfigError(f"config.json: {where}.rope_parameters must be an object, got {params!r}")
    return params


def _text_rope(t: Any) -> dict[str, Any]:
    rope = _rope_parameters(t, "text_config")
    if rope.get("rope_type", "default") != "default":
        raise ConfigError(f"config.json: text_config.rope_parameters.rope_type {rope['rope_type']!r} is not "
                          "supported (only 'default')")
    # transformers' text rotary falls back to the release's section (our default) when the config names none
    section = rope.get("mrope_section", TextConfig.mrope_section)
    if (not isinstance(section, (list, tuple)) or len(section) != 3
            or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in section)):
        raise ConfigError(f"config.json: text_config mrope_section must be three non-negative integers, got {section!r}")
    return {
        "rope_theta": _typed(rope.get("rope_theta"), float, "text_config.rope_theta"),
        "mrope_section": tuple(section),
        "mrope_interleaved": _typed(rope.get("mrope_interleaved", True), bool, "text_config mrope_interleaved"),
    }


def _parse_text(t: Any) -> TextConfig:
    values = _scalars(TextConfig, t, "text_config.", skip=("rope_theta", "mrope_interleaved", "norm_topk_prob"))
    values.update(_text_rope(t))
    # not a field of transformers' class (it keeps what it does not know as a plain attribute): its router always
    # renormalises the top-k weights, so a config asking otherwise is refused rather than run either way
    values["norm_topk_prob"] = _typed(getattr(t, "norm_topk_prob", True), bool, "text_config.norm_topk_prob")
    if not values["norm_topk_prob"]:
        raise ConfigError("config.json: text_config.norm_topk_prob false is not supported (Qwen3-VL-MoE "
                          "renormalises the top-k routing weights, as transformers does whatever the config says)")
    if t.decoder_sparse_step != 1:
        raise ConfigError(f"config.json: text_config.decoder_sparse_step={t.decoder_sparse_step} is not supported "
                          "(every layer must be MoE, decoder_sparse_step=1)")
    if t.mlp_only_layers:
        raise ConfigError("config.json: text_config.mlp_only_layers must be empty (dense layers are not supported)")
    return TextConfig(**values)


def _parse_vision(v: Any) -> VisionConfig:
    # transformers' vision blocks use a fixed LayerNorm eps (1e-6), whatever the config says
    values = _scalars(VisionConfig, v, "vision_config.", skip=("rope_theta", "layer_norm_eps"))
    ds = v.deepstack_visual_indexes
    if not isinstance(ds, (list, tuple)) or not all(isinstance(i, int) and not isinstance(i, bool) for i in ds):
        raise ConfigError(f"config.json: vision_config.deepstack_visual_indexes must be a list of integers, got {ds!r}")
    rope = _rope_parameters(v, "vision_config")
    if rope.get("rope_type") != "axial":
        raise ConfigError(f"config.json: vision_config.rope_parameters.rope_type {rope.get('rope_type')!r} is not "
                          "supported (only 'axial')")
    values["rope_theta"] = _typed(rope.get("rope_theta"), float, "vision_config.rope_parameters.rope_theta")
    values["deepstack_visual_indexes"] = tuple(ds)
    return VisionConfig(**values)


def _parse_quant(q: Any) -> QuantizationConfig | None:
    if q is None:
        return None
    if not isinstance(q, Mapping):
        raise ConfigError("config.json: quantization_config must be an object")
    method = q.get("quant_method")
    if method != "fp8":
        raise ConfigError(f"config.json: quantization_config.quant_method {method!r} is not supported (only 'fp8')")
    block = q.get("weight_block_size", [128, 128])
    if not (isinstance(block, (list, tuple)) and len(block) == 2 and all(isinstance(b, int) and b > 0 for b in block)):
        raise ConfigError(f"config.json: quantization_config.weight_block_size must be two positive integers, got {block!r}")
    scheme = q.get("activation_scheme", "dynamic")
    if scheme != "dynamic":
        raise ConfigError(f"config.json: quantization_config.activation_scheme {scheme!r} is not supported (only 'dynamic')")
    return QuantizationConfig(
        quant_method="fp8",
        weight_block_size=tuple(block),
        activation_scheme=scheme,
        modules_to_not_convert=tuple(q.get("modules_to_not_convert") or ()),
    )


def _dtype_name(hf: Any) -> str:
    """The checkpoint's dtype: top level, else text_config (``torch_dtype`` is transformers' legacy name for it)."""
    dtype = hf.dtype if hf.dtype is not None else hf.text_config.dtype
    if dtype is None:
        return "bfloat16"
    return str(dtype).removeprefix("torch.")


def _refusal(d: Mapping[str, Any], error: Exception) -> str:
    """Where transformers' config class refused ``d``: the sub-config and field, with its reason."""
    from transformers import Qwen3VLMoeTextConfig, Qwen3VLMoeVisionConfig

    where = ""
    for key, cls in (("text_config", Qwen3VLMoeTextConfig), ("vision_config", Qwen3VLMoeVisionConfig)):
        sub = d.get(key)
        if isinstance(sub, Mapping):
            try:
                cls(**{k: v for k, v in sub.items() if k != "model_type"})
            except Exception as e:  # noqa: BLE001 -- any refusal: this only locates it
                where, error = key + ".", e
                break
    lines = [ln.strip() for ln in str(error).splitlines() if ln.strip()]
    field_name = re.search(r"field '([^']+)'", lines[0]) if lines else None
    if field_name:
        return f"{where}{field_name.group(1)}: {lines[-1]}"
    return f"{where.rstrip('.') or 'top level'}: {type(error).__name__}: {lines[0] if lines else ''}"


def _hf_config(d: Mapping[str, Any]) -> Any:
    """transformers' own reading of config.json: every alias, default and legacy spelling it accepts."""
    from transformers import Qwen3VLMoeConfig
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # its notes on legacy spellings are not the user's business here
    try:
        return Qwen3VLMoeConfig.from_dict(copy.deepcopy(dict(d)))
    except Exception as e:  # noqa: BLE001 -- transformers raises many kinds; each becomes one named line
        raise ConfigError(f"config.json: {_refusal(d, e)}") from None
    finally:
        hf_logging.set_verbosity(level)


def config_from_dict(d: Mapping[str, Any]) -> ModelConfig:
    """Build and validate a ModelConfig from the parsed contents of an HF config.json, read through transformers'
    ``Qwen3VLMoeConfig``."""
    if not isinstance(d, Mapping):
        raise ConfigError("config.json: top level must be a JSON object")
    model_type = d.get("model_type")
    if model_type != MODEL_TYPE:
        raise ConfigError(f"config.json: model_type {model_type!r} is not a Qwen3-VL-MoE model (expected "
                          f"'{MODEL_TYPE}'; transformers reads a config.json as the model its model_type names)")
    hf = _hf_config(d)
    top = _scalars(ModelConfig, hf, "", skip=("torch_dtype",))
    cfg = ModelConfig(text=_parse_text(hf.text_config), vision=_parse_vision(hf.vision_config),
                      quantization=_parse_quant(d.get("quantization_config")), torch_dtype=_dtype_name(hf), **top)
    validate(cfg)
    return cfg


def load_config(path: str | os.PathLike) -> ModelConfig:
    """Read ``config.json`` (or the directory holding it) into a validated ModelConfig."""
    p = os.fspath(path)
    if os.path.isdir(p):
        p = os.path.join(p, "config.json")
    if not os.path.isfile(p):
        raise ConfigError(f"{p}: no config.json (not a Hugging Face model directory)")
    try:
        with open(p, encoding="utf-8") as f:
            d = json.load(f)
    except json.JSONDecodeError as e:
        raise ConfigError(f"{p}: not valid JSON ({e})") from None
    try:
        return config_from_dict(d)
    except ConfigError as e:
        raise ConfigError(str(e).replace("config.json", p, 1)) from None


# --------------------------------------------------------------------------------------------------------------------
# Validation


_TEXT_REQUIRED = (
    "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
    "moe_intermediate_size", "num_experts", "num_experts_per_tok",
)
_VISION_REQUIRED = ("depth", "hidden_size", "num_heads", "intermediate_size", "out_hidden_size")


def _positive(name: str, value: int) -> None:
    if value <= 0:
        raise ConfigError(f"config.json: {name} must be positive, got {value}")


def validate(cfg: ModelConfig) -> None:
    t, v = cfg.text, cfg.vision
    for f in _TEXT_REQUIRED + ("head_dim",):
        _positive(f"text_config.{f}", getattr(t, f))
    for f in _VISION_REQUIRED + ("patch_size", "temporal_patch_size", "spatial_merge_size", "num_position_embeddings"):
        _positive(f"vision_config.{f}", getattr(v, f))
    if t.num_attention_heads % t.num_key_value_heads:
        raise ConfigError(f"config.json: text_config.num_attention_heads ({t.num_attention_heads}) must be a multiple "
                          f"of text_config.num_key_value_heads ({t.num_key_value_heads})")
    if t.num_experts_per_tok > t.num_experts:
        raise ConfigError(f"config.json: text_config.num_experts_per_tok ({t.num_experts_per_tok}) exceeds "
                          f"text_config.num_experts ({t.num_experts})")
    if t.head_dim % 2:
        raise ConfigError(f"config.json: text_config.head_dim ({t.head_dim}) must be even for rotary embeddings")
    if sum(t.mrope_section) != t.head_dim // 2:
        raise ConfigError(f"config.json: text_config mrope_section {list(t.mrope_section)} must sum to head_dim/2 "
                          f"({t.head_dim // 2})")
    if not t.mrope_interleaved:
        raise ConfigError("config.json: text_config mrope_interleaved false is not supported (Qwen3-VL interleaves "
                          "the M-RoPE sections, as transformers does whatever the config says)")
    if t.hidden_act != "silu":
        raise ConfigError(f"config.json: text_config.hidden_act {t.hidden_act!r} is not supported (only 'silu')")
    if v.hidden_size % v.num_heads:
        raise ConfigError(f"config.json: vision_config.hidden_size ({v.hidden_size}) must be a multiple of "
                          f"vision_config.num_heads ({v.num_heads})")
    if v.head_dim % 4:
        raise ConfigError(f"config.json: vision head_dim ({v.head_dim}) must be a multiple of 4 for 2-D rotary")
    if v.pos_grid**2 != v.num_position_embeddings:
        raise ConfigError(f"config.json: vision_config.num_position_embeddings ({v.num_position_embeddings}) "
                          "must be a perfect square")
    if v.out_hidden_size != t.hidden_size:
        raise ConfigError(f"config.json: vision_config.out_hidden_size ({v.out_hidden_size}) must equal "
                          f"text_config.hidden_size ({t.hidden_size})")
    for i in v.deepstack_visual_indexes:
        if not 0 <= i < v.depth:
            raise ConfigError(f"config.json: vision_config.deepstack_visual_indexes entry {i} is outside "
                              f"[0, vision_config.depth={v.depth})")
    if len(v.deepstack_visual_indexes) > t.num_hidden_layers:
        raise ConfigError("config.json: vision_config.deepstack_visual_indexes has more entries than decoder layers")
    if v.hidden_act not in ("gelu_pytorch_tanh", "gelu"):
        raise ConfigError(f"config.json: vision_config.hidden_act {v.hidden_act!r} is not supported")
    if cfg.torch_dtype not in ("bfloat16", "float16", "float32"):
        raise ConfigError(f"config.json: dtype {cfg.torch_dtype!r} is not supported")


# --------------------------------------------------------------------------------------------------------------------
# Writing (synthetic checkpoints, round-trips)


def config_to_dict(cfg: ModelConfig, spelling: str = "released") -> dict[str, Any]:
    """An HF config.json for ``cfg``. ``spelling``: 'released' (rope_scaling + rope_theta, the vision rope implied) or
    'hf' (rope_parameters in both sub-configs, as transformers 5 writes them)."""
    t = {f.name: getattr(cfg.text, f.name) for f in dataclasses.fields(TextConfig)}
    rope = {"rope_type": "default", "mrope_section": list(cfg.text.mrope_section),
            "mrope_interleaved": cfg.text.mrope_interleaved}
    for k in ("rope_theta", "mrope_section", "mrope_interleaved"):
        t.pop(k)
    if spelling == "released":
        t["rope_theta"] = cfg.text.rope_theta
        t["rope_scaling"] = rope
    elif spelling == "hf":
        t["rope_parameters"] = {**rope, "rope_theta": cfg.text.rope_theta}
    else:
        raise ValueError(f"unknown spelling {spelling!r}")
    t.update(model_type="qwen3_vl_moe_text", decoder_sparse_step=1, mlp_only_layers=[],
             dtype=cfg.torch_dtype, attention_dropout=0.0, initializer_range=0.02, use_cache=True)
    v = {f.name: getattr(cfg.vision, f.name) for f in dataclasses.fields(VisionConfig)}
    v.pop("layer_norm_eps")
    vision_theta = v.pop("rope_theta")
    if spelling == "hf":
        v["rope_parameters"] = {"rope_type": "axial", "rope_theta": vision_theta}
    v["deepstack_visual_indexes"] = list(cfg.vision.deepstack_visual_indexes)
    v.update(model_type="qwen3_vl_moe", initializer_range=0.02)
    d: dict[str, Any] = {
        "architectures": [ARCHITECTURE],
        "model_type": MODEL_TYPE,
        "text_config": t,
        "vision_config": v,
        "image_token_id": cfg.image_token_id,
        "video_token_id": cfg.video_token_id,
        "vision_start_token_id": cfg.vision_start_token_id,
        "vision_end_token_id": cfg.vision_end_token_id,
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "dtype": cfg.torch_dtype,
        # transformers decides tokenizer fix-ups from the version that wrote the checkpoint; the released
        # Qwen3-VL checkpoints were written by 4.57
        "transformers_version": "4.57.0",
    }
    if cfg.quantization is not None:
        q = cfg.quantization
        d["quantization_config"] = {"quant_method": q.quant_method, "fmt": "e4m3",
                                    "activation_scheme": q.activation_scheme,
                                    "weight_block_size": list(q.weight_block_size),
                                    "modules_to_not_convert": list(q.modules_to_not_convert)}
    return d


# --------------------------------------------------------------------------------------------------------------------
# Presets


def _preset_235b() -> ModelConfig:
    return ModelConfig()


def _preset_30b() -> ModelConfig:
    return ModelConfig(
        text=TextConfig(hidden_size=2048, num_hidden_layers=48, num_attention_heads=32, num_key_value_heads=4,
                        moe_intermediate_size=768, intermediate_size=6144),
        vision=VisionConfig(out_hidden_size=2048),
    )


def _preset_tiny() -> ModelConfig:
    """A small random-weight test model with the real vocabulary and token ids (so the real tokenizer fits)."""
    return ModelConfig(
        text=TextConfig(hidden_size=64, num_hidden_layers=6, num_attention_heads=4, num_key_value_heads=2,
                        head_dim=16, moe_intermediate_size=24, num_experts=8, num_experts_per_tok=2,
                        mrope_section=(4, 2, 2), intermediate_size=128, max_position_embeddings=32768),
        vision=VisionConfig(depth=4, hidden_size=32, num_heads=2, intermediate_size=64, out_hidden_size=64,
                            num_position_embeddings=64, deepstack_visual_indexes=(0, 1, 2)),
        torch_dtype="float32",
    )


PRESETS = {"235b-a22b": _preset_235b, "30b-a3b": _preset_30b, "tiny": _preset_tiny}


def preset(name: str) -> ModelConfig:
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r} (choose from {', '.join(PRESETS)})")
    cfg = PRESETS[name]()
    validate(cfg)
    return cfg
