"""Stage planning: which contiguous decoder layers each pipeline stage owns, and what each stage costs in memory.

A pure function of the config and a few limits (no torch, no devices), so every rank computes the same plan and the
start-up agreement can compare fingerprints.

Ownership rules (docs/distributed_design.md):
- stage 0 holds the vision tower and the token embedding, and owns decoder layers 0 .. num_deepstack-1, the layers
  that receive DeepStack features, so those tensors never cross a stage boundary;
- the last stage holds the final norm and lm_head; every stage owns at least one layer; with one stage it holds all.

Memory per stage (bytes, all conservative):
- weights: its layers, plus vision + embedding on stage 0, plus final norm + lm_head on the last stage
  (``model.param_counts``);
- KV cache: a pool of blocks of ``kv_block_size`` tokens shared by all sequences, the same number of blocks on every
  stage (plus one scratch block): layers x 2 (k, v) x kv_heads x head_dim x dtype bytes x pool tokens. The pool is
  ``max_total_tokens`` when given; otherwise max_seq_len x max_batch tokens, and with memory budgets all that the
  tightest stage has left after weights and activations (the layers are placed so that at least max_seq_len x
  max_batch tokens fit);
- activation / workspace (``_workspace_bytes``): one prefill chunk through one layer, the vision tower on a largest
  image (stage 0), sampling logits (last stage), and a fixed runtime overhead.

Balancing: decode is memory-bound, so a stage's time per decode step is taken as proportional to the weight bytes it
reads per token: attention + router + norms + the top-k experts per layer, plus lm_head on the last stage (~2.8 layers
of the 235B in bf16, ~4.2 in fp8). Vision and embedding cost ~nothing at decode. The balancer minimises the slowest
stage subject to the memory budgets, then evens out the other stages (smallest sum of squared stage times).

With ``tp`` tensor ranks per stage (a grid of stages x tp GPUs, parallel.grid) every figure of a stage is ONE GPU's:
its share of the heads and experts (``model.param_counts``), its kv heads' cache, its workspace; the budget is a
GPU's memory.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from dataclasses import asdict, dataclass
from typing import Callable, Sequence

from ..errors import UserError
from ..model.config import ModelConfig
from ..model.param_counts import WEIGHT_DTYPES, ComponentBytes, component_bytes, local_kv_heads

GB = 10**9  # budgets and reports are in decimal GB, as GPU memory is sold
DEFAULT_MAX_SEQ_LEN = 32768
DEFAULT_PREFILL_CHUNK = 8192
DEFAULT_MAX_BATCH = 4
DEFAULT_MAX_IMAGE_TOKENS = 16384  # merged tokens of the processor's largest image (4096x4096 pixels)
DEFAULT_KV_BLOCK_SIZE = 16  # tokens per KV block (also the granularity of the prefix cache)
RUNTIME_OVERHEAD_BYTES = 2 * GB  # CUDA context, cuBLAS/NCCL workspaces, allocator fragmentation


class PlanError(UserError, ValueError):
    """A stage plan that cannot be built or does not fit; the message says which stage / argument and why."""


@dataclass(frozen=True)
class Stage:
    index: int
    start: int  # first decoder layer (global index)
    stop: int  # one past the last
    holds_vision: bool
    holds_embed: bool
    holds_head: bool  # final norm + lm_head
    weights_bytes: int
    kv_bytes: int  # the KV pool's blocks for this stage's layers
    act_bytes: int  # activation / workspace estimate, runtime overhead included
    decode_bytes: int  # weight bytes read per decode token: the balancing cost
    budget_bytes: int | None
    kv_token_bytes: int  # KV bytes per token of context on this stage (its layers' k and v)

    @property
    def kv_capacity_tokens(self) -> int | None:
        """Tokens of KV this stage's budget has room for beside its weights and activations (None: no budget)."""
        if self.budget_bytes is None:
            return None
        return max(0, self.budget_bytes - self.weights_bytes - self.act_bytes) // self.kv_token_bytes

    @property
    def num_layers(self) -> int:
        return self.stop - self.start

    @property
    def total_bytes(self) -> int:
        return self.weights_bytes + self.kv_bytes + self.act_bytes

    @property
    def fits(self) -> bool | None:
        """None when no budget was given."""
        return None if self.budget_bytes is None else self.total_bytes <= self.budget_bytes

    @property
    def layers_label(self) -> str:
        """Inclusive range, e.g. '0-23'."""
        return f"{self.start}-{self.stop - 1}"

    @property
    def holds_label(self) -> str:
        parts = (["vision", "embed"] if self.holds_vision else []) + (["norm", "head"] if self.holds_head else [])
        return "+".join(parts) or "-"


