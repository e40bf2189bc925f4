"""Match a stage's parameters against a checkpoint, from the index and shard headers only (no tensor data).

``plan_load`` resolves every parameter to the stored tensors that make it (through the key map), and collects every
problem: config.json disagreeing with the tensors, missing keys, keys of the stage that nothing consumes, shape and
dtype mismatches. ``LoadPlan.check`` raises the first problem, most fundamental kind first; ``inspect`` reports them
all instead. Only the shards holding keys the stage owns are opened.
"""

from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Callable, Mapping

from ..model.config import ModelConfig
from . import keymap
from .errors import (CheckpointError, ConfigMismatchError, DtypeError, LayoutError, MissingKeyError,
                     ShapeMismatchError, UnexpectedKeyError)
from ..model.quant import scale_shape
from .fp8 import resident_problem, resident_scale_shape, scale_key
from .index import Checkpoint
from .safetensors_io import FLOAT_DTYPES, FP8_DTYPES, TensorInfo
from .spec import EMBED, FINAL_NORM, LAYER, LM_HEAD, VISUAL, Shape, StageParts, layer_of, vision_block_of

# (key pattern, dim, config field, value the config predicts): cheap shape facts that identify a config mismatch, so
# that "config.json says 8 experts, the tensors have 16" is reported as such rather than as a pile of shape errors.
_ANCHORS: tuple[tuple[str, int, str, Callable[[ModelConfig], int]], ...] = (
    (EMBED, 0, "text_config.vocab_size", lambda c: c.text.vocab_size),
    (EMBED, 1, "text_config.hidden_size", lambda c: c.text.hidden_size),
    (LM_HEAD, 0, "text_config.vocab_size", lambda c: c.text.vocab_size),
    (LM_HEAD, 1, "text_config.hidden_size", lambda c: c.text.hidden_size),
    (FINAL_NORM, 0, "text_config.hidden_size", lambda c: c.text.hidden_size),
    (LAYER + "input_layernorm.weight", 0, "text_config.hidden_size", lambda c: c.text.hidden_size),
    (LAYER + "mlp.gate.weight", 0, "text_config.num_experts", lambda c: c.text.num_experts),
    (LAYER + "mlp.gate.weight", 1, "text_config.hidden_size", lambda c: c.text.hidden_size),
    (LAYER + "self_attn.q_norm.weight", 0, "text_config.head_dim", lambda c: c.text.head_dim),
    (LAYER + "self_attn.q_proj.weight", 0, "text_config.num_attention_heads * head_dim", lambda c: c.text.q_dim),
    (LAYER + "self_attn.k_proj.weight", 0, "text_config.num_key_value_heads * head_dim", lambda c: c.text.kv_dim),
    (keymap.EXPERTS + "{e}.gate_proj.weight", 0, "text_config.moe_intermediate_size",
     lambda c: c.text.moe_intermediate_size),
    (VISUAL + "pos_embed.weight", 0, "vision_config.num_position_embeddings",
     lambda c: c.vision.num_position_embeddings),
    (VISUAL + "pos_embed.weight", 1, "vision_config.hidden_size", lambda c: c.vision.hidden_size),
    (VISUAL + "merger.linear_fc2.weight", 0, "vision_config.out_hidden_size", lambda c: c.vision.out_hidden_size),
)
_ANCHOR_RES = [(re.compile("^" + re.escape(p).replace(r"\{i\}", r"\d+").replace(r"\{e\}", r"\d+") + "$"), d, f, v)
               for p, d, f, v in _ANCHORS]

# raised in this order by LoadPlan.check: the most fundamental problem explains the others
_PRIORITY = (ConfigMismatchError, LayoutError, MissingKeyError, UnexpectedKeyError, ShapeMismatchError, DtypeError)


@dataclass(frozen=True)
class Item:
    """One stored tensor to read (plus its fp8 scale) and the place in a parameter it fills."""

    piece: keymap.Piece
    info: TensorInfo
    scale: TensorInfo | None = None

    @property
    def nbytes(self) -> int:
        return self.info.nbytes + (self.scale.nbytes if self.scale else 0)


@dataclass
class LoadPlan:
    stage_name: str
    parts: StageParts
    params: dict[str, Shape]
    items: dict[str, list[Item]] = field(default_factory=dict)   # parameter -> the tensors that fill it
    layouts: dict[int, str] = field(default_factory=dict)        # decoder layer -> expert layout
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    problems: list[CheckpointError] = field(default_factory=list)
    fp8_block: tuple[int, int] | None = None
    resident: frozenset[str] = frozenset()                      # parameters kept in fp8 (filled as stored)

    @property
    def nbytes(self) -> int:
        return sum(it.nbytes for its in self.items.values() for it in its)

    @property
    def files(self) -> list[str]:
        return sorted({it.info.file for its in self.items.values() for it in its})

    def check(self) -> None:
        """Raise the first problem (config mismatch, layout, missing, unexpected, shape, dtype -- in that order)."""
        for kind in _PRIORITY:
            for p in self.problems:
                if type(p) is kind:
                    raise p
        if self.problems:
            raise self.problems[0]


