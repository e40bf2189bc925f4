"""Attention of a step's new rows over the KV cache in blocks, all sequences in one Triton launch: prompts, chunks
continuing a cached prefix, and the decode rows of a mixed step.

Shapes: T packed new rows, NH query heads, KVH kv heads, G = NH / KVH query heads per kv head (GP: G rounded up to
a power of two), D head_dim (DP: its tile width, ``tiles.padded_head_dim``), NB cache blocks, BS block size;
sequence i keeps its keys in the blocks of its block table (key p at offset p % BS of block ``table[p // BS]``),
holds ``starts[i]`` cached tokens before this step and brings ``lens[i]`` rows, whose k/v the layer has already
written to the cache.

Why not SDPA: cuDNN builds an execution plan for every new (query length, key length) it sees -- ~40-50 ms of host
time each on the H200, and ~0.6-1.3 s where it compiles a kernel for the shape (scripts/sdpa_first_call.py). Prompt
lengths rarely repeat, and the decode rows of a mixed step bring a new key length every step, so those costs land
on most requests. Here every shape is a runtime value: one compile per dtype and head layout, ever.

Program (block, kv head) takes BM consecutive rows of one sequence and the GP query heads that share the kv head,
as one [BM * GP, D] tile (row m: sequence row r0 + m // GP, head kvh * G + m % GP), so each key/value block is read
once for the whole group. Row r (absolute position start + r) sees keys [0, start + r]. Keys below start + r0 are
visible to every row of the block and need no mask; the rest are masked. Online softmax in fp32 (exp2 with the
scale folded in); the probabilities are rounded to the value dtype for the PV product, as flash attention does.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..model.batch import SeqLayout, aligned_rows
from .decode_attention import head_bases, key_rows
from .tiles import fit_stages, mma, padded_head_dim

LOG2E = 1.4426950408889634
# Tiles by the step's row count T (the smallest key >= T): score-tile rows (BM * GP), keys per inner step, warps,
# pipeline stages. H200, 235B shapes (scripts/extend_attention_probe.py, 16 tiles): rows 64 / 4 warps / 3 stages
# was fastest for a 2048-row prompt (0.21 ms; cuDNN 0.19) and a mixed step (8 decode rows + a 512-row chunk: 0.13
# ms; SDPA per sequence 1.06); rows 128 / 4 warps / 2 stages for a 2048-row chunk after 6144 cached (1.05 ms; cuDNN
# with its mask 1.75) and an 8192-row prompt (2.28 ms; cuDNN 1.77, see PROMPT_SDPA_MIN_TOKENS in kernels.choices).
CONFIGS = {2048: (64, 64, 4, 3), 1 << 30: (128, 64, 4, 2)}


@triton.jit
def _key_block(q, k_base, v_base, tab, k0, hi, pos, sk_b, sk_l, sv_b, sv_l, qk_scale, acc, l_sum, mx, d,
               ROWS: tl.constexpr, D: tl.constexpr, DP: tl.constexpr, BN: tl.constexpr, MASKED: tl.constexpr,
               BS: tl.constexpr, PAGED: tl.constexpr):
    """One online-softmax step over keys [k0, k0 + BN): MASKED applies the causal mask and the key bound ``hi``;
    unmasked blocks lie below every row's position and below ``hi``. Returns the updated (acc, l_sum, mx)."""
    keys = k0 + tl.arange(0, BN)
    km = keys < hi
    kdm = km[:, None] & (d < D)[None, :]  # keys past hi (in MASKED blocks only) and the padding columns
    k_rows = key_rows(k_base, tab, keys, km, sk_b, sk_l, BS, PAGED)
    if MASKED or D != DP:
        k = tl.load(k_rows[:, None] + d[None, :], mask=kdm, other=0.0)
    else:
        k = tl.load(k_rows[:, None] + d[None, :])
    s = mma(q, tl.trans(k), tl.zeros((ROWS, BN), tl.float32)) * qk_scale
    if MASKED:
        s = tl.where(keys[None, :] <= pos[:, None], s, float("-inf"))  # every row sees key 0: never all -inf
    m_new = tl.maximum(mx, tl.max(s, 1))
    p = tl.exp2(s - m_new[:, None])
    alpha = tl.exp2(mx - m_new)
    v_rows = key_rows(v_base, tab, keys, km, sv_b, sv_l, BS, PAGED)
    if MASKED or D != DP:
        v = tl.load(v_rows[:, None] + d[None, :], mask=kdm, other=0.0)
    else:
        v = tl.load(v_rows[:, None] + d[None, :])
    acc = acc * alpha[:, None] + mma(p.to(v.dtype), v, tl.zeros((ROWS, DP), tl.float32))
    return acc, l_sum * alpha + tl.sum(p, 1), m_new