@dataclass(frozen=True)
class StagePlan:
    stages: tuple[Stage, ...]
    num_layers: int
    dtype: str
    max_seq_len: int
    max_batch: int
    prefill_chunk: int
    max_image_tokens: int
    balanced: bool  # False when the layer counts were given explicitly
    kv_block_size: int = DEFAULT_KV_BLOCK_SIZE
    kv_blocks: int = 0  # blocks in every stage's KV pool (sequences' blocks; the scratch block is extra)
    tp: int = 1  # tensor ranks (GPUs) per stage: every stage figure is one GPU's
    moe: str = "tp"  # how they split the experts (parallel.grid), with tp > 1

    @property
    def max_total_tokens(self) -> int:
        """Tokens of KV the pool holds, all sequences together."""
        return self.kv_blocks * self.kv_block_size

    def sequences_of(self, tokens: int) -> int:
        """How many sequences of ``tokens`` tokens the KV pool holds at once."""
        return self.max_total_tokens // tokens

    @property
    def layer_ranges(self) -> tuple[tuple[int, int], ...]:
        return tuple((s.start, s.stop) for s in self.stages)

    @property
    def fits(self) -> bool | None:
        flags = [s.fits for s in self.stages]
        return None if all(f is None for f in flags) else all(f is not False for f in flags)

    def stage_of_layer(self, layer: int) -> int:
        for s in self.stages:
            if s.start <= layer < s.stop:
                return s.index
        raise IndexError(f"decoder layer {layer} is outside [0, {self.num_layers})")

    def check_fits(self) -> None:
        """Raise PlanError naming the first stage over its budget."""
        for s in self.stages:
            if s.fits is False:
                prefix = "no split fits the memory budgets: " if self.balanced else ""
                per_gpu = " per GPU" if self.tp > 1 else ""
                raise PlanError(f"{prefix}stage {s.index} (layers {s.layers_label}) needs "
                                f"{format_gb(s.total_bytes)} GB{per_gpu} > {s.budget_bytes / GB:g} GB budget")

    def fingerprint(self) -> str:
        """Short stable hash of the layer ranges (and the tensor ranks per stage): ranks compare it before the
        first step."""
        grid = {"tp": self.tp, "moe": self.moe} if self.tp > 1 else {}
        key = json.dumps({"num_layers": self.num_layers, "ranges": [list(r) for r in self.layer_ranges], **grid},
                         separators=(",", ":"))
        return hashlib.sha256(key.encode()).hexdigest()[:16]

    def to_dict(self) -> dict:
        d = {k: v for k, v in asdict(self).items() if k != "stages"}
        d["fingerprint"] = self.fingerprint()
        d["max_total_tokens"] = self.max_total_tokens
        d["sequences_of_32k"] = self.sequences_of(32768)
        d["stages"] = [{**asdict(s), "total_bytes": s.total_bytes, "fits": s.fits,
                        "kv_capacity_tokens": s.kv_capacity_tokens} for s in self.stages]
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)