def _check_layer_counts(ckpt: Checkpoint, problems: list[CheckpointError]) -> None:
    """Keys of layers/blocks the config does not have belong to no stage; catch them from the index alone."""
    cfg = ckpt.cfg
    limits = ((layer_of, cfg.text.num_hidden_layers, "text_config.num_hidden_layers", "decoder layer"),
              (vision_block_of, cfg.vision.depth, "vision_config.depth", "vision block"))
    for of, limit, fname, what in limits:
        beyond = [(n, k) for k in ckpt.weight_map if (n := of(k)) is not None and n >= limit]
        if beyond:
            n, k = max(beyond)
            problems.append(ConfigMismatchError(
                f"config mismatch: {ckpt.config_path} says {fname} = {limit}, but the checkpoint has {what} {n} "
                f"({k} in {ckpt.path(ckpt.weight_map[k])})"))


def _check_anchors(ckpt: Checkpoint, infos: Mapping[str, TensorInfo], problems: list[CheckpointError]) -> None:
    for rx, dim, fname, predict in _ANCHOR_RES:
        want = predict(ckpt.cfg)
        for key in sorted(k for k in infos if rx.match(k)):
            info = infos[key]
            if len(info.shape) <= dim or info.shape[dim] != want:
                problems.append(ConfigMismatchError(
                    f"config mismatch: {ckpt.config_path} says {fname} = {want}, but {key} in "
                    f"{ckpt.path(info.file)} has shape {list(info.shape)}"))
                break  # one message per config field is enough


def _detect_layouts(ckpt: Checkpoint, plan: LoadPlan, infos: Mapping[str, TensorInfo]) -> set[int]:
    """Fill plan.layouts; return the layers whose experts cannot be planned (their problem is already recorded)."""
    by_layer: dict[int, dict[str, Shape]] = defaultdict(dict)
    for key, info in infos.items():
        i = keymap.expert_layer(key)
        if i is not None and not key.endswith("_scale_inv"):
            by_layer[i][key] = info.shape
    failed = set()
    where = lambda k: ckpt.path(infos[k].file)
    for i in range(*plan.parts.layers):
        shapes = {keymap.GATE_UP.format(i=i): None, keymap.DOWN.format(i=i): None}
        shapes = {p: plan.params[p] for p in shapes if p in plan.params}
        try:
            plan.layouts[i] = keymap.detect_expert_layout(i, by_layer.get(i, {}), shapes, where)
        except CheckpointError as e:
            plan.problems.append(e)
            failed.add(i)
    return failed


def _check_dtype(ckpt: Checkpoint, plan: LoadPlan, info: TensorInfo, infos: Mapping[str, TensorInfo],
                 consumed: set[str]) -> TensorInfo | None:
    """Validate a stored dtype; for fp8 return (and consume) the scale tensor."""
    path = ckpt.path(info.file)
    if info.dtype in FLOAT_DTYPES:
        return None
    if info.dtype not in FP8_DTYPES:
        plan.problems.append(DtypeError(f"{info.name} in {path} has dtype {info.dtype}, which cannot be converted "
                                        f"to a floating-point parameter"))
        return None
    if plan.fp8_block is None:
        plan.problems.append(ConfigMismatchError(
            f"config mismatch: {info.name} in {path} is {info.dtype}, but {ckpt.config_path} has no "
            f"quantization_config with quant_method 'fp8'"))
        return None
    skey = scale_key(info.name)
    scale = infos.get(skey)
    if scale is None:
        plan.problems.append(DtypeError(f"{info.name} in {path} is {info.dtype} but its scale {skey} is not in "
                                        f"the checkpoint, so it cannot be dequantised"))
        return None
    consumed.add(skey)
    if len(info.shape) < 2:
        plan.problems.append(DtypeError(f"{info.name} in {path} is {info.dtype} with shape {list(info.shape)}; "
                                        f"only matrices can be block-quantised"))
        return None
    want = scale_shape(info.shape, plan.fp8_block)
    if scale.shape != want:
        plan.problems.append(ShapeMismatchError(
            f"shape mismatch for {skey} in {ckpt.path(scale.file)}: expected {list(want)} "
            f"({plan.fp8_block[0]}x{plan.fp8_block[1]} blocks of {list(info.shape)}), found {list(scale.shape)}"))
    elif scale.dtype not in FLOAT_DTYPES:
        plan.problems.append(DtypeError(f"{skey} in {ckpt.path(scale.file)} has dtype {scale.dtype}; "
                                        f"an fp8 scale must be floating point"))
    return scale


