"""Skinny linear layers for decode (B <= 32 rows): up to three weights that share an input in ONE launch.

Shapes: x [B, K]; weights W_i [N_i, K] (nn.Linear layout); outputs y_i [B, N_i] = x @ W_i^T, fp32 accumulation,
rounded once to x's dtype (as cuBLAS does). Why: the q, k and v projections of a decode step are three GEMVs of
very different sizes (8192, 512, 512 rows); three cuBLAS launches leave the GPU part-idle in each, one launch over
the stacked rows keeps every SM streaming weights. Program j owns BN consecutive rows of the stack [W_0; W_1; W_2].

With ``norm`` the input is first put through an RMSNorm inside the kernel (``y_i = rmsnorm(x) @ W_i^T``): every
program sums its rows' squares itself (the B rows come from L2, a few KB) and normalises each tile it loads, rounding
as ``decode_layer.rmsnorm`` does, so the decode step saves the norm's launch.

With ``pre_wait`` = n (1 or 2) and programmatic dependent launch, every program loads its first n weight tiles
before it waits for the grid before it (kernels.pdl): the weights are never written by the chain, so the loads may
run under the predecessor's tail, where HBM idles, and only the input waits. The early tiles are multiplied in
order before the loop's, so the sums are the same as without.

With ``split`` = S > 1 each row block's reduction is cut into S ranges of whole BK tiles, one program each (grid
[row blocks, S]): S times the programs, and so the weight tiles in flight, for a stack whose row blocks alone leave
the SMs with one program each. Each program stores its fp32 partial sums, and the last of a row block's S programs to
arrive (kernels.arrivals) adds the S partials in range order and rounds once: the result does not depend on which
program finishes last, and differs from the unsplit kernel's only by fp32 summation order.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .arrivals import counters, last_arrival
from .choices import GEMV_STAGES, GEMV_WARPS
from .pdl import grid_dependency, launch_options
from .tiles import fit_stages, load_k_tile, mma, norm_tile, row_rstd

BN, BK, WARPS, STAGES = 32, 256, GEMV_WARPS, GEMV_STAGES  # the pipeline depth the product runs (KernelChoices)


@triton.jit(do_not_specialize=["B"])  # one compile per row bucket BM, whatever the row count (runtime.warmup)
def _gemv_kernel(x_ptr, w0, w1, w2, y0, y1, y2, nw_ptr, eps, B, K, N0, N1, N2, part_ptr, count_ptr, KS, NT,
                 BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, EVEN_K: tl.constexpr, NORM: tl.constexpr,
                 KP: tl.constexpr, PRE: tl.constexpr, PDL: tl.constexpr, SPLIT: tl.constexpr):
    pid = tl.program_id(0)
    # this program's reduction range [k_lo, k_hi): whole BK tiles, KS of them a split (all of K unsplit)
    k_lo = 0
    k_hi = K
    if SPLIT > 1:
        k_lo = tl.program_id(1) * KS
        k_hi = tl.minimum(k_lo + KS, K)
    nb0 = tl.cdiv(N0, BN)
    nb1 = tl.cdiv(N1, BN)
    # pick the weight this row block belongs to (all three share dtype, so the branches agree on types)
    w, y, n, blk = w0, y0, N0, pid
    if pid >= nb0:
        w, y, n, blk = w1, y1, N1, pid - nb0
    if pid >= nb0 + nb1:
        w, y, n, blk = w2, y2, N2, pid - nb0 - nb1
    rows = blk * BN + tl.arange(0, BN)
    rmask = rows < n
    b = tl.arange(0, BM)
    bmask = b < B
    kk = tl.arange(0, BK)
    x_ptrs = x_ptr + b[:, None] * K + k_lo + kk[None, :]
    w_ptrs = w + rows[:, None].to(tl.int64) * K + k_lo + kk[None, :]
    dt = x_ptr.dtype.element_ty
    # the first PRE weight tiles, before the wait (nothing in the chain writes weights)
    if PRE >= 1:
        w_first = load_k_tile(w_ptrs, rmask, k_lo, kk, K, EVEN_K)
    if PRE >= 2:
        w_second = load_k_tile(w_ptrs + BK, rmask, k_lo + BK, kk, K, EVEN_K)
    grid_dependency(PDL)
    rstd = tl.zeros((BM,), tl.float32)
    if NORM:
        rstd = row_rstd(x_ptr, x_ptr, B, K, eps, False, BM, KP)
    acc = tl.zeros((BM, BN), tl.float32)
    if PRE >= 1:
        a = load_k_tile(x_ptrs, bmask, k_lo, kk, K, EVEN_K)
        if NORM:
            a = norm_tile(a, rstd, nw_ptr, k_lo, kk, K, dt)
        acc = mma(a, tl.trans(w_first), acc)
    if PRE >= 2:
        a = load_k_tile(x_ptrs + BK, bmask, k_lo + BK, kk, K, EVEN_K)
        if NORM:
            a = norm_tile(a, rstd, nw_ptr, k_lo + BK, kk, K, dt)
        acc = mma(a, tl.trans(w_second), acc)
    x_ptrs += PRE * BK
    w_ptrs += PRE * BK
    for k0 in range(k_lo + PRE * BK, k_hi, BK):
        a = load_k_tile(x_ptrs, bmask, k0, kk, K, EVEN_K)
        if NORM:
            a = norm_tile(a, rstd, nw_ptr, k0, kk, K, dt)
        wt = load_k_tile(w_ptrs, rmask, k0, kk, K, EVEN_K)
        acc = mma(a, tl.trans(wt), acc)
        x_ptrs += BK
        w_ptrs += BK
    out_mask = bmask[:, None] & rmask[None, :]
    if SPLIT > 1:
        # partial sums [SPLIT, B, NT] (NT: the stack's row blocks x BN); the row block's last arrival adds them
        cols = pid * BN + tl.arange(0, BN)
        tl.store(part_ptr + (tl.program_id(1) * B + b[:, None]) * NT + cols[None, :], acc, mask=out_mask)
        if last_arrival(count_ptr + pid, SPLIT):
            acc = tl.zeros((BM, BN), tl.float32)
            for j in range(SPLIT):
                acc += tl.load(part_ptr + (j * B + b[:, None]) * NT + cols[None, :], mask=out_mask, other=0.0,
                               cache_modifier=".cg")
            tl.store(y + b[:, None] * n + rows[None, :], acc.to(y.dtype.element_ty), mask=out_mask)
    else:
        tl.store(y + b[:, None] * n + rows[None, :], acc.to(y.dtype.element_ty), mask=out_mask)


def linear_small(x: torch.Tensor, *weights: torch.Tensor, bn: int = BN, bk: int = BK, warps: int = WARPS,
                 stages: int = STAGES, pdl: bool = False, norm: tuple[torch.Tensor, float] | None = None,
                 pre_wait: int = 0, split: int = 1) -> tuple[torch.Tensor, ...]:
    """(x @ W_0^T, x @ W_1^T, ...) for 1 to 3 bias-free weights of equal K, in one launch. x [B, K], B <= 64.
    ``norm`` = (weight [K], eps): the products of rmsnorm(x) instead (``decode_layer.rmsnorm``'s rounding).
    ``pdl``: launch with programmatic dependent launch (kernels.pdl); ``pre_wait`` (0, 1 or 2): weight tiles each
    program loads before its wait for the grid before it. ``split``: programs per row block, each over its own
    range of K of cdiv(tiles, split) BK tiles (so fewer programs than asked where that leaves the last ones none:
    4 tiles over 3 run as 2 + 2); their fp32 partials are summed in range order."""
    if not 1 <= len(weights) <= 3:
        raise ValueError("linear_small takes one to three weights")
    if pre_wait not in (0, 1, 2):
        raise ValueError(f"linear_small: pre_wait {pre_wait}: 0, 1 or 2 weight tiles")
    if split < 1:
        raise ValueError(f"linear_small: split {split}: at least 1 program per row block")
    b, k = x.shape
    x = x.contiguous()
    outs = [torch.empty(b, w.shape[0], dtype=x.dtype, device=x.device) for w in weights]
    ws = list(weights) + [weights[0]] * (3 - len(weights))
    ys = outs + [outs[0]] * (3 - len(outs))
    ns = [w.shape[0] for w in weights] + [0] * (3 - len(weights))
    blocks = sum(triton.cdiv(n, bn) for n in ns)
    bm = max(16, triton.next_power_of_2(b))
    nw, eps = norm if norm is not None else (x, 0.0)
    tiles = max(1, triton.cdiv(k, bk))
    per = triton.cdiv(tiles, min(split, tiles))  # BK tiles per split: every split gets at least one
    split = triton.cdiv(tiles, per)  # so fewer splits than asked where they would not divide the tiles evenly
    fewest = tiles - (split - 1) * per  # the last split's tiles
    part, count = x, x  # placeholders the unsplit kernel never touches
    if split > 1:
        part = torch.empty(split, b, blocks * bn, dtype=torch.float32, device=x.device)
        count = counters(x.device, blocks)
    _gemv_kernel[(blocks, split)](x, *ws, *ys, nw, eps, b, k, *ns, part, count, per * bk, blocks * bn,
                                  BM=bm, BN=bn, BK=bk, EVEN_K=k % bk == 0, NORM=norm is not None,
                                  KP=triton.next_power_of_2(k) if norm is not None else 1,
                                  PRE=min(pre_wait, fewest), SPLIT=split, num_warps=warps,
                                  num_stages=fit_stages(stages, (bm + bn) * bk * x.element_size()),
                                  **launch_options(pdl))
    return tuple(outs)