def format_gb(nbytes: int) -> str:
    """Bytes as GB rounded *up* to 0.1, so a reported need is never below the real one."""
    return f"{math.ceil(nbytes / (GB // 10)) / 10:.1f}"


# --------------------------------------------------------------------------------------------------------------------
# Cost model


@dataclass(frozen=True)
class _Costs:
    """Per-stage bytes as a function of (is first, is last, number of layers); every layer has the same shapes."""

    weights: ComponentBytes  # a tied lm_head is a copy of the embedding matrix on the last stage, so counted there
    kv_token_layer: int  # KV bytes of one token in one layer
    kv_tokens: int  # the pool's tokens, scratch block included
    layer_workspace: int
    vision_workspace: int
    head_workspace: int

    def stage(self, first: bool, last: bool, n: int) -> tuple[int, int, int, int]:
        """(weights, kv, act/workspace, decode read) bytes."""
        w = self.weights
        weights = n * w.layer
        act = self.layer_workspace + RUNTIME_OVERHEAD_BYTES
        decode = n * w.layer_active
        if first:
            weights += w.vision + w.embed
            act += self.vision_workspace
        if last:
            weights += w.final_norm + w.lm_head
            act += self.head_workspace
            decode += w.final_norm + w.lm_head
        return weights, n * self.kv_token_layer * self.kv_tokens, act, decode


def _act_dtype_bytes(dtype: str) -> int:
    return 4 if dtype == "fp32" else 2  # fp8 weights still compute and cache in bf16


def _workspace_bytes(cfg: ModelConfig, dtype: str, chunk: int, image_tokens: int, max_batch: int, tp: int = 1,
                     moe: str = "tp") -> tuple[int, int, int]:
    """(per decoder pass, vision tower on stage 0, sampling on the last stage) activation bytes.

    Decoder, T = the most tokens one step carries (max(prefill chunk, largest image + max_batch decode rows)), live
    at once inside one layer: 4 [T, H] hidden buffers (residual, normed,
    attention out, MoE out); q, k, v before and after norm + rotary and the attention output; per (token, expert)
    gathered input, gate_up, activation and down output; fp32 router logits and probabilities. Attention is a fused
    kernel (no [T, T] scores).
    Vision, N = 4 x image tokens patches: fp32 pixel rows; per block 2 [N, D] hidden, qkv [N, 3D], attention out,
    2 [N, I_v] MLP buffers; merged and DeepStack features [image tokens, H] kept through the decoder pass.
    Sampling: 3 fp32 [max_batch, vocab] (logits, probabilities, a sorted copy for top-p).
    A tensor rank holds its heads' q, k, v; every (token, expert) pair's buffers, its slice of the width (moe tp)
    or the whole width (ep: the kernels' buffers hold all pairs, its experts' or not).
    """
    t, v, b = cfg.text, cfg.vision, _act_dtype_bytes(dtype)
    h, k = t.hidden_size, t.num_experts_per_tok
    i = t.moe_intermediate_size // (tp if moe == "tp" else 1)
    q, kv = t.q_dim // tp, local_kv_heads(cfg, tp) * t.head_dim
    per_token = 4 * h + 2 * (q + 2 * kv) + q + k * (2 * h + 3 * i)
    # the most tokens one step carries: a chunk, or -- the engine never splits an image -- the largest image
    # beside every sequence's decode token
    step = max(chunk, image_tokens + max_batch)
    decoder = step * (b * per_token + 2 * 4 * t.num_experts)
    patches = image_tokens * v.spatial_merge_size**2
    d = v.hidden_size
    vision = (patches * 4 * v.patch_dim + patches * b * (2 * d + 3 * d + d + 2 * v.intermediate_size)
              + (1 + cfg.num_deepstack) * image_tokens * b * v.out_hidden_size)
    head = 3 * 4 * max_batch * t.vocab_size
    return decoder, vision, head


