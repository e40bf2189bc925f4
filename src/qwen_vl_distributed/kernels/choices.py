"""The fast paths' tunable choices: one options object that is passed in, never module state a caller rewrites.

The product runs the defaults here (the fastest measured on an H200 at the 235B shapes: docs/benchmarks.md).
``qwen-vl bench`` times alternatives on the device and passes the faster ones to the models it builds
(``enable_fast_paths(model, choices=...)``, ``DecodeGraphs(..., choices=...)``). Plain data, no Triton: importable
on any machine.

- ``gemv``: which decode projections use the one-launch Triton GEMV (kernels.gemv) and its (BN, BK) tile; None:
  cuBLAS per weight. ``gemv_stages``: the depth of that kernel's software pipeline (weight tiles in flight per
  program), the same products in the same order at any depth; ``gemv_warps``: the warps of each of its programs.
  ``gemv_split``: programs per row block, each over a
  range of the reduction (split-K; fp32 partials summed in range order by the last to finish).
- ``moe``: the expert kernels' tile tables (``MoeConfig`` per pair-count bucket) for bf16 / fp32 experts, fp8 experts
  and W8A8 experts (kernels.moe_triton).
- ``fused_max_pairs``: up to this many (token, expert) pairs the fused Triton experts run on CUDA, grouped GEMM above
  (kernels.grouped).
- ``prompt_attention`` / ``prompt_sdpa_min_tokens``: the path of steps that are not all decode rows
  (kernels.attention); ``prompt_fa4``: that path's SDPA calls through FlashAttention 4 where it runs (kernels.cute).
- ``extend_split``: split-KV of that Triton path (``SplitKV``): how finely a row block's key range is cut over
  programs, so the decode rows of a long sequence in a mixed step do not leave the GPU idle (kernels.extend_attention).
- ``quack_min_pairs``: from this many pairs on, bf16 experts run as quack's grouped GEMMs where that optional
  package runs (kernels.cute); 0: never.
- ``vision_backends``: the SDPA backend priority of vision attention, None for torch's own (kernels.vision_attention);
  "FA4" first: FlashAttention 4 (kernels.cute) where that optional package runs, the rest as SDPA's order otherwise.
- ``pdl``: launch the fused layer's kernels with programmatic dependent launch where the GPU can (kernels.pdl); 2:
  each program lets the next grid launch before it waits rather than after.
- ``norm_router_rows``: up to this many rows the fused layer runs residual + RMSNorm + router GEMV + top-k as two
  launches (kernels.router); 0: separate launches.
- ``norm_qkv_rows``: up to this many rows the input RMSNorm runs inside the q/k/v GEMV (kernels.gemv); 0: its own
  launch.
- ``pre_wait``: with PDL, the weight tiles each q/k/v and o GEMV program loads before its grid-dependency wait (0, 1
  or 2), and (> 0) the fused router's weight slice and the experts' first down tile too (kernels.gemv,
  kernels.router, kernels.moe_triton).
- ``packed_topk``: the decode top-k picks by one reduction each (kernels.router.topk_softmax); ``route_warps``:
  the warps of the unfused top-k kernel's program.
- ``sum_in_down_rows``: up to this many rows the experts' K-sum runs in the down kernel's launch
  (kernels.arrivals); 0: its own launch.
- ``router_one_launch``: with ``norm_router_rows``, the router's top-k runs in its GEMV's launch (kernels.router).
- ``qkv_post_in_attention``: a decode step's q/k norm + rotary + cache write run in the attention kernel.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Mapping

@dataclass(frozen=True)
class MoeConfig:
    """Tile shape of the two expert kernels (BM rows of one expert, BN output columns, BK reduction step)."""

    bm: int = 16
    bn: int = 64
    bk: int = 128
    warps: int = 4
    stages: int = 4
    down_bn: int = 64
    down_bk: int = 128
    down_warps: int = 4
    down_stages: int = 4
    # Launch order. False: program_id(0) walks the row blocks, so the programs in flight share one column tile and
    # each reads a different expert's weights (decode: few rows, weights dominate). True: the column tiles of one
    # row block are launched together, so a block's gathered activation rows are read from HBM once and then hit
    # in L2, and the blocks of one expert run together and share its weight tiles in L2 (prefill).
    cols_first: bool = False
    # Partial tiles: a block whose real rows fit in its first BM/4 or BM/2 rows multiplies only those (more
    # tl.dot shapes in the same kernel). Each expert is then padded to BM/4 rows of compute while its weight
    # tiles are still read once per BM rows: at ~BM tokens per expert (a 2048-token prompt at E = 128, K = 8)
    # most experts' second block is a sliver. Needs BM >= 64 (tl.dot takes 16 rows at least).
    split: bool = False
    # Weight tiles through TMA (a host-side tensor descriptor over the [E * rows, K] weight matrix) instead of
    # pointer loads; activation rows stay gathered by pointer. Needs the output width to be a multiple of the
    # column tile (so a tile never crosses into the next expert's rows); otherwise the pointer path runs.
    tma: bool = False
    # The product as weights @ activations^T: the weight tile is the MMA's first operand and the output tile is
    # transposed in registers before the store. Hopper's wgmma takes its first operand from registers, where an
    # fp8 weight tile is dequantised; the second always comes from shared memory. (Tuned for fp8 experts.)
    swap: bool = False
    # W8A8: quantise the experts' inputs inside the gate/up kernel (x in its prologue where bk is the scale block's
    # width, h in its epilogue where bn is a multiple of it: kernels.moe_triton.fused_act_quant), the same bits as
    # the separate act_quant launches in the CPU interpreter; False keeps those launches (the benchmark's A/B).
    # On (h only) in the W8A8 prompt tile since tests/gpu held it to the separate launches on an H100 (CONFIGS_W8A8).
    fuse_act_quant: bool = False
    # With fuse_act_quant: x's quantisation in the prologue too; False: x by its act_quant launch and only h in the
    # gate/up epilogue (the benchmark's third W8A8 path: the fused prologue measured slower on the H100).
    fuse_x_quant: bool = True

    def __post_init__(self):
        if self.split and self.bm < 64:
            raise ValueError(f"MoeConfig: split needs bm >= 64 (a quarter tile of at least 16 rows), got bm={self.bm}")


# chosen per P (pairs) bucket: the smallest bucket >= P wins.
# Defaults: the fastest of ``CANDIDATES`` / ``PREFILL_CANDIDATES`` on an H200 at the 235B shapes
# (docs/benchmarks.md); at decode sizes the top few were within 2% of each other.
CONFIGS: dict[int, MoeConfig] = {
    64: MoeConfig(bn=64, bk=128, warps=4, stages=3, down_bn=64, down_bk=128, down_stages=3),  # B = 1..8 at K = 8
    256: MoeConfig(bn=32, bk=256, warps=4, stages=3, down_bn=64, down_bk=256, down_stages=3),  # B = 32
    # prefill: 128 tokens of one expert per tile, column tiles first, half tiles, TMA weight loads
    1 << 30: MoeConfig(bm=128, bn=128, bk=64, warps=8, stages=4, down_bn=256, down_bk=64, down_warps=8,
                       down_stages=4, cols_first=True, split=True, tma=True),
}


# fp8 experts (reduction tiles at most one scale block wide): their own table, since dequantising in registers
# moves the balance between loads and math. The fastest of FP8_CANDIDATES / FP8_PREFILL_CANDIDATES on an H200 at
# the 235B shapes with 128x128 blocks (docs/benchmarks.md): at B = 1..8 the bf16 decode tile; at B = 32 the weights
# as the MMA's first operand (swap) with TMA loads (2-5% ahead of the next); prompts, the bf16 prompt tile. Not
# swapped there: that was 5% faster, but on the H200 the 8-warp prompt tile with the dequantised weights as the
# first operand doubled the error of an experts call (rel 8.7e-3 against float32 products of the dequantised
# weights, 4.8e-3 unswapped and in bf16; tests/gpu/test_kernels_gpu.py holds the shipped tiles to bf16's error),
# where the decode tiles' swap changes nothing.
CONFIGS_FP8: dict[int, MoeConfig] = {
    64: CONFIGS[64],
    256: MoeConfig(bn=64, bk=128, warps=4, stages=3, down_bn=64, down_bk=128, down_stages=3, tma=True, swap=True),
    1 << 30: CONFIGS[1 << 30],
}


# W8A8 experts (fp8 weights times fp8 inputs, both scaled per block): the weight tile goes to the tensor cores as
# loaded. The fastest of W8A8_CANDIDATES / W8A8_PREFILL_CANDIDATES on an H200 at the 235B shapes with 128x128 blocks
# (docs/benchmarks.md): decode, the bf16 decode tile with the weights as the MMA's first operand (B = 1..32 within 1%
# of the best); prompts, 64 tokens of one expert by 128 columns with the whole 128-column group per step.
_W8A8_DECODE = MoeConfig(bn=64, bk=128, warps=4, stages=3, down_bn=64, down_bk=128, down_stages=3, swap=True)
CONFIGS_W8A8: dict[int, MoeConfig] = {
    64: _W8A8_DECODE,
    256: _W8A8_DECODE,
    # h quantised in the gate/up kernel's epilogue, x by its own launch: 1.07x bf16 against 1.05x for both launches
    # apart on the H200 (2026-12-07), and tests/gpu/test_kernels_gpu.py (fused_quant) gave the separate launches'
    # bits on an H100 (2026-12-08). x in the prologue too was slower (0.56x).
    1 << 30: MoeConfig(bm=64, bn=128, bk=128, warps=4, stages=4, down_bn=128, down_bk=128, down_warps=4,
                       down_stages=4, cols_first=True, tma=True, fuse_act_quant=True, fuse_x_quant=False),
}


# Defaults: the faster on an H200 at the 235B shapes, batch 1 (docs/benchmarks.md).
GEMV_TILES: dict[str, tuple[int, int] | None] = {"qkv": (64, 128), "o": (32, 256), "router": None}
GEMV_MAX_ROWS = 64  # the GEMV kernel is for decode-sized row counts; cuBLAS above
# Pipeline stages of the GEMV kernel (lowered where the tiles would not fit shared memory: tiles.fit_stages). ncu on
# an H100 (2026-12-08, docs/benchmarks.md): at 4 the q/k/v and o GEMVs reach 72-74% of the DRAM peak with one program
# of 4 warps per SM, waiting on global loads; a deeper pipeline keeps more weight tiles in flight per program.
# bench decode (``decode_variants``) times 6 and 8 against this.
GEMV_STAGES = 4
# Warps of each GEMV program: ncu (above) sees one 4-warp program per SM waiting on its loads; 8 warps issue twice the
# loads at a time from the same tile. Timed by bench decode (``decode_variants``) against this.
GEMV_WARPS = 4
# Split-K of the GEMV kernel: programs per row block (1: none). With 2-4 the q/k/v and o GEMVs run 2-4 programs per
# SM instead of one, each streaming its share of K; the partial sums add in another order than one program's, so
# the outputs may differ in the last bit. bench decode (``decode_variants``) times 2 and 4 against this.
GEMV_SPLIT = 1

# On an H200 at the 235B shapes the Triton kernel (prefill tiles) beat grouped_mm at 2048 and 8192 tokens
# (P = 16384, 65536: docs/benchmarks.md).
FUSED_MAX_PAIRS = 65536

# quack's variable-length grouped GEMMs for bf16 experts from this many (token, expert) pairs on (kernels.cute, the
# optional ``hopper`` extra): 0 (off) until a GPU has timed them against the Triton prompt tile (bench prefill's
# ``prefill_moe_quack`` lines, and the layer with them in ``prefill``) and tests/gpu/test_cute_gpu.py has held
# them to the reference.
QUACK_MIN_PAIRS = 0

# Vision attention backends (KernelChoices.vision_backends) a tuple may name: SDPA's, and "FA4" (kernels.cute).
VISION_BACKENDS = ("FA4", "FLASH_ATTENTION", "CUDNN_ATTENTION", "EFFICIENT_ATTENTION", "MATH")

# Steps that are not all decode rows (prompts, chunks, mixed steps): "triton" runs kernels.extend_attention, one
# launch for the step and no per-shape set-up; "sdpa" runs kernels.attention.prefill_attention, one cuDNN-first SDPA
# call per sequence, which cuDNN plans anew for every new shape (kernels/extend_attention.py says what that costs)
# ... except a step that is one whole prompt of at least PROMPT_SDPA_MIN_TOKENS rows: there cuDNN's faster kernel
# (1.77 against 2.28 ms at 8192 rows on the H200) outweighs its ~45 ms plan, and with the default step budget of
# 8192 the first chunk of every longer prompt has exactly that shape, planned once.
PROMPT_ATTENTION = "triton"
PROMPT_SDPA_MIN_TOKENS = 8192
# The SDPA path's calls (a lone long prompt, or every prompt with prompt_attention "sdpa") through FlashAttention 4
# (kernels.cute, optional) instead: no per-shape plan. Off until a GPU has timed it against cuDNN (bench prefill's
# attention lines, "FA4").
PROMPT_FA4 = False

# Split-KV of the Triton attention over the cache (``SplitKV``): on since tests/gpu held it to the reference on an
# H100 and scripts/extend_attention_probe.py --split timed it there (2026-12-07): 8 decode rows at 32k + a 512-row
# chunk 0.945 -> 0.318 ms, one row at 32k + a 64-row chunk 0.891 -> 0.072 ms, 8 rows at 4k + a 2048-row prompt
# 0.441 -> 0.444 ms (docs/benchmarks.md). 0: no split.
EXTEND_SPLIT_PROGRAMS = 264

# Programmatic dependent launch of the fused layer's kernels (kernels.pdl): on since bench decode timed it on an H100
# (2026-12-07, 4 layers of the 235B shapes): batch 1 0.1851 against 0.1941 ms/layer, batch 8 0.7271 against 0.7373,
# outputs identical bit for bit, and tests/gpu/test_decode_graphs_gpu.py held it to plain launches step after step.
PDL = True


# The fused layer's norms inside the next kernels up to this many rows (each program re-reads its rows whole to sum
# their squares, so they are meant for decode-sized batches only). Residual + norm + router + top-k in two launches
# (kernels.router; for one token the top-k kernel also lays out the experts' blocks): 2 launches fewer at batch 1.
# The input norm inside the q/k/v GEMV (kernels.gemv): 1 fewer. On an H100 and an H200 (2026-12-07) both together
# were 6.7-8.5% slower at batch 1: the q/k/v GEMV with the norm 36.6 against 22.4 + 2.0 us apart (H200), residual +
# norm + router 8.1 against 2.0 + 9.2. Timed apart (bench decode ``decode_norm_fusion``, H100, 2026-12-08): the
# router's half 0.983 of the launches at batch 1 and 0.972 at batch 8, identical bits, so it is on up to 8 rows; the
# q/k/v half 1.038 at batch 1, so it stays off.
NORM_ROUTER_ROWS = 8
NORM_QKV_ROWS = 0

# Weights read before the wait (with PDL): each program of the q/k/v and o GEMV loads its first PRE_WAIT weight tiles
# (0, 1 or 2), and (PRE_WAIT > 0) each program of the fused router its weight slice and each program of the experts'
# down kernel its first tile, before it waits for the grid before it, so those loads overlap the predecessor's tail.
# 1 since bench decode (``decode_variants``, H100, 2026-12-08) timed it: one tile 0.989 of none at batch 1 and 0.977
# at batch 8, two tiles 0.996 / 0.979, identical bits; with the fused router on too, 179.0 against 184.7 us per layer
# at batch 1. (Letting the next grid launch before the wait, PDL = 2, was 1.029-1.139 at batch 1: PDL stays 1.)
PRE_WAIT = 1

# The decode top-k (kernels.router.topk_softmax) picks each expert by one reduction over 64-bit (weight, index) keys
# instead of a max and then a min: the same picks and weights in half the cross-warp reductions, on the batch-1 chain
# between the router and the experts. Off: with the router apart it timed 0.999 of the two reductions at batch 1 on
# an H100 (2026-12-08), but inside the fused router (NORM_ROUTER_ROWS) it is slower: 181.3 against 179.0-179.2 us
# per layer at batch 1 (two rounds of bench decode's A/B, and 0.991 for packed off in the decode section's own line).
PACKED_TOPK = False
# Warps of the unfused top-k kernel's program (one per row): with one, its reductions are all within a warp. One warp
# timed 0.992 at batch 1 and 1.061 at batch 8 on an H100 (2026-12-08), and at batch 1 the fused router runs the
# top-k anyway (NORM_ROUTER_ROWS): 4 stays.
ROUTE_WARPS = 4

# Up to this many rows the experts' K-sum (and the residual add) runs in the down kernel's launch: the last program of
# each column tile to finish sums the tokens' pairs there (kernels.arrivals), one launch fewer a layer. 0: its own
# launch. Off: bench decode (``decode_variants``, H100, 2026-12-08) timed it at 0.999 at batch 1, 0.975 at batch 8
# (inside that run's noise), not worth a per-device counter that two streams could not share.
SUM_IN_DOWN_ROWS = 0

# Where the norms run inside the router (``norm_router_rows``): its top-k in the GEMV's launch, done by the program
# that finishes last (kernels.arrivals), not a second launch. Off: 1.017 at batch 1 and 1.074 at batch 8 on an H100
# (2026-12-08): the last program's serial top-k costs more than the launch it saves.
ROUTER_ONE_LAUNCH = False

# A decode step's q/k norm + rotary + k/v cache write inside the split-KV attention kernel (kernels.decode_attention:
# each program normalises its query heads as it loads them and stands the new token's k in for the key not yet
# cached), not a launch of its own. Off: 0.999 at batch 1 on an H100 (2026-12-08), nothing gained for sums in another
# order.
QKV_POST_IN_ATTENTION = False


@dataclass(frozen=True)
class SplitKV:
    """Split-KV of the Triton attention over the cache (kernels.extend_attention): a row block whose keys exceed
    the step's fair share (all its row blocks' keys over ``programs`` programs, at least ``min_keys``) is cut into
    pieces of that many keys, run as programs of their own and merged by log-sum-exp. ``programs`` 0: no split,
    every row block one program in row order. 264 programs: ~2 waves on 132 SMs, as the decode kernel aims for."""

    programs: int = 264
    min_keys: int = 256

    def __post_init__(self):
        if self.programs < 0 or self.min_keys < 1:
            raise ValueError(f"SplitKV: programs >= 0 and min_keys >= 1, got {self.programs}, {self.min_keys}")


MOE_KINDS = ("bf16", "fp8", "w8a8")


def moe_kind(scales) -> str:
    """Which tile table experts with these scales (model.quant.ExpertScales, or None) use."""
    if scales is None:
        return "bf16"
    return "w8a8" if scales.act_quant else "fp8"


@dataclass(frozen=True)
class KernelChoices:
    gemv: Mapping[str, tuple[int, int] | None] = field(default_factory=lambda: dict(GEMV_TILES))
    gemv_stages: int = GEMV_STAGES
    gemv_split: int = GEMV_SPLIT
    gemv_warps: int = GEMV_WARPS
    moe: Mapping[str, Mapping[int, MoeConfig]] = field(
        default_factory=lambda: {"bf16": dict(CONFIGS), "fp8": dict(CONFIGS_FP8), "w8a8": dict(CONFIGS_W8A8)})
    fused_max_pairs: int = FUSED_MAX_PAIRS
    quack_min_pairs: int = QUACK_MIN_PAIRS
    prompt_attention: str = PROMPT_ATTENTION
    prompt_sdpa_min_tokens: int = PROMPT_SDPA_MIN_TOKENS
    prompt_fa4: bool = PROMPT_FA4
    extend_split: SplitKV = SplitKV(programs=EXTEND_SPLIT_PROGRAMS)
    vision_backends: tuple[str, ...] | None = None
    pdl: bool | int = PDL
    norm_router_rows: int = NORM_ROUTER_ROWS
    norm_qkv_rows: int = NORM_QKV_ROWS
    pre_wait: int = PRE_WAIT
    packed_topk: bool = PACKED_TOPK
    route_warps: int = ROUTE_WARPS
    sum_in_down_rows: int = SUM_IN_DOWN_ROWS
    router_one_launch: bool = ROUTER_ONE_LAUNCH
    qkv_post_in_attention: bool = QKV_POST_IN_ATTENTION

    def __post_init__(self):
        if self.prompt_attention not in ("triton", "sdpa"):
            raise ValueError(f"prompt_attention {self.prompt_attention!r}: choose 'triton' or 'sdpa'")
        for name in ("norm_router_rows", "norm_qkv_rows", "sum_in_down_rows"):
            if not 0 <= getattr(self, name) <= GEMV_MAX_ROWS:
                raise ValueError(f"{name} {getattr(self, name)}: 0 (off) to {GEMV_MAX_ROWS} rows")
        if self.pdl not in (0, 1, 2):
            raise ValueError(f"pdl {self.pdl!r}: False (off), True (wait, then let the next grid launch) or 2 (let it "
                             f"launch, then wait: kernels.pdl)")
        if self.route_warps not in (1, 2, 4, 8):
            raise ValueError(f"route_warps {self.route_warps}: 1, 2, 4 or 8")
        if not 1 <= self.gemv_stages <= 8:
            raise ValueError(f"gemv_stages {self.gemv_stages}: 1 to 8 pipeline stages")
        if self.gemv_warps not in (2, 4, 8):
            raise ValueError(f"gemv_warps {self.gemv_warps}: 2, 4 or 8 warps per GEMV program")
        if not 1 <= self.gemv_split <= 8:
            raise ValueError(f"gemv_split {self.gemv_split}: 1 (no split) to 8 programs per row block")
        if self.quack_min_pairs < 0:
            raise ValueError(f"quack_min_pairs {self.quack_min_pairs}: 0 (off) or a pair count")
        unknown = [b for b in self.vision_backends or () if b not in VISION_BACKENDS]
        if unknown:
            raise ValueError(f"vision_backends {unknown}: choose from {', '.join(VISION_BACKENDS)}")
        if "FA4" in (self.vision_backends or ())[1:]:
            raise ValueError(f"vision_backends {list(self.vision_backends)}: FA4 runs only first (it is not an SDPA "
                             f"backend to fall back to)")
        if self.pre_wait not in (0, 1, 2):
            raise ValueError(f"pre_wait {self.pre_wait}: 0 (off), 1 or 2 weight tiles")

    def gemv_tile(self, use: str, rows: int) -> tuple[int, int] | None:
        """The GEMV kernel's tile for projection ``use`` at this row count, or None where cuBLAS runs it."""
        return self.gemv.get(use) if rows <= GEMV_MAX_ROWS else None

    def moe_config(self, pairs: int, scales=None) -> MoeConfig:
        """The expert kernels' tile for ``pairs`` (token, expert) pairs of experts with these scales."""
        table = self.moe[moe_kind(scales)]
        return table[min(b for b in table if b >= pairs)]

    def with_gemv(self, use: str, tile: tuple[int, int] | None) -> "KernelChoices":
        return dataclasses.replace(self, gemv={**self.gemv, use: tile})

    def with_moe(self, scales, pairs: int, config: MoeConfig) -> "KernelChoices":
        """These choices with ``config`` for P in (the next smaller bucket, ``pairs``] of the experts' table."""
        kind = moe_kind(scales)
        return dataclasses.replace(self, moe={**self.moe, kind: {**self.moe[kind], pairs: config}})


DEFAULT = KernelChoices()
