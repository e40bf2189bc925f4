"""Fused MoE experts for decode-sized batches: Triton kernels that read only the selected experts' weights.

Shapes: T tokens, H hidden, E experts, K experts per token, I expert width, P = T*K (token, expert) pairs; pair
p = t*K + k is token t's k-th choice. BM rows of one block all belong to one expert.

The design (the one public engines use for fused MoE, re-written here):
1. ``align``: sort the P pairs by expert and pad each expert's run to a multiple of BM, so that a block of BM rows
   reads one expert's weights once however many tokens chose it. Output: ``rows`` [NB*BM] (pair index, P = padding)
   and ``block_expert`` [NB] (E = unused block). NB is a bound known from the shapes alone
   (cdiv(P, BM) + min(P, E)), so the grid is static: no host sync, and the whole thing can be captured in a CUDA graph.
2. ``_gate_up_kernel``: per (block, column tile) z = x[token] @ gate_up[e]^T for the gate and up halves, then
   h = silu(gate) * up, stored per pair [P, I].
3. ``_down_kernel``: y = h @ down[e]^T times the pair's routed weight (epilogue), stored per pair [P, H], rounded to
   the activation dtype as the reference rounds it; a token's K pairs are summed in fp32 and rounded once
   (deterministic, no atomics).

fp8-resident experts (model.quant.ExpertScales): each weight tile is loaded as fp8 and multiplied by its rows'
block scales in fp32, rounded once to the activations' dtype, before the product: the same bf16 weights that
dequantising at load time gives, from half the bytes. The reduction tile is then at most one block wide.

W8A8 experts (``ExpertScales.act_quant``): both products take fp8 inputs, quantised per token and group of the
block width (kernels.fp8_quant). Where the gate/up tile allows (``fused_act_quant``), the gate/up kernel quantises
the x tile it loads (its reduction tile is the whole group) and the h tile it computes (its column tile whole groups)
and stores h in fp8 with its scales; elsewhere an act_quant launch runs before each product. The same bits either way.

Rounding follows the reference (model.moe.reference_experts): the gate/up and down products are rounded to the
activation dtype before the activation and before the routed weight, as ``F.linear`` in bf16 would.
"""

from __future__ import annotations

import dataclasses

import torch
import triton
import triton.language as tl

from ..model.quant import FP8_DTYPE, ExpertScales
from . import fp8_fits, fp8_min_block_width
from .choices import CONFIGS, CONFIGS_FP8, CONFIGS_W8A8, DEFAULT, MoeConfig  # noqa: F401 (the tile tables' home)
from .fp8_quant import act_quant, quant_groups, quant_rows
from .arrivals import counters, last_arrival
from .pdl import EARLY, grid_dependency, launch_options
from .tiles import fit_stages, load_k_tile, mma

# The single-program align kernel holds all pairs in one block (a sort of next_pow2(P) keys); above this, the
# one-program-per-expert kernel (align_wide) runs.
ALIGN_KERNEL_MAX_PAIRS = 4096
MAX_GRID_Y = 65535  # CUDA's limit on the grid's second dimension (the row blocks' when cols_first)


def num_blocks(pairs: int, experts: int, bm: int) -> int:
    """Upper bound on padded blocks: every non-empty expert adds < BM padding rows, and at most min(P, E) are hit."""
    return triton.cdiv(pairs, bm) + min(pairs, experts)


# ------------------------------------------------------------------------------------------------------------------
# Alignment