def _costs(cfg: ModelConfig, dtype: str, kv_tokens: int, max_batch: int, chunk: int, image_tokens: int,
           tp: int = 1, moe: str = "tp") -> _Costs:
    """A tensor rank's costs: its share of the weights, the KV of its kv heads (each rank holds the pool's every
    block, for its heads), its workspace."""
    t = cfg.text
    kv_token_layer = 2 * local_kv_heads(cfg, tp) * t.head_dim * _act_dtype_bytes(dtype)
    layer_ws, vision_ws, head_ws = _workspace_bytes(cfg, dtype, chunk, image_tokens, max_batch, tp, moe)
    return _Costs(component_bytes(cfg, dtype, tp), kv_token_layer, kv_tokens, layer_ws, vision_ws, head_ws)


# --------------------------------------------------------------------------------------------------------------------
# Splitting


def _dp(num_layers: int, num_stages: int, choices: Callable[[int], Sequence[int]],
        value: Callable[[int, int], float], combine: Callable[[float, float], float]) -> tuple[int, ...] | None:
    """Layer counts per stage minimising the fold of value(stage, count) with combine (max or +); None if none.

    best maps layers covered so far -> (score, counts); costs are >= 0, so 0 is neutral for both folds. Ties keep
    the first found (deterministic order).
    """
    best: dict[int, tuple[float, tuple[int, ...]]] = {0: (0, ())}
    for s in range(num_stages):
        nxt: dict[int, tuple[float, tuple[int, ...]]] = {}
        for j in sorted(best):
            score, counts = best[j]
            for n in choices(s):
                k = j + n
                if k > num_layers or (s == num_stages - 1 and k != num_layers):
                    continue
                new = combine(score, value(s, n))
                if k not in nxt or new < nxt[k][0]:
                    nxt[k] = (new, counts + (n,))
        best = nxt
    return best[num_layers][1] if num_layers in best else None


def _minimax_split(num_layers: int, num_stages: int, min_first: int, cost: Callable[[int, int], float],
                   allowed: Callable[[int, int], bool]) -> tuple[int, ...] | None:
    """Smallest peak cost over stages, then the smallest sum of squared costs among splits with that peak."""
    def choices(s: int) -> list[int]:
        lo = min_first if s == 0 else 1
        return [n for n in range(lo, num_layers + 1) if allowed(s, n)]

    peak_split = _dp(num_layers, num_stages, choices, cost, max)
    if peak_split is None:
        return None
    peak = max(cost(s, n) for s, n in enumerate(peak_split))
    even = _dp(num_layers, num_stages, lambda s: [n for n in choices(s) if cost(s, n) <= peak],
               lambda s, n: cost(s, n) ** 2, lambda a, b: a + b)
    return even or peak_split


def _balanced_counts(costs: _Costs, num_layers: int, num_stages: int, min_first: int,
                     budgets: list[int] | None) -> tuple[int, ...]:
    last = num_stages - 1

    def bytes_of(s: int, n: int) -> tuple[int, int, int, int]:
        return costs.stage(s == 0, s == last, n)

    def decode(s: int, n: int) -> float:
        return bytes_of(s, n)[3]

    def fits(s: int, n: int) -> bool:
        return budgets is None or sum(bytes_of(s, n)[:3]) <= budgets[s]

    counts = _minimax_split(num_layers, num_stages, min_first, decode, fits)
    if counts is None:  # nothing fits: show the split closest to fitting (smallest need / budget)
        counts = _minimax_split(num_layers, num_stages, min_first,
                                lambda s, n: sum(bytes_of(s, n)[:3]) / budgets[s], lambda s, n: True)
    assert counts is not None  # feasible without budgets: stage counts were validated
    return counts


# --------------------------------------------------------------------------------------------------------------------
# Validation and entry point


