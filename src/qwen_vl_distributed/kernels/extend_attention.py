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

Split-KV: one program per row block walks all of its keys, so the decode row of a 32k-token sequence in a mixed
step is one program walking 32k keys while the rest of the GPU has long finished its prompt rows. A row block with
more keys than the step's fair share (``split_keys``: all row blocks' keys over ``SplitKV.programs``) is cut into
pieces of that many keys, each a program of its own that writes its partial output and log-sum-exp; the cuts lie
at multiples of the key step below the block's first row, so every row sees some key of every piece, and the last
piece holds the causal tail. A second kernel merges each split block's pieces. The plan is built on the host from
the step's lists (``step_plan``), as the row blocks always were: a step with prompt rows is never CUDA-graph
captured, and no device value is read back.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ..model.batch import SeqLayout, aligned_rows
from .choices import DEFAULT, SplitKV
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
def _tile_rows(tab_ptr, W, seq, r0, kvh, G: tl.constexpr, GP: tl.constexpr, D: tl.constexpr, DP: tl.constexpr,
               BM: tl.constexpr):
    """The [BM * GP, DP] tile of rows r0.. of sequence ``seq`` for kv head ``kvh`` (tile row m: sequence row
    r = r0 + m // GP, group head g = m % GP): (packed row (int64), query head, g, r, columns d, the mask of real
    tile rows, and of real rows and columns)."""
    n = tl.load(tab_ptr + W + seq)
    off = tl.load(tab_ptr + 2 * W + seq)
    m = tl.arange(0, BM * GP)
    r = r0 + m // GP
    g = m % GP
    d = tl.arange(0, DP)
    rm = (r < n) & (g < G)
    return (off + r).to(tl.int64), kvh * G + g, g, r, d, rm, rm[:, None] & (d < D)[None, :]


@triton.jit
def _entries(tab_ptr, W, i, ROW: tl.constexpr):
    """Column i of the step table's rows ROW .. ROW + 3 (``step_plan``)."""
    return (tl.load(tab_ptr + ROW * W + i), tl.load(tab_ptr + (ROW + 1) * W + i), tl.load(tab_ptr + (ROW + 2) * W + i),
            tl.load(tab_ptr + (ROW + 3) * W + i))


@triton.jit
def _no_keys(ROWS: tl.constexpr, DP: tl.constexpr):
    """The online softmax's state before any key: (running max, sum, output accumulator)."""
    return (tl.full((ROWS,), float("-inf"), tl.float32), tl.zeros((ROWS,), tl.float32),
            tl.zeros((ROWS, DP), tl.float32))


@triton.jit
def _extend_kernel(q_ptr, k_ptr, v_ptr, o_ptr, po_ptr, pl_ptr, tab_ptr, W, bt_ptr, qk_scale,
                   sq_t, sq_h, so_t, so_h, st_b, sk_b, sk_h, sk_l, sv_b, sv_h, sv_l,
                   G: tl.constexpr, GP: tl.constexpr, D: tl.constexpr, DP: tl.constexpr, BM: tl.constexpr,
                   BN: tl.constexpr, BS: tl.constexpr, PAGED: tl.constexpr):
    # tab [12, W] int32 (``step_plan``): per sequence start, len, row offset; per work item its sequence, first
    # row, key range [lo, hi) and partial row (-1: the item is its block's whole key range, so it writes the
    # output). bt [B, *] int32: the block tables, row stride st_b. po/pl: the pieces' partial outputs and lse.
    it = tl.program_id(0)
    kvh = tl.program_id(1)
    seq, r0, lo, phi = _entries(tab_ptr, W, it, 3)
    part = tl.load(tab_ptr + 7 * W + it)
    start = tl.load(tab_ptr + seq)
    n = tl.load(tab_ptr + W + seq)
    rows, head, g, r, d, rm, qm = _tile_rows(tab_ptr, W, seq, r0, kvh, G, GP, D, DP, BM)
    q = tl.load(q_ptr + rows[:, None] * sq_t + head[:, None] * sq_h + d[None, :], mask=qm, other=0.0)
    pos = start + r  # the row's absolute position: it sees keys [0, pos]
    tab = bt_ptr + seq.to(tl.int64) * st_b
    k_base, v_base = head_bases(k_ptr, v_ptr, tab, kvh, sk_b, sk_h, sv_b, sv_h, PAGED)
    mx, l_sum, acc = _no_keys(BM * GP, DP)
    full = (start + r0) // BN * BN  # keys below this are visible to every row of the block
    hi = start + tl.minimum(r0 + BM, n)
    # A piece ends at a multiple of BN at most ``full``, or at ``hi`` (the last): every row sees a key of it.
    for k0 in range(lo, tl.minimum(full, phi), BN):
        acc, l_sum, mx = _key_block(q, k_base, v_base, tab, k0, hi, pos, sk_b, sk_l, sv_b, sv_l, qk_scale, acc,
                                    l_sum, mx, d, BM * GP, D, DP, BN, MASKED=False, BS=BS, PAGED=PAGED)
    for k0 in range(tl.maximum(full, lo), phi, BN):
        acc, l_sum, mx = _key_block(q, k_base, v_base, tab, k0, hi, pos, sk_b, sk_l, sv_b, sv_l, qk_scale, acc,
                                    l_sum, mx, d, BM * GP, D, DP, BN, MASKED=True, BS=BS, PAGED=PAGED)
    out = acc / l_sum[:, None]
    if part < 0:
        tl.store(o_ptr + rows[:, None] * so_t + head[:, None] * so_h + d[None, :],
                 out.to(o_ptr.dtype.element_ty), mask=qm)
    else:  # partial rows [part + r - r0, kv head, group]: fp32 output and log2-sum-exp2 of the scores
        prow = ((part + r - r0) * tl.num_programs(1) + kvh) * G + g
        tl.store(po_ptr + prow[:, None] * DP + d[None, :], out, mask=qm)
        tl.store(pl_ptr + prow, mx + tl.log2(l_sum), mask=rm)