# Token and pair counts are never specialised (``do_not_specialize``): by default Triton compiles a new variant for
# a count that is 1 or a multiple of 16, and a prompt length seen first would wait seconds for the compiler.
@triton.jit(do_not_specialize=["P", "NB"])
def _align_kernel(ids_ptr, rows_ptr, block_expert_ptr, offset_ptr, P, NB,
                  E: tl.constexpr, BM: tl.constexpr, PB: tl.constexpr, EB: tl.constexpr, FILL: tl.constexpr,
                  PDL: tl.constexpr):
    grid_dependency(PDL)
    # One program. ids [P] expert of each pair; offset_ptr [EB] int32 scratch.
    p = tl.arange(0, PB)
    ids = tl.load(ids_ptr + p, mask=p < P, other=E).to(tl.int32)  # padding pairs go to bin E (EB > E)
    # Stable sort of pairs by expert: sort the unique keys expert*PB + pair.
    keys = tl.sort(ids * PB + p)
    s_exp = keys // PB
    s_pair = keys % PB
    valid = s_exp < E
    counts = tl.histogram(ids, EB)
    e = tl.arange(0, EB)
    counts = tl.where(e < E, counts, 0)
    padded = (counts + BM - 1) // BM * BM
    # sorted position i of expert x lands on row i + (padded_start[x] - count_start[x])
    shift = (tl.cumsum(padded, 0) - padded) - (tl.cumsum(counts, 0) - counts)
    tl.store(offset_ptr + e, shift)
    # padding everywhere first; the barrier orders these stores before the scatter below (one CTA)
    for i in range(0, NB * BM, FILL):
        f = i + tl.arange(0, FILL)
        tl.store(rows_ptr + f, P, mask=f < NB * BM)
    for i in range(0, NB, FILL):
        f = i + tl.arange(0, FILL)
        tl.store(block_expert_ptr + f, E, mask=f < NB)
    tl.debug_barrier()
    row = p + tl.load(offset_ptr + s_exp, mask=valid, other=0)
    tl.store(rows_ptr + row, s_pair, mask=valid)
    # every used block holds at least one real pair, so writing each pair's expert to its block covers them all
    tl.store(block_expert_ptr + row // BM, s_exp, mask=valid)


def align_triton(flat_ids: torch.Tensor, experts: int, bm: int, pdl: bool = False
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    p = flat_ids.numel()
    nb = num_blocks(p, experts, bm)
    rows = torch.empty(nb * bm, dtype=torch.int32, device=flat_ids.device)
    block_expert = torch.empty(nb, dtype=torch.int32, device=flat_ids.device)
    eb = triton.next_power_of_2(experts + 1)
    scratch = torch.empty(eb, dtype=torch.int32, device=flat_ids.device)
    pb = max(16, triton.next_power_of_2(p))
    _align_kernel[(1,)](flat_ids, rows, block_expert, scratch, p, nb, E=experts, BM=bm, PB=pb, EB=eb,
                        FILL=1024, num_warps=4 if pb <= 1024 else 8, **launch_options(pdl))
    return rows, block_expert


@triton.jit(do_not_specialize=["P", "NB"])
def _align_wide_kernel(ids_ptr, rows_ptr, block_expert_ptr, P, NB, E: tl.constexpr, BM: tl.constexpr,
                       EB: tl.constexpr, CH: tl.constexpr, FILL: tl.constexpr):
    # Program e < E lays out expert e's run; program E pads the unused tail. Every program histograms all P pairs
    # itself (P reads from L2, no cross-program sync), so one launch does the whole alignment.
    e = tl.program_id(0)
    counts = tl.zeros((EB,), dtype=tl.int32)
    for c0 in range(0, P, CH):
        i = c0 + tl.arange(0, CH)
        counts += tl.histogram(tl.load(ids_ptr + i, mask=i < P, other=E).to(tl.int32), EB)  # padding: bin E
    b = tl.arange(0, EB)
    counts = tl.where(b < E, counts, 0)
    padded = (counts + BM - 1) // BM * BM
    start = tl.sum(tl.where(b < e, padded, 0))  # program E: the end of all runs
    if e < E:
        count = tl.sum(tl.where(b == e, counts, 0))
        run_end = start + tl.sum(tl.where(b == e, padded, 0))
        if count > 0:
            seen = 0
            for c0 in range(0, P, CH):  # this expert's pairs in pair order (a stable sort)
                i = c0 + tl.arange(0, CH)
                hit = (tl.load(ids_ptr + i, mask=i < P, other=E).to(tl.int32) == e).to(tl.int32)
                tl.store(rows_ptr + start + seen + tl.cumsum(hit, 0) - 1, i, mask=hit > 0)
                seen += tl.sum(hit)
            j = tl.arange(0, BM)
            tl.store(rows_ptr + start + count + j, P, mask=start + count + j < run_end)  # the run's padding
            for f0 in range(start // BM, run_end // BM, FILL):
                f = f0 + tl.arange(0, FILL)
                tl.store(block_expert_ptr + f, e, mask=f < run_end // BM)
    else:
        for f0 in range(start, NB * BM, FILL):
            f = f0 + tl.arange(0, FILL)
            tl.store(rows_ptr + f, P, mask=f < NB * BM)
        for f0 in range(start // BM, NB, FILL):
            f = f0 + tl.arange(0, FILL)
            tl.store(block_expert_ptr + f, E, mask=f < NB)


def align_wide(flat_ids: torch.Tensor, experts: int, bm: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Same layout as ``align_triton`` for any P: one program per expert (used above ALIGN_KERNEL_MAX_PAIRS)."""
    p = flat_ids.numel()
    nb = num_blocks(p, experts, bm)
    rows = torch.empty(nb * bm, dtype=torch.int32, device=flat_ids.device)
    block_expert = torch.empty(nb, dtype=torch.int32, device=flat_ids.device)
    _align_wide_kernel[(experts + 1,)](flat_ids, rows, block_expert, p, nb, E=experts, BM=bm,
                                       EB=triton.next_power_of_2(experts + 1), CH=2048, FILL=1024, num_warps=8)
    return rows, block_expert


def align_torch(flat_ids: torch.Tensor, experts: int, bm: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Same layout as ``align_triton`` from torch ops (no host sync): the kernels' test oracle."""
    p, dev = flat_ids.numel(), flat_ids.device
    nb = num_blocks(p, experts, bm)
    ids = flat_ids.long()
    order = torch.sort(ids, stable=True).indices  # pairs by expert, ties in pair order; id E (held elsewhere) last
    counts = torch.zeros(experts + 1, dtype=torch.long, device=dev).scatter_add_(0, ids, torch.ones_like(ids))
    counts = counts[:experts]
    padded = (counts + bm - 1) // bm * bm
    shift = (padded.cumsum(0) - padded) - (counts.cumsum(0) - counts)
    s_exp = ids[order]
    held = s_exp < experts
    row = (torch.arange(p, device=dev) + shift[s_exp.clamp(max=experts - 1)])[held]
    rows = torch.full((nb * bm,), p, dtype=torch.int32, device=dev)
    rows[row] = order[held].int()
    block_expert = torch.full((nb,), experts, dtype=torch.int32, device=dev)
    block_expert[row // bm] = s_exp[held].int()
    return rows, block_expert


# ------------------------------------------------------------------------------------------------------------------
# Expert kernels


@triton.jit
def _block_and_column(COLS_FIRST: tl.constexpr):
    """(row block, column tile) of this program; the grid is (column tiles, blocks) when COLS_FIRST."""
    if COLS_FIRST:
        return tl.program_id(1), tl.program_id(0)
    return tl.program_id(0), tl.program_id(1)


@triton.jit
def _dequant(w, s_ptrs, mask, k0, BC: tl.constexpr, FP8: tl.constexpr, dt: tl.constexpr):
    """An fp8 weight tile [BN, BK] times its rows' block scales (column block k0 // BC: BK divides BC), in fp32,
    rounded once to the activations' dtype: the loader's dequantisation (model.quant); other tiles as they are."""
    if FP8:
        s = tl.load(s_ptrs + k0 // BC, mask=mask, other=0.0)
        w = (w.to(tl.float32) * s[:, None]).to(dt)
    return w


@triton.jit
def _product(a, w, acc, SWAP: tl.constexpr):
    """acc + a @ w^T ([ROWS, BN]: a [ROWS, BK] activations, w [BN, BK] weights), or with SWAP acc + w @ a^T
    ([BN, ROWS])."""
    if SWAP:
        acc = mma(w, tl.trans(a), acc)
    else:
        acc = mma(a, tl.trans(w), acc)
    return acc


@triton.jit
def _accumulate(a, w, acc, sa, s_ptrs, cmask, k0, BC: tl.constexpr, FP8: tl.constexpr, ACT8: tl.constexpr, dt,
                SWAP: tl.constexpr):
    """One reduction step into acc. ACT8: a and w are fp8 and their product (exact in fp32) is scaled by the rows'
    input scales ``sa`` and the columns' block scales (model.quant.w8a8_linear); else a times the dequantised w."""
    if ACT8:
        sw = tl.load(s_ptrs + k0 // BC, mask=cmask, other=0.0)
        if SWAP:
            acc += tl.dot(w, tl.trans(a)) * sa[None, :] * sw[:, None]
        else:
            acc += tl.dot(a, tl.trans(w)) * sa[:, None] * sw[None, :]
    else:
        acc = _product(a, _dequant(w, s_ptrs, cmask, k0, BC, FP8, dt), acc, SWAP)
    return acc


@triton.jit
def _w8a8_input(a, as_ptrs, rmask, k0, BC: tl.constexpr, ACT8: tl.constexpr, QX: tl.constexpr,
                ROWS: tl.constexpr):
    """(the reduction step's activation tile, the rows' input scales). QX (W8A8, BK = BC): ``a`` is the whole
    group of each row in the activations' dtype, quantised here as act_quant does; else with ACT8 it is fp8
    already and its scales are loaded (as_ptrs: each row's first group); else ``a`` as it is and unused scales."""
    if QX:
        q, sa = quant_rows(a.to(tl.float32))
        a = q.to(tl.float8e4nv)
    elif ACT8:
        sa = tl.load(as_ptrs + k0 // BC, mask=rmask, other=0.0)
    else:
        sa = tl.full([ROWS], 1.0, tl.float32)
    return a, sa


@triton.jit
def _store_h(h, h_ptr, hs_ptr, rows, rmask, cols, cmask, col, I, ROWS: tl.constexpr, BN: tl.constexpr,
             BC: tl.constexpr, SWAP: tl.constexpr, QH: tl.constexpr):
    """Store the gate/up tile's h ([ROWS, BN], or [BN, ROWS] with SWAP) at its pairs' rows of h [P, I]. QH (W8A8,
    BN a multiple of BC): h quantised per row and group of BC columns first, its scales stored in hs [P, cdiv(I, BC)]
    (columns past I are 0 in h, so a partial last group's amax is its real columns')."""
    rows64 = rows.to(tl.int64)
    if QH:
        if SWAP:
            h = tl.trans(h)
        q, s = quant_groups(h, ROWS, BN, BC)
        groups = tl.cdiv(I, BC)
        g = col * (BN // BC) + tl.arange(0, BN // BC)
        tl.store(hs_ptr + rows64[:, None] * groups + g[None, :], s, mask=rmask[:, None] & (g < groups)[None, :])
        tl.store(h_ptr + rows64[:, None] * I + cols[None, :], q, mask=rmask[:, None] & cmask[None, :])
    elif SWAP:  # h is [BN, ROWS]
        tl.store(h_ptr + rows64[None, :] * I + cols[:, None], h, mask=rmask[None, :] & cmask[:, None])
    else:
        tl.store(h_ptr + rows64[:, None] * I + cols[None, :], h, mask=rmask[:, None] & cmask[None, :])


@triton.jit
def _gate_up_tile(x_ptr, w_ptr, s_ptr, as_ptr, h_ptr, hs_ptr, dt_ptr, rows_ptr, blk, col, e, P, H, I, SR, SC, AG,
                  K: tl.constexpr, BM: tl.constexpr, ROWS: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
                  EVEN_K: tl.constexpr, TMA: tl.constexpr, FP8: tl.constexpr, BR: tl.constexpr, BC: tl.constexpr,
                  SWAP: tl.constexpr, ACT8: tl.constexpr, QX: tl.constexpr, QH: tl.constexpr):
    # the first ROWS rows of block blk against columns [col*BN, col*BN + BN) of expert e's gate and up halves
    rows = tl.load(rows_ptr + blk * BM + tl.arange(0, ROWS))
    rmask = rows < P
    tok = (rows // K).to(tl.int64)
    cols = col * BN + tl.arange(0, BN)
    cmask = cols < I
    kk = tl.arange(0, BK)
    a_ptrs = x_ptr + tok[:, None] * H + kk[None, :]
    dt = dt_ptr.dtype.element_ty  # the activations' dtype (x and h may both be fp8)
    # FP8: s_ptr = scales [E, 2, SR, SC] (gate's row blocks, then up's); the row block of a gate / up column
    sg_ptrs = s_ptr + e * (2 * SR * SC) + (cols // BR) * SC
    su_ptrs = sg_ptrs + SR * SC
    as_ptrs = as_ptr + tok * AG  # ACT8: x is fp8 and as_ptr its scales [T, AG]
    if SWAP:
        acc_g = tl.zeros((BN, ROWS), dtype=tl.float32)
        acc_u = tl.zeros((BN, ROWS), dtype=tl.float32)
    else:
        acc_g = tl.zeros((ROWS, BN), dtype=tl.float32)
        acc_u = tl.zeros((ROWS, BN), dtype=tl.float32)
    if TMA:  # w_ptr: descriptor over gate_up as [E * 2I, H], block [BN, BK]
        g_row = (e * (2 * I) + col * BN).to(tl.int32)
        for k0 in range(0, H, BK):
            a = load_k_tile(a_ptrs, rmask, k0, kk, H, EVEN_K)
            a, sa = _w8a8_input(a, as_ptrs, rmask, k0, BC, ACT8, QX, ROWS)
            acc_g = _accumulate(a, w_ptr.load([g_row, k0]), acc_g, sa, sg_ptrs, cmask, k0, BC, FP8, ACT8, dt, SWAP)
            acc_u = _accumulate(a, w_ptr.load([g_row + I, k0]), acc_u, sa, su_ptrs, cmask, k0, BC, FP8, ACT8, dt,
                                SWAP)
            a_ptrs += BK
    else:
        g_ptrs = w_ptr + e * (2 * I) * H + cols[:, None].to(tl.int64) * H + kk[None, :]  # [BN, BK], k contiguous
        u_ptrs = g_ptrs + I * H
        for k0 in range(0, H, BK):
            a = load_k_tile(a_ptrs, rmask, k0, kk, H, EVEN_K)
            a, sa = _w8a8_input(a, as_ptrs, rmask, k0, BC, ACT8, QX, ROWS)
            wg = load_k_tile(g_ptrs, cmask, k0, kk, H, EVEN_K)
            wu = load_k_tile(u_ptrs, cmask, k0, kk, H, EVEN_K)
            acc_g = _accumulate(a, wg, acc_g, sa, sg_ptrs, cmask, k0, BC, FP8, ACT8, dt, SWAP)
            acc_u = _accumulate(a, wu, acc_u, sa, su_ptrs, cmask, k0, BC, FP8, ACT8, dt, SWAP)
            a_ptrs += BK
            g_ptrs += BK
            u_ptrs += BK
    g = acc_g.to(dt).to(tl.float32)  # round as the reference's bf16 linear output
    u = acc_u.to(dt).to(tl.float32)
    act = (g * tl.sigmoid(g)).to(dt).to(tl.float32)
    h = (act * u).to(dt)
    _store_h(h, h_ptr, hs_ptr, rows, rmask, cols, cmask, col, I, ROWS, BN, BC, SWAP, QH)


@triton.jit(do_not_specialize=["P"])
def _gate_up_kernel(x_ptr, w_ptr, s_ptr, as_ptr, h_ptr, hs_ptr, dt_ptr, rows_ptr, block_expert_ptr, P, H, I, SR, SC,
                    AG,
                    K: tl.constexpr, E: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
                    EVEN_K: tl.constexpr, COLS_FIRST: tl.constexpr, SPLIT: tl.constexpr, TMA: tl.constexpr,
                    FP8: tl.constexpr, BR: tl.constexpr, BC: tl.constexpr, SWAP: tl.constexpr, ACT8: tl.constexpr,
                    QX: tl.constexpr, QH: tl.constexpr, PDL: tl.constexpr):
    grid_dependency(PDL)
    # x [T, H]; w = gate_up [E, 2I, H] (gate rows [0, I), up rows [I, 2I)); h [P, I]; dt_ptr: any tensor of the
    # activations' dtype (only its element type is read: with W8A8 x and h may both be fp8); FP8: w is fp8 and
    # s_ptr its block scales (BR x BC blocks), else s_ptr is unused; ACT8 (W8A8, with FP8): x is fp8 too, as_ptr
    # its scales [T, AG] (one per BC columns), or with QX x is in the activations' dtype and quantised here
    # (BK = BC); QH: h is stored in fp8 and its scales in hs_ptr [P, cdiv(I, BC)] (BN a multiple of BC)
    blk, col = _block_and_column(COLS_FIRST)
    e = tl.load(block_expert_ptr + blk).to(tl.int64)
    if e >= E:
        return
    # SPLIT: multiply only the first quarter or half of the block when the rest is padding (an expert's real rows
    # come first in its run, so the first row past the quarter / half decides)
    if SPLIT:
        if tl.load(rows_ptr + blk * BM + BM // 4) >= P:
            _gate_up_tile(x_ptr, w_ptr, s_ptr, as_ptr, h_ptr, hs_ptr, dt_ptr, rows_ptr, blk, col, e, P, H, I, SR, SC,
                          AG, K,
                          BM, BM // 4, BN, BK, EVEN_K, TMA, FP8, BR, BC, SWAP, ACT8, QX, QH)
        elif tl.load(rows_ptr + blk * BM + BM // 2) >= P:
            _gate_up_tile(x_ptr, w_ptr, s_ptr, as_ptr, h_ptr, hs_ptr, dt_ptr, rows_ptr, blk, col, e, P, H, I, SR, SC,
                          AG, K,
                          BM, BM // 2, BN, BK, EVEN_K, TMA, FP8, BR, BC, SWAP, ACT8, QX, QH)
        else:
            _gate_up_tile(x_ptr, w_ptr, s_ptr, as_ptr, h_ptr, hs_ptr, dt_ptr, rows_ptr, blk, col, e, P, H, I, SR, SC,
                          AG, K,
                          BM, BM, BN, BK, EVEN_K, TMA, FP8, BR, BC, SWAP, ACT8, QX, QH)
    else:
        _gate_up_tile(x_ptr, w_ptr, s_ptr, as_ptr, h_ptr, hs_ptr, dt_ptr, rows_ptr, blk, col, e, P, H, I, SR, SC, AG,
                      K, BM, BM, BN, BK, EVEN_K, TMA, FP8, BR, BC, SWAP, ACT8, QX, QH)


@triton.jit
def _down_tile(h_ptr, w_ptr, s_ptr, as_ptr, y_ptr, topk_w_ptr, rows_ptr, blk, col, e, w_first, P, H, I, SR, SC, AG,
               BM: tl.constexpr, ROWS: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, EVEN_K: tl.constexpr,
               TMA: tl.constexpr, FP8: tl.constexpr, BR: tl.constexpr, BC: tl.constexpr, SWAP: tl.constexpr,
               ACT8: tl.constexpr, PRE: tl.constexpr):
    # PRE (pointer loads only): w_first is the weight tile at reduction offset 0, loaded before the grid wait
    rows = tl.load(rows_ptr + blk * BM + tl.arange(0, ROWS))
    rmask = rows < P
    rows64 = rows.to(tl.int64)
    cols = col * BN + tl.arange(0, BN)
    cmask = cols < H
    kk = tl.arange(0, BK)
    a_ptrs = h_ptr + rows64[:, None] * I + kk[None, :]
    dt = y_ptr.dtype.element_ty
    s_ptrs = s_ptr + e * (SR * SC) + (cols // BR) * SC  # FP8: scales [E, SR, SC]
    as_ptrs = as_ptr + rows64 * AG  # ACT8: h is fp8 and as_ptr its scales [P, AG]
    if SWAP:
        acc = tl.zeros((BN, ROWS), dtype=tl.float32)
    else:
        acc = tl.zeros((ROWS, BN), dtype=tl.float32)
    if TMA:  # w_ptr: descriptor over down as [E * H, I], block [BN, BK]
        w_row = (e * H + col * BN).to(tl.int32)
        for k0 in range(0, I, BK):
            a = load_k_tile(a_ptrs, rmask, k0, kk, I, EVEN_K)
            a, sa = _w8a8_input(a, as_ptrs, rmask, k0, BC, ACT8, False, ROWS)
            acc = _accumulate(a, w_ptr.load([w_row, k0]), acc, sa, s_ptrs, cmask, k0, BC, FP8, ACT8, dt, SWAP)
            a_ptrs += BK
    else:
        w_ptrs = w_ptr + e * H * I + cols[:, None].to(tl.int64) * I + kk[None, :]  # [BN, BK]
        if PRE:  # the first step with the early tile, in the loop's order
            a = load_k_tile(a_ptrs, rmask, 0, kk, I, EVEN_K)
            a, sa = _w8a8_input(a, as_ptrs, rmask, 0, BC, ACT8, False, ROWS)
            acc = _accumulate(a, w_first, acc, sa, s_ptrs, cmask, 0, BC, FP8, ACT8, dt, SWAP)
            a_ptrs += BK
            w_ptrs += BK
        for k0 in range(PRE * BK, I, BK):
            a = load_k_tile(a_ptrs, rmask, k0, kk, I, EVEN_K)
            a, sa = _w8a8_input(a, as_ptrs, rmask, k0, BC, ACT8, False, ROWS)
            w = load_k_tile(w_ptrs, cmask, k0, kk, I, EVEN_K)
            acc = _accumulate(a, w, acc, sa, s_ptrs, cmask, k0, BC, FP8, ACT8, dt, SWAP)
            a_ptrs += BK
            w_ptrs += BK
    rw = tl.load(topk_w_ptr + rows64, mask=rmask, other=0.0)
    if SWAP:  # acc is [BN, ROWS]
        y = (acc.to(dt) * rw[None, :]).to(dt)  # routed weight in the epilogue, rounded as the reference
        tl.store(y_ptr + rows64[None, :] * H + cols[:, None], y, mask=rmask[None, :] & cmask[:, None])
    else:
        y = (acc.to(dt) * rw[:, None]).to(dt)
        tl.store(y_ptr + rows64[:, None] * H + cols[None, :], y, mask=rmask[:, None] & cmask[None, :])


@triton.jit
def _sum_last(y_ptr, ids_ptr, res_ptr, out_ptr, count_ptr, col, NBLK, T, H, E, K: tl.constexpr, BN: tl.constexpr,
              HAS_RES: tl.constexpr):
    """SUM: the last of the NBLK programs of column tile ``col`` to arrive sums, for every token, its K pairs'
    outputs over the tile's columns as ``_sum_pairs_kernel`` does (fp32, rounded once, then the residual added and
    rounded), from what the others stored (kernels.arrivals)."""
    if last_arrival(count_ptr + col, NBLK):
        c = col * BN + tl.arange(0, BN)
        m = c < H
        dt = out_ptr.dtype.element_ty
        for t in range(T):
            acc = tl.zeros((BN,), tl.float32)
            for k in tl.static_range(K):
                held = tl.load(ids_ptr + t * K + k) < E
                acc += tl.load(y_ptr + (t * K + k) * H + c, mask=m & held, other=0.0,
                               cache_modifier=".cg").to(tl.float32)
            acc = acc.to(dt).to(tl.float32)
            if HAS_RES:
                acc += tl.load(res_ptr + t * H + c, mask=m, other=0.0).to(tl.float32)
            tl.store(out_ptr + t * H + c, acc.to(dt), mask=m)  # T * K * H: decode sizes, int32


@triton.jit(do_not_specialize=["P", "T"])
def _down_kernel(h_ptr, w_ptr, s_ptr, as_ptr, y_ptr, topk_w_ptr, rows_ptr, block_expert_ptr, P, H, I, SR, SC, AG,
                 ids_ptr, res_ptr, out_ptr, count_ptr, T, NBLK,
                 E: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, EVEN_K: tl.constexpr,
                 COLS_FIRST: tl.constexpr, SPLIT: tl.constexpr, TMA: tl.constexpr, FP8: tl.constexpr,
                 BR: tl.constexpr, BC: tl.constexpr, SWAP: tl.constexpr, ACT8: tl.constexpr, PRE: tl.constexpr,
                 SUM: tl.constexpr, K: tl.constexpr, HAS_RES: tl.constexpr, PDL: tl.constexpr):
    # h [P, I]; w = down [E, H, I]; y [P, H] = round(round(h @ w^T) * routed weight of the pair); FP8 / ACT8 as in
    # _gate_up_kernel (ACT8: h is fp8, as_ptr its scales [P, AG])
    # PRE (pointer loads): the block's expert and the first weight tile are read before the grid wait. The layout
    # was written before the gate/up kernel, at least two grids back: every chain kernel waits for its predecessor
    # before it lets its successor launch, so when this grid starts the grid before the one it waits on is complete
    # and its writes are in L2 (read past L1 all the same). Every program waits, those of unused blocks too (were
    # every block unused, a grid that never waited could complete before its predecessor).
    # SUM: the K-sum too (``_sum_last``): out [T, H] from ids [T, K] (and the residual res [T, H] with HAS_RES);
    # every program of a column tile arrives at its counter, those of unused blocks too.
    blk, col = _block_and_column(COLS_FIRST)
    w_first = blk
    if PRE:
        e = tl.load(block_expert_ptr + blk, cache_modifier=".cg").to(tl.int64)
        cols = col * BN + tl.arange(0, BN)
        kk = tl.arange(0, BK)
        w_first = load_k_tile(w_ptr + e * H * I + cols[:, None].to(tl.int64) * I + kk[None, :], (cols < H) & (e < E),
                              0, kk, I, EVEN_K)
    grid_dependency(PDL)  # every program waits, an unused block's too: the grid completes after its predecessor
    if not PRE:
        e = tl.load(block_expert_ptr + blk).to(tl.int64)
    if not SUM:
        if e >= E:
            return
    if e < E:
        if SPLIT:  # as in _gate_up_kernel
            if tl.load(rows_ptr + blk * BM + BM // 4) >= P:
                _down_tile(h_ptr, w_ptr, s_ptr, as_ptr, y_ptr, topk_w_ptr, rows_ptr, blk, col, e, w_first, P, H, I,
                           SR, SC, AG, BM, BM // 4, BN, BK, EVEN_K, TMA, FP8, BR, BC, SWAP, ACT8, PRE)
            elif tl.load(rows_ptr + blk * BM + BM // 2) >= P:
                _down_tile(h_ptr, w_ptr, s_ptr, as_ptr, y_ptr, topk_w_ptr, rows_ptr, blk, col, e, w_first, P, H, I,
                           SR, SC, AG, BM, BM // 2, BN, BK, EVEN_K, TMA, FP8, BR, BC, SWAP, ACT8, PRE)
            else:
                _down_tile(h_ptr, w_ptr, s_ptr, as_ptr, y_ptr, topk_w_ptr, rows_ptr, blk, col, e, w_first, P, H, I,
                           SR, SC, AG, BM, BM, BN, BK, EVEN_K, TMA, FP8, BR, BC, SWAP, ACT8, PRE)
        else:
            _down_tile(h_ptr, w_ptr, s_ptr, as_ptr, y_ptr, topk_w_ptr, rows_ptr, blk, col, e, w_first, P, H, I, SR,
                       SC, AG, BM, BM, BN, BK, EVEN_K, TMA, FP8, BR, BC, SWAP, ACT8, PRE)
    if SUM:
        _sum_last(y_ptr, ids_ptr, res_ptr, out_ptr, count_ptr, col, NBLK, T, H, E, K, BN, HAS_RES)


def fused_experts(x: torch.Tensor, topk_ids: torch.Tensor, topk_w: torch.Tensor, gate_up: torch.Tensor,
                  down: torch.Tensor, scales: ExpertScales | None = None, config: MoeConfig | None = None
                  ) -> torch.Tensor:
    """x [T, H], topk_ids/topk_w [T, K], gate_up [E, 2I, H], down [E, H, I] (fp8 with ``scales``) -> [T, H] in
    x's dtype."""
    y = expert_pairs(x, topk_ids, topk_w, gate_up, down, scales, config)
    return sum_pairs(y, topk_ids, gate_up.shape[0])


@triton.jit
def _sum_pairs_kernel(y_ptr, ids_ptr, h_ptr, out_ptr, H, E, K: tl.constexpr, BLOCK: tl.constexpr,
                      HAS_RES: tl.constexpr, PDL: tl.constexpr):
    grid_dependency(PDL)
    # out[t] = [h[t] +] round(sum_k y[t*K + k] over the pairs whose expert is held here, id < E): the experts' output
    # accumulated in fp32 and rounded once, then the residual add rounded
    t = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    m = c < H
    dt = out_ptr.dtype.element_ty
    acc = tl.zeros((BLOCK,), tl.float32)
    for k in tl.static_range(K):
        held = tl.load(ids_ptr + t * K + k) < E  # a pair of an expert held elsewhere has no output row
        acc += tl.load(y_ptr + (t * K + k) * H + c, mask=m & held, other=0.0).to(tl.float32)
    acc = acc.to(dt).to(tl.float32)
    if HAS_RES:
        acc += tl.load(h_ptr + t * H + c, mask=m, other=0.0).to(tl.float32)
    tl.store(out_ptr + t * H + c, acc.to(dt), mask=m)


def sum_pairs(y: torch.Tensor, topk_ids: torch.Tensor, experts: int, residual: torch.Tensor | None = None,
              pdl: bool = False) -> torch.Tensor:
    """y [T*K, H] pair outputs -> [T, H]: each token's K pairs summed in fp32 and rounded once (pairs with id
    ``experts`` -- held elsewhere -- left out), plus ``residual`` [T, H] (rounded again) if given. ``pdl``: launch
    with programmatic dependent launch (kernels.pdl)."""
    t, k = topk_ids.shape
    hidden = y.shape[1]
    out = torch.empty(t, hidden, dtype=y.dtype, device=y.device)
    block = 1024
    _sum_pairs_kernel[(t, triton.cdiv(hidden, block))](y, topk_ids.contiguous(), y if residual is None else residual,
                                                       out, hidden, experts, K=k, BLOCK=block,
                                                       HAS_RES=residual is not None, num_warps=4,
                                                       **launch_options(pdl))
    return out


def expert_pairs(x: torch.Tensor, topk_ids: torch.Tensor, topk_w: torch.Tensor, gate_up: torch.Tensor,
                 down: torch.Tensor, scales: ExpertScales | None = None, config: MoeConfig | None = None,
                 pdl: bool = False, aligned: tuple[torch.Tensor, torch.Tensor] | None = None,
                 pre_wait: bool = False, summed: tuple[torch.Tensor | None] | None = None) -> torch.Tensor:
    """Each (token, expert) pair's weighted expert output, y [P, H] in x's dtype (pair p = t*K + k), before the
    K-sum. ``pdl``: launch the kernels with programmatic dependent launch (kernels.pdl). ``aligned``: the
    (rows, block_expert) layout in blocks of the config's bm, already made (kernels.router), instead of ``align``.
    ``pre_wait`` (with ``pdl``): the down kernel reads its first weight tile before its grid wait. ``summed`` =
    (residual [T, H] or None,): the K-sum too, in the down kernel's launch -- ``sum_pairs(y, topk_ids, E,
    residual)`` -- and that [T, H] is returned."""
    cfg = config or DEFAULT.moe_config(topk_ids.numel(), scales)
    if scales is not None:  # a reduction tile within one scale block, and at least as wide as tl.dot takes
        least = fp8_min_block_width(scales)
        if not fp8_fits(scales):
            raise ValueError(f"fp8 experts with {scales.block[0]}x{scales.block[1]} blocks: the expert kernels need "
                             f"a power-of-two block width >= {least}{' for W8A8' if scales.act_quant else ''}")
        bc = scales.block[1]
        cfg = dataclasses.replace(cfg, bk=min(max(cfg.bk, least), bc), down_bk=min(max(cfg.down_bk, least), bc))
    x = x.contiguous()
    rows, block_expert = aligned if aligned is not None else align(topk_ids, gate_up.shape[0], cfg.bm, pdl)
    h, h_scales = gate_up_pairs(x, topk_ids.shape, rows, block_expert, gate_up, cfg, scales, pdl)
    return down_pairs(h, topk_w, rows, block_expert, down, cfg, scales, h_scales, x.dtype, pdl, pre_wait,
                      None if summed is None else (topk_ids, summed[0]))


def fused_act_quant(cfg: MoeConfig, scales: ExpertScales | None) -> tuple[bool, bool]:
    """W8A8 (``scales.act_quant``) with tile ``cfg``: whether the gate/up kernel quantises x in its prologue and h
    in its epilogue, instead of an act_quant launch before each product. x: where the reduction tile is the whole
    column group (a row's scale is then the amax of the very tile the kernel loads); h: where its column tile also
    holds whole groups (with ``cfg.fuse_x_quant``, only where x's is fused too). Both give the bits the separate
    launches give; ``cfg.fuse_act_quant`` off keeps those."""
    if scales is None or not scales.act_quant or not cfg.fuse_act_quant:
        return False, False
    whole_h = cfg.bn % scales.block[1] == 0
    if not cfg.fuse_x_quant:
        return False, whole_h
    if cfg.bk != scales.block[1]:
        return False, False
    return True, whole_h


def align(topk_ids: torch.Tensor, experts: int, bm: int, pdl: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows, block_expert) for these routing choices (see the module docstring); ``pdl`` for decode-sized
    routings (the wide kernel of long prompts launches plainly)."""
    flat = topk_ids.reshape(-1)
    if flat.numel() <= ALIGN_KERNEL_MAX_PAIRS:
        return align_triton(flat, experts, bm, pdl)
    return align_wide(flat, experts, bm)


def _scale_args(scales: ExpertScales | None, w_scales: torch.Tensor | None, weight: torch.Tensor,
                input_scales: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, int, int, int, dict]:
    """The kernels' fp8 arguments for one weight (``w_scales``, its part of ``scales``): (weight scales [.., SR, SC],
    input scales [rows, AG], SR, SC, AG, constexprs FP8 / BR / BC / ACT8); placeholder pointers the kernel never
    reads where there are none (no fp8, or W8A8 inputs the kernel quantises itself)."""
    if scales is None:
        return weight, weight, 0, 0, 0, dict(FP8=False, BR=1, BC=1, ACT8=False)
    given = input_scales is not None
    return (w_scales.contiguous(), input_scales if given else w_scales, w_scales.shape[-2], w_scales.shape[-1],
            input_scales.shape[-1] if given else 0,
            dict(FP8=True, BR=scales.block[0], BC=scales.block[1], ACT8=scales.act_quant))


def gate_up_pairs(x: torch.Tensor, routed: torch.Size, rows: torch.Tensor, block_expert: torch.Tensor,
                  gate_up: torch.Tensor, cfg: MoeConfig, scales: ExpertScales | None = None, pdl: bool = False
                  ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(h [P, I], its scales or None): h = silu(x[token] @ gate^T) * (x[token] @ up^T) per pair, for aligned rows;
    x contiguous [>= T, H] in the activations' dtype, routed = (T, K) the routing's shape. W8A8
    (``scales.act_quant``): x and h quantised per token and group of the block width, inside the kernel where
    ``fused_act_quant`` says so, else by act_quant launches; h comes out in fp8 with its scales [P, cdiv(I, bc)]."""
    e, two_i, h_dim = gate_up.shape
    (t, k), inter, nb = routed, two_i // 2, block_expert.numel()
    p, dtype = t * k, x.dtype
    w8a8 = scales is not None and scales.act_quant
    qx, qh = fused_act_quant(cfg, scales)
    x_scales, act = None, x  # act: of the activations' dtype, for the kernel's roundings
    if w8a8 and not qx:
        x, x_scales = act_quant(x, scales.block[1])
    h = torch.empty(p, inter, dtype=FP8_DTYPE if qh else dtype, device=x.device)
    h_scales = (torch.empty(p, triton.cdiv(inter, scales.block[1]), dtype=torch.float32, device=x.device) if qh
                else None)
    grid, cols_first = _grid(nb, triton.cdiv(inter, cfg.bn), cfg)
    arg, tma = _weight_arg(gate_up, cfg.tma, inter, cfg.bn, cfg.bk)
    s_ptr, as_ptr, sr, sc, ag, fp8 = _scale_args(scales, scales.gate_up if scales else None, gate_up, x_scales)
    _gate_up_kernel[grid](
        x, arg, s_ptr, as_ptr, h, h if h_scales is None else h_scales, act, rows, block_expert, p, h_dim, inter, sr,
        sc, ag, K=k, E=e, BM=cfg.bm, BN=cfg.bn, BK=cfg.bk, EVEN_K=h_dim % cfg.bk == 0, COLS_FIRST=cols_first,
        SPLIT=cfg.split, TMA=tma, SWAP=cfg.swap, QX=qx, QH=qh, **fp8, num_warps=cfg.warps,
        **launch_options(pdl),
        # x; gate, up -- an fp8 weight tile is dequantised into a tile of x's dtype (fp8 too for W8A8), so it is
        # counted at that size
        num_stages=fit_stages(cfg.stages, (cfg.bm + 2 * cfg.bn) * cfg.bk * x.element_size()))
    if w8a8 and not qh:
        return act_quant(h, scales.block[1])
    return h, h_scales


def down_pairs(h: torch.Tensor, topk_w: torch.Tensor, rows: torch.Tensor, block_expert: torch.Tensor,
               down: torch.Tensor, cfg: MoeConfig, scales: ExpertScales | None = None,
               h_scales: torch.Tensor | None = None, out_dtype: torch.dtype | None = None, pdl: bool = False,
               pre_wait: bool = False, summed: tuple[torch.Tensor, torch.Tensor | None] | None = None
               ) -> torch.Tensor:
    """y [P, H] = round(h @ down^T) times each pair's routed weight, for aligned rows. W8A8: h is fp8 with
    ``h_scales`` [P, I / block width], and y comes out in ``out_dtype``. ``pre_wait``: the block's expert and first
    weight tile are read before the grid wait (pointer loads only; the layout must come from before the gate/up
    kernel, as it does in ``expert_pairs``). ``summed`` = (topk_ids [T, K], residual [T, H] or None): the last program
    of each column tile to finish also sums each token's K pairs there (kernels.arrivals), and the [T, H] sum is
    returned instead of y."""
    e, h_dim, inter = down.shape
    p, nb = h.shape[0], block_expert.numel()
    dtype = out_dtype or h.dtype
    y = torch.empty(p, h_dim, dtype=dtype, device=h.device)
    col_tiles = triton.cdiv(h_dim, cfg.down_bn)
    grid, cols_first = _grid(nb, col_tiles, cfg)
    arg, tma = _weight_arg(down, cfg.tma, h_dim, cfg.down_bn, cfg.down_bk)
    s_ptr, as_ptr, sr, sc, ag, fp8 = _scale_args(scales, scales.down if scales else None, down, h_scales)
    if summed is not None:
        ids, residual = summed
        t, k = ids.shape
        out = torch.empty(t, h_dim, dtype=dtype, device=h.device)
        sums = (ids.contiguous(), y if residual is None else residual.contiguous(), out,
                counters(h.device, col_tiles), t, nb)
    else:
        k, sums = 1, (y, y, y, rows, 0, nb)
    _down_kernel[grid](
        h, arg, s_ptr, as_ptr, y, topk_w.reshape(-1).to(dtype), rows, block_expert, p, h_dim, inter, sr, sc, ag,
        *sums, SUM=summed is not None, K=k, HAS_RES=summed is not None and summed[1] is not None,
        E=e, BM=cfg.bm, BN=cfg.down_bn, BK=cfg.down_bk,
        EVEN_K=inter % cfg.down_bk == 0, COLS_FIRST=cols_first, SPLIT=cfg.split, TMA=tma, SWAP=cfg.swap, **fp8,
        PRE=pre_wait and not tma and int(pdl) != EARLY, num_warps=cfg.down_warps, **launch_options(pdl),
        num_stages=fit_stages(cfg.down_stages, (cfg.bm + cfg.down_bn) * cfg.down_bk * h.element_size()))
    return y if summed is None else sums[2]


def _weight_arg(w: torch.Tensor, tma: bool, out_rows: int, bn: int, bk: int):
    """The expert weight [E, R, K] as the kernel takes it: a TMA descriptor over [E * R, K] with [bn, bk] blocks
    where asked and possible (tiles of ``bn`` rows never cross an expert's ``out_rows``-row boundary), else the
    tensor itself for pointer loads. Returns (argument, whether it is a descriptor)."""
    e, r, kd = w.shape
    aligned = w.data_ptr() % 16 == 0 and (kd * w.element_size()) % 16 == 0  # TMA's base and row alignment
    if not (tma and w.is_contiguous() and w.numel() > 0 and aligned and out_rows % bn == 0):
        return w, False
    from triton.tools.tensor_descriptor import TensorDescriptor

    return TensorDescriptor(w, [e * r, kd], [kd, 1], [bn, bk]), True


def _grid(blocks: int, col_tiles: int, cfg: MoeConfig) -> tuple[tuple[int, int], bool]:
    """(launch grid, whether it is column-first): cfg's order, unless the blocks exceed the grid's y limit."""
    cols_first = cfg.cols_first and blocks <= MAX_GRID_Y
    return ((col_tiles, blocks) if cols_first else (blocks, col_tiles)), cols_first