def _check_shape(num_layers: int, num_stages: int, num_deepstack: int) -> None:
    if num_stages < 1:
        raise PlanError(f"number of stages must be at least 1, got {num_stages}")
    if num_stages > num_layers:
        raise PlanError(f"cannot split {num_layers} decoder layers into {num_stages} stages "
                        "(each stage needs at least one layer)")
    if num_layers < num_deepstack:
        raise PlanError(f"{num_layers} decoder layers are fewer than the model's {num_deepstack} DeepStack layers "
                        "(vision_config.deepstack_visual_indexes), which stage 0 must hold")
    if num_stages > 1 and num_layers - num_deepstack < num_stages - 1:
        raise PlanError(f"cannot split {num_layers} decoder layers into {num_stages} stages: stage 0 must own the "
                        f"{num_deepstack} DeepStack layers and every other stage at least one layer "
                        f"(at most {num_layers - num_deepstack + 1} stages)")


def _check_counts(counts: Sequence[int], num_layers: int, num_stages: int, num_deepstack: int) -> tuple[int, ...]:
    counts = tuple(counts)
    if len(counts) != num_stages:
        raise PlanError(f"layers per stage lists {len(counts)} entries for {num_stages} stages")
    for i, n in enumerate(counts):
        if n < 1:
            raise PlanError(f"layers per stage: stage {i} gets {n} layers (each stage needs at least 1)")
    if sum(counts) != num_layers:
        raise PlanError(f"layers per stage sum to {sum(counts)} but the model has {num_layers} decoder layers")
    if counts[0] < num_deepstack:
        raise PlanError(f"layers per stage: stage 0 gets {counts[0]} layers but must own the {num_deepstack} "
                        f"DeepStack layers 0-{num_deepstack - 1}")
    return counts


def _budgets(gpu_mem_gb: float | Sequence[float] | None, num_stages: int) -> list[int] | None:
    if gpu_mem_gb is None:
        return None
    values = [gpu_mem_gb] * num_stages if isinstance(gpu_mem_gb, (int, float)) else list(gpu_mem_gb)
    if len(values) != num_stages:
        raise PlanError(f"GPU memory budgets list {len(values)} values for {num_stages} stages")
    for i, gb in enumerate(values):
        if not gb > 0:
            raise PlanError(f"GPU memory budget of stage {i} must be positive, got {gb:g} GB")
    return [round(gb * GB) for gb in values]


def _check_limits(dtype: str, **limits: int | None) -> None:
    if dtype not in WEIGHT_DTYPES:
        raise PlanError(f"dtype must be one of {', '.join(WEIGHT_DTYPES)}, got {dtype!r}")
    for name, value in limits.items():
        if value is not None and value < 1:
            raise PlanError(f"{name} must be at least 1, got {value}")


def default_prefill_chunk(max_seq_len: int, max_batch: int = 1) -> int:
    """Tokens one step carries unless told otherwise: whole prompts up to DEFAULT_PREFILL_CHUNK tokens together,
    longer ones in chunks (so one long prompt neither stalls the running sequences' decoding for its whole length
    nor needs workspace for all of it at once). Never more than all sequence slots can hold
    (``step_token_bound``)."""
    return min(step_token_bound(max_seq_len, max_batch), DEFAULT_PREFILL_CHUNK)


def step_token_bound(max_seq_len: int, max_batch: int) -> int:
    """The most tokens one step can carry: the whole of every running sequence. A larger step budget only grows
    the workspace estimate."""
    return max_seq_len * max_batch