@triton.jit
def _merge_kernel(po_ptr, pl_ptr, o_ptr, tab_ptr, W, so_t, so_h, G: tl.constexpr, GP: tl.constexpr,
                  D: tl.constexpr, DP: tl.constexpr, BM: tl.constexpr):
    # Program (split block, kv head): tab rows 8-11 give the block's sequence, first row, first partial row and
    # piece count; piece i's partial rows start at first + i * (the block's real rows).
    blk = tl.program_id(0)
    kvh = tl.program_id(1)
    seq, r0, first, pieces = _entries(tab_ptr, W, blk, 8)
    rows, head, g, r, d, rm, qm = _tile_rows(tab_ptr, W, seq, r0, kvh, G, GP, D, DP, BM)
    nr = tl.minimum(tl.load(tab_ptr + W + seq) - r0, BM)
    mx, l_sum, acc = _no_keys(BM * GP, DP)
    for i in range(pieces):
        prow = ((first + i * nr + r - r0) * tl.num_programs(1) + kvh) * G + g
        lse = tl.load(pl_ptr + prow, mask=rm, other=0.0)
        o = tl.load(po_ptr + prow[:, None] * DP + d[None, :], mask=qm, other=0.0)
        m_new = tl.maximum(mx, lse)
        alpha = tl.exp2(mx - m_new)
        w = tl.exp2(lse - m_new)
        acc = acc * alpha[:, None] + o * w[:, None]
        l_sum = l_sum * alpha + w
        mx = m_new
    tl.store(o_ptr + rows[:, None] * so_t + head[:, None] * so_h + d[None, :],
             (acc / l_sum[:, None]).to(o_ptr.dtype.element_ty), mask=qm)


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


@dataclass(frozen=True)
class StepPlan:
    """The work of one step's launch, built once per step on the host and shared by the layers."""

    table: torch.Tensor  # [12, width] int32 on the device: the rows the kernels read (``step_plan``)
    width: int
    items: int  # programs per kv head of the attention kernel: row blocks, or pieces of a split one
    split_blocks: int  # row blocks cut into pieces: programs per kv head of the merge
    partial_rows: int  # sequence rows of partial results (each over every query head)