@triton.jit
def _extend_kernel(q_ptr, k_ptr, v_ptr, o_ptr, tab_ptr, W, bt_ptr, qk_scale,
                   sq_t, sq_h, so_t, so_h, st_b, sk_b, sk_h, sk_l, sv_b, sv_h, sv_l,
                   G: tl.constexpr, GP: tl.constexpr, D: tl.constexpr, DP: tl.constexpr, BM: tl.constexpr,
                   BN: tl.constexpr, BS: tl.constexpr, PAGED: tl.constexpr):
    # tab [5, W] int32: per sequence start, len, row offset; per row block its sequence and first row.
    # bt [B, *] int32: the block tables, row stride st_b.
    blk = tl.program_id(0)
    kvh = tl.program_id(1)
    seq = tl.load(tab_ptr + 3 * W + blk)
    r0 = tl.load(tab_ptr + 4 * W + blk)
    start = tl.load(tab_ptr + seq)
    n = tl.load(tab_ptr + W + seq)
    off = tl.load(tab_ptr + 2 * W + seq)
    m = tl.arange(0, BM * GP)
    r = r0 + m // GP
    g = m % GP
    valid = (r < n) & (g < G)
    head = kvh * G + g
    d = tl.arange(0, DP)
    qm = valid[:, None] & (d < D)[None, :]
    rows = (off + r).to(tl.int64)
    q = tl.load(q_ptr + rows[:, None] * sq_t + head[:, None] * sq_h + d[None, :], mask=qm, other=0.0)
    pos = start + r  # the row's absolute position: it sees keys [0, pos]
    tab = bt_ptr + seq.to(tl.int64) * st_b
    k_base, v_base = head_bases(k_ptr, v_ptr, tab, kvh, sk_b, sk_h, sv_b, sv_h, PAGED)
    mx = tl.full((BM * GP,), float("-inf"), tl.float32)
    l_sum = tl.zeros((BM * GP,), tl.float32)
    acc = tl.zeros((BM * GP, DP), tl.float32)
    full = (start + r0) // BN * BN  # keys below this are visible to every row of the block
    hi = start + tl.minimum(r0 + BM, n)
    for k0 in range(0, full, BN):
        acc, l_sum, mx = _key_block(q, k_base, v_base, tab, k0, hi, pos, sk_b, sk_l, sv_b, sv_l, qk_scale, acc,
                                    l_sum, mx, d, BM * GP, D, DP, BN, MASKED=False, BS=BS, PAGED=PAGED)
    for k0 in range(full, hi, BN):
        acc, l_sum, mx = _key_block(q, k_base, v_base, tab, k0, hi, pos, sk_b, sk_l, sv_b, sv_l, qk_scale, acc,
                                    l_sum, mx, d, BM * GP, D, DP, BN, MASKED=True, BS=BS, PAGED=PAGED)
    out = acc / l_sum[:, None]
    tl.store(o_ptr + rows[:, None] * so_t + head[:, None] * so_h + d[None, :], out.to(o_ptr.dtype.element_ty),
             mask=qm)


def supported(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor) -> bool:
    """Whole kv groups, unit inner strides, one dtype (any head_dim: the tiles pad it)."""
    return (q.shape[1] % k_cache.shape[1] == 0 and q.stride(-1) == 1 and k_cache.stride(-1) == 1
            and v_cache.stride(-1) == 1 and q.dtype == k_cache.dtype == v_cache.dtype)


def config(t: int) -> tuple[int, int, int, int]:
    """(score-tile rows, keys per step, warps, stages) for a step of t rows."""
    return CONFIGS[min(n for n in CONFIGS if n >= t)]


def block_rows(group: int, tile_rows: int) -> int:
    """Sequence rows per program: ``tile_rows`` score rows over the group's query heads."""
    return max(1, tile_rows // triton.next_power_of_2(group))


def step_table(layout: SeqLayout, bm: int, device) -> tuple[torch.Tensor, int, int]:
    """(table [5, W] int32 on ``device``, W, number of row blocks), built once per step and shared by the layers:
    rows start, len, row offset per sequence, then sequence and first row per block of ``bm`` rows. Each row
    starts at a multiple of 16 elements (aligned, so Triton compiles one variant)."""
    key = ("extend", bm, str(device))
    if key not in layout._cache:
        blocks = torch.tensor([(i, r0) for i, n in enumerate(layout.lens) for r0 in range(0, n, bm)],
                              dtype=torch.int32).t()
        per_seq = [torch.tensor(x, dtype=torch.int32)
                   for x in (layout.starts, layout.lens, layout.offsets()[:-1])]
        tab = aligned_rows(per_seq + list(blocks), torch.int32, device)
        layout._cache[key] = (tab, tab.shape[1], blocks.shape[1])
    return layout._cache[key]


def extend_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, layout: SeqLayout,
                     scale: float) -> torch.Tensor:
    """q [T, NH, D] (the step's rows, k/v already in the cache) -> [T, NH, D]: causal attention of each sequence's
    rows over its cached tokens, as ``model.attention.reference_cache_attention``."""
    t, nh, d = q.shape
    kvh, bs = k_cache.shape[1], k_cache.shape[2]
    g = nh // kvh
    tile_rows, bn, warps, stages = config(t)
    bm = block_rows(g, tile_rows)
    tab, w, nblk = step_table(layout, bm, q.device)
    tables = layout.block_table(q.device)
    paged = tables.shape[1] > 1
    out = torch.empty(t, nh, d, dtype=q.dtype, device=q.device)
    rows, dp = bm * triton.next_power_of_2(g), padded_head_dim(d)
    stages = fit_stages(stages, (rows + 2 * bn) * dp * q.element_size())
    _extend_kernel[(nblk, kvh)](
        q, k_cache, v_cache, out, tab, w, tables, scale * LOG2E, q.stride(0), q.stride(1), out.stride(0),
        out.stride(1), tables.stride(0), *k_cache.stride()[:3], *v_cache.stride()[:3], G=g,
        GP=triton.next_power_of_2(g), D=d, DP=dp, BM=bm, BN=bn, BS=bs if paged else 1, PAGED=paged,
        num_warps=warps, num_stages=stages)
    return out