def plan_stages(cfg: ModelConfig, num_stages: int, *, layers_per_stage: Sequence[int] | None = None,
                gpu_mem_gb: float | Sequence[float] | None = None, max_seq_len: int = DEFAULT_MAX_SEQ_LEN,
                max_batch: int = DEFAULT_MAX_BATCH, dtype: str = "bf16", prefill_chunk: int | None = None,
                max_image_tokens: int = DEFAULT_MAX_IMAGE_TOKENS, max_total_tokens: int | None = None,
                kv_block_size: int = DEFAULT_KV_BLOCK_SIZE, require_fit: bool = True, tp: int = 1,
                moe: str = "tp") -> StagePlan:
    """Split the decoder layers of ``cfg`` into ``num_stages`` contiguous stages of ``tp`` tensor ranks each (``moe``:
    how those split the experts, parallel.grid) and size the KV pool.

    ``layers_per_stage`` fixes the counts; otherwise they are balanced on decode bytes within ``gpu_mem_gb`` (one
    budget for all stages or one per stage, decimal GB, per GPU). ``prefill_chunk`` defaults to
    ``default_prefill_chunk`` (what the engine uses when not told); the largest image is capped at ``max_seq_len``
    tokens. The KV pool holds ``max_total_tokens`` (rounded up to whole blocks); by default max_seq_len x max_batch,
    grown with budgets to all that the tightest GPU has room for once the layers are placed.
    With ``require_fit`` a stage over its budget raises PlanError; otherwise the plan is returned with ``fits``
    False on that stage.
    """
    num_layers, num_ds = cfg.text.num_hidden_layers, cfg.num_deepstack
    chunk = default_prefill_chunk(max_seq_len, max_batch) if prefill_chunk is None else prefill_chunk
    _check_limits(dtype, max_seq_len=max_seq_len, max_batch=max_batch, prefill_chunk=chunk,
                  max_image_tokens=max_image_tokens, max_total_tokens=max_total_tokens, kv_block_size=kv_block_size)
    chunk = min(chunk, step_token_bound(max_seq_len, max_batch))
    _check_shape(num_layers, num_stages, num_ds)
    budgets = _budgets(gpu_mem_gb, num_stages)
    image_tokens = min(max_image_tokens, max_seq_len)
    if tp < 1:
        raise PlanError(f"tensor ranks per stage must be at least 1, got {tp}")
    fill = max_total_tokens is None and budgets is not None  # the pool takes what the budgets leave
    pool = max_total_tokens or max_seq_len * max_batch
    blocks = -(-pool // kv_block_size)
    costs = _costs(cfg, dtype, (blocks + 1) * kv_block_size, max_batch, chunk, image_tokens, tp, moe)
    if layers_per_stage is not None:
        counts = _check_counts(layers_per_stage, num_layers, num_stages, num_ds)
    else:
        counts = _balanced_counts(costs, num_layers, num_stages, num_ds, budgets)
    if fill:  # one pool size for all stages: what the tightest one has room for, less its scratch block
        room = min(s.kv_capacity_tokens for s in _build_stages(costs, counts, budgets))
        blocks = max(blocks, room // kv_block_size - 1)
        costs = dataclasses.replace(costs, kv_tokens=(blocks + 1) * kv_block_size)
    plan = StagePlan(stages=_build_stages(costs, counts, budgets), num_layers=num_layers, dtype=dtype,
                     max_seq_len=max_seq_len, max_batch=max_batch, prefill_chunk=chunk,
                     max_image_tokens=image_tokens, balanced=layers_per_stage is None, kv_block_size=kv_block_size,
                     kv_blocks=blocks, tp=tp, moe=moe)
    if require_fit:
        plan.check_fits()
    return plan


def _build_stages(costs: _Costs, counts: Sequence[int], budgets: list[int] | None) -> tuple[Stage, ...]:
    stages, start, last = [], 0, len(counts) - 1
    for i, n in enumerate(counts):
        weights, kv, act, decode = costs.stage(i == 0, i == last, n)
        stages.append(Stage(index=i, start=start, stop=start + n, holds_vision=i == 0, holds_embed=i == 0,
                            holds_head=i == last, weights_bytes=weights, kv_bytes=kv, act_bytes=act,
                            decode_bytes=decode, budget_bytes=None if budgets is None else budgets[i],
                            kv_token_bytes=n * costs.kv_token_layer))
        start += n
    return tuple(stages)