def _row_blocks(lens: torch.Tensor, bm: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(sequence, first row) of every block of ``bm`` rows, sequence after sequence."""
    nb = (lens + bm - 1) // bm
    seq = torch.arange(len(lens)).repeat_interleave(nb)
    return seq, (torch.arange(len(seq)) - (torch.cumsum(nb, 0) - nb)[seq]) * bm


def split_keys(keys: torch.Tensor, kv_heads: int, bn: int, split: SplitKV) -> int:
    """Keys per piece of a split row block, a multiple of ``bn``: the step's fair share (its row blocks' ``keys``
    over ``split.programs`` programs), at least ``split.min_keys``. 0: no split."""
    if split.programs == 0:
        return 0
    share = -(-int(keys.sum()) * kv_heads // split.programs)
    return -(-max(share, split.min_keys) // bn) * bn


def _pieces(full: torch.Tensor, hi: torch.Tensor, chunk: int):
    """Each row block's key range [0, hi) cut at multiples of ``chunk`` below ``full`` (so every piece but the
    last is seen whole by every row, and the last holds the causal tail): (block of each piece, lo, hi, pieces
    per block)."""
    pieces = ((full + chunk - 1) // chunk).clamp_min(1) if chunk else torch.ones_like(full)
    blk = torch.arange(len(full)).repeat_interleave(pieces)
    j = torch.arange(len(blk)) - (torch.cumsum(pieces, 0) - pieces)[blk]
    last = j == pieces[blk] - 1
    return blk, j * chunk, torch.where(last, hi[blk], (j + 1) * chunk), pieces


def step_plan(layout: SeqLayout, bm: int, bn: int, kv_heads: int, split: SplitKV, device) -> StepPlan:
    """The step's work items for blocks of ``bm`` rows and key steps of ``bn``. Table rows: start, len, row offset
    per sequence; sequence, first row, key range lo and hi, partial row (-1: none) per item; sequence, first row,
    first partial row and piece count per split block. Where a block is cut, the items run longest first, so that
    the long pieces do not start last and leave a tail; else in row order, one per block. Each row starts at a
    multiple of 16 elements (aligned, so Triton compiles one variant)."""
    key = ("extend", bm, bn, kv_heads, split, str(device))
    if key not in layout._cache:
        starts, lens = (torch.tensor(x, dtype=torch.long) for x in (layout.starts, layout.lens))
        seq, r0 = _row_blocks(lens, bm)
        st, n = starts[seq], lens[seq]
        hi = st + torch.minimum(r0 + bm, n)
        chunk = split_keys(hi, kv_heads, bn, split)
        blk, lo, phi, pieces = _pieces((st + r0) // bn * bn, hi, chunk)
        cut = pieces > 1
        rows = torch.where(cut, torch.minimum(n - r0, torch.tensor(bm)), 0)[blk]  # each piece's partial rows
        part = torch.where(cut[blk], torch.cumsum(rows, 0) - rows, -1)
        items = [seq[blk], r0[blk], lo, phi, part]
        if cut.any():
            order = torch.argsort(phi - lo, descending=True, stable=True)
            items = [x[order] for x in items]
        first_piece = (torch.cumsum(pieces, 0) - pieces)[cut]
        merge = [seq[cut], r0[cut], part[first_piece], pieces[cut]]
        offsets = torch.tensor(layout.offsets()[:-1], dtype=torch.long)
        tab = aligned_rows([starts, lens, offsets, *items, *merge], torch.int32, device)
        layout._cache[key] = StepPlan(tab, tab.shape[1], len(blk), int(cut.sum()), int(rows.sum()))
    return layout._cache[key]


def extend_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, layout: SeqLayout,
                     scale: float, split: SplitKV = DEFAULT.extend_split) -> torch.Tensor:
    """q [T, NH, D] (the step's rows, k/v already in the cache) -> [T, NH, D]: causal attention of each sequence's
    rows over its cached tokens, as ``model.attention.reference_cache_attention``; row blocks with more keys than
    the step's fair share split over several programs (``split``)."""
    t, nh, d = q.shape
    kvh, bs = k_cache.shape[1], k_cache.shape[2]
    g = nh // kvh
    tile_rows, bn, warps, stages = config(t)
    bm = block_rows(g, tile_rows)
    plan = step_plan(layout, bm, bn, kvh, split, q.device)
    tables = layout.block_table(q.device)
    paged = tables.shape[1] > 1
    out = torch.empty(t, nh, d, dtype=q.dtype, device=q.device)
    gp, dp = triton.next_power_of_2(g), padded_head_dim(d)
    part_o = torch.empty(max(1, plan.partial_rows * nh), dp, dtype=torch.float32, device=q.device)
    part_lse = torch.empty(part_o.shape[0], dtype=torch.float32, device=q.device)
    stages = fit_stages(stages, (bm * gp + 2 * bn) * dp * q.element_size())
    _extend_kernel[(plan.items, kvh)](
        q, k_cache, v_cache, out, part_o, part_lse, plan.table, plan.width, tables, scale * LOG2E, q.stride(0),
        q.stride(1), out.stride(0), out.stride(1), tables.stride(0), *k_cache.stride()[:3], *v_cache.stride()[:3],
        G=g, GP=gp, D=d, DP=dp, BM=bm, BN=bn, BS=bs if paged else 1, PAGED=paged, num_warps=warps,
        num_stages=stages)
    if plan.split_blocks:
        _merge_kernel[(plan.split_blocks, kvh)](part_o, part_lse, out, plan.table, plan.width, out.stride(0),
                                                out.stride(1), G=g, GP=gp, D=d, DP=dp, BM=bm, num_warps=8)
    return out