def _plan_param(ckpt: Checkpoint, plan: LoadPlan, name: str, infos: Mapping[str, TensorInfo],
                consumed: set[str]) -> None:
    i = layer_of(name)
    items = []
    layout = plan.layouts.get(i) if i is not None else None
    for piece in keymap.pieces(name, plan.params[name], layout, tied=ckpt.cfg.tie_word_embeddings):
        info = infos.get(piece.key)
        if info is None:
            plan.missing.append(piece.key)
            what = "" if piece.key == name else f" (part of parameter {name})"
            plan.problems.append(MissingKeyError(f"missing key {piece.key}{what} in {ckpt.source}: "
                                                 f"needed by {plan.stage_name}"))
            continue
        consumed.add(piece.key)
        if info.shape != piece.stored_shape:
            plan.problems.append(ShapeMismatchError(
                f"shape mismatch for {piece.key} in {ckpt.path(info.file)}: expected {list(piece.stored_shape)}, "
                f"found {list(info.shape)}"))
            continue
        scale = _check_dtype(ckpt, plan, info, infos, consumed)
        if name in plan.resident:
            _check_resident(ckpt, plan, piece, info, scale)
        items.append(Item(piece, info, scale))
    plan.items[name] = items


def _check_resident(ckpt: Checkpoint, plan: LoadPlan, piece: keymap.Piece, info: TensorInfo,
                    scale: TensorInfo | None) -> None:
    """A piece of a parameter the stage keeps in fp8 must be stored fp8 (with its scale), in blocks that map."""
    where = f"{info.name} in {ckpt.path(info.file)}"
    if info.dtype not in FP8_DTYPES:
        plan.problems.append(DtypeError(f"{where} is stored as {info.dtype}, but {plan.stage_name} keeps "
                                        f"{piece.param} in fp8: run with --fp8-experts dequantize"))
    elif scale is not None and (why := resident_problem(piece, plan.params[piece.param], plan.fp8_block)):
        plan.problems.append(LayoutError(f"{where} cannot stay fp8 in memory: {why}; run with --fp8-experts "
                                         f"dequantize"))


def _check_resident_blocks(ckpt: Checkpoint, plan: LoadPlan, resident: Mapping[str, Shape]) -> None:
    """The stage's fp8 experts must have been made for the checkpoint's block size (their scales' shapes)."""
    for name, have in resident.items():
        if plan.fp8_block is None:
            plan.problems.append(ConfigMismatchError(
                f"config mismatch: {plan.stage_name} keeps {name} in fp8, but {ckpt.config_path} has no "
                f"quantization_config with quant_method 'fp8'"))
            return
        want = resident_scale_shape(name, plan.params[name], plan.fp8_block)
        if tuple(have) != want:
            plan.problems.append(ConfigMismatchError(
                f"config mismatch: {plan.stage_name} keeps {name} in fp8 with scales {list(have)}, but "
                f"{ckpt.config_path}'s weight_block_size {list(plan.fp8_block)} gives {list(want)}"))


def plan_load(ckpt: Checkpoint, params: Mapping[str, Shape], parts: StageParts, stage_name: str,
               resident: Mapping[str, Shape] | None = None) -> LoadPlan:
    """Resolve every parameter of a stage to stored tensors and record every problem; reads headers only.
    ``resident``: the parameters the stage keeps in fp8 -> the shapes of their scales (which are not in ``params``:
    they come with them)."""
    q = ckpt.cfg.quantization
    resident = resident or {}
    plan = LoadPlan(stage_name, parts, dict(params), fp8_block=tuple(q.weight_block_size) if q else None,
                     resident=frozenset(resident))
    _check_resident_blocks(ckpt, plan, resident)
    _check_layer_counts(ckpt, plan.problems)
    owned = [k for k in ckpt.weight_map if parts.owns(k)]
    infos = {k: ckpt.info(k) for k in owned}        # opens the headers of this stage's shards only
    if parts.head and ckpt.cfg.tie_word_embeddings and keymap.TIED_HEAD.key in ckpt.weight_map:
        # read by this stage too, consumed (and accounted for) by the stage holding the embedding
        infos[keymap.TIED_HEAD.key] = ckpt.info(keymap.TIED_HEAD.key)
    _check_anchors(ckpt, infos, plan.problems)
    failed = _detect_layouts(ckpt, plan, infos)
    consumed: set[str] = {k for k in owned if keymap.expert_layer(k) in failed}
    for name in params:
        if layer_of(name) in failed and keymap.expert_layer(name) is not None:
            continue
        _plan_param(ckpt, plan, name, infos, consumed)
    for key in owned:
        if key not in consumed:
            plan.unexpected.append(key)
            plan.problems.append(UnexpectedKeyError(
                f"unexpected key {key} in {ckpt.path(infos[key].file)}: it belongs to {stage_name} "
                f"but no parameter of the stage uses it"))
    return plan
