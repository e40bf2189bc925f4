"""The MoE router of a decode step in two launches: residual add + RMSNorm + router GEMV split over the hidden
dimension, then the top-k choice with, for one token, the experts' block layout written beside it. Or in one
(``one_launch``): the GEMV's last program to finish does the second launch's work (kernels.arrivals).

Shapes: B rows (decode tokens), H hidden, E experts, K experts per token; S = cdiv(H, SW) slices of SW hidden
columns.

Why: at batch 1 the unfused chain after the o projection is four short launches -- residual + RMSNorm, the router
GEMV (cuBLAS, 128 x 4096: a handful of blocks read 1 MB), softmax + top-k, and the experts' alignment -- each paying
a launch, a tail and a ramp inside the graph, ~9 us of the router alone against ~0.4 us of bytes. Here:

1. ``_norm_router_kernel``, program s of S: h = round(o + residual) and x = rmsnorm(h) for its SW columns (every
   program first sums the whole rows' squares itself: B * H values from L2, a row per load), stores those columns
   of h and x (the residual stream and the experts' input), and the partial logits x[:, slice] @ W[:, slice]^T in
   fp32 into a scratch [S, B, E]. Every program reads E * SW weights, so the 1 MB is spread over ~all SMs.
2. ``_route_partials_kernel``, one program per row: the S partials summed in a fixed order (deterministic), rounded
   once to the activations' dtype (as the router's linear layer rounds its output), then softmax in fp32, top-K and
   renormalisation exactly as ``decode_layer.route``. For one token it also writes the aligned layout the expert
   kernels take (kernels.moe_triton): its K choices are K distinct experts, so block j holds pair j alone and no
   sort is needed -- the alignment launch is gone too.

Rounding is the unfused chain's op by op; the logits differ from cuBLAS's only by the fp32 summation order.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .arrivals import counters, last_arrival
from .pdl import grid_dependency, launch_options
from .tiles import row_rstd

SLICE = 32  # hidden columns per program of the router GEMV: 128 programs at H = 4096 (the H100 has 132 SMs)


@triton.jit
def topk_softmax(logits, e, kk, K: tl.constexpr, EB: tl.constexpr, NORMALIZE: tl.constexpr,
                 PACKED: tl.constexpr = False):
    """Softmax (fp32) of one row's ``logits`` [EB] (-inf past E) -> (top-K weights, ids) [KB]: descending, the
    lowest index on ties, renormalised over the K if NORMALIZE (model.moe.route's choice). PACKED: each pick is
    one reduction, not two -- the max of 64-bit keys (p's bits above, EB - 1 - e below: p >= 0, whose bits order
    as the values do, and on a tie the lower index wins) -- the same picks and weights."""
    p = tl.exp(logits - tl.max(logits, 0))
    p = p / tl.sum(p, 0)
    top_w = tl.zeros(kk.shape, tl.float32)
    top_i = tl.zeros(kk.shape, tl.int32)
    if PACKED:
        key = (p.to(tl.int32, bitcast=True).to(tl.int64) << 32) | (EB - 1 - e).to(tl.int64)
        for k in tl.static_range(K):
            best = tl.max(key, 0)
            w = (best >> 32).to(tl.int32).to(tl.float32, bitcast=True)
            idx = (EB - 1 - (best & 0xFFFFFFFF)).to(tl.int32)
            top_w = tl.where(kk == k, w, top_w)
            top_i = tl.where(kk == k, idx, top_i)
            key = tl.where(key == best, -1, key)
    else:
        for k in tl.static_range(K):
            best = tl.max(p, 0)
            idx = tl.min(tl.where(p == best, e, EB), 0)
            top_w = tl.where(kk == k, best, top_w)
            top_i = tl.where(kk == k, idx, top_i)
            p = tl.where(e == idx, -1.0, p)
    if NORMALIZE:
        top_w = top_w / tl.sum(top_w, 0)
    return top_w, top_i


@triton.jit(do_not_specialize=["B"])
def _norm_router_kernel(o_ptr, res_ptr, nw_ptr, w_ptr, h_ptr, x_ptr, part_ptr, B, H, E, eps,
                        w_out, ids_out, rows_ptr, block_expert_ptr, count_ptr, S,
                        BM: tl.constexpr, SW: tl.constexpr, EB: tl.constexpr, HP: tl.constexpr,
                        EARLY: tl.constexpr, LAST: tl.constexpr, K: tl.constexpr, KB: tl.constexpr,
                        SB: tl.constexpr, ABM: tl.constexpr, NORMALIZE: tl.constexpr, ALIGN: tl.constexpr,
                        PACKED: tl.constexpr, PDL: tl.constexpr):
    # LAST: the program that finishes last (kernels.arrivals) also routes every row, as _route_partials_kernel
    s = tl.program_id(0)
    col = s * SW + tl.arange(0, SW)
    cm = col < H
    e = tl.arange(0, EB)
    w_ptrs = w_ptr + e[:, None].to(tl.int64) * H + col[None, :]
    w_mask = (e < E)[:, None] & cm[None, :]
    if EARLY:  # the router's weight slice before the wait for the grid before (nothing in the chain writes it)
        wt = tl.load(w_ptrs, mask=w_mask, other=0.0)
    grid_dependency(PDL)
    dt = x_ptr.dtype.element_ty
    b = tl.arange(0, BM)
    bm = b < B
    rstd = row_rstd(o_ptr, res_ptr, B, H, eps, True, BM, HP)  # of the whole rows of h = round(o + residual)
    # this program's columns: h and x stored, x into the partial product
    m = bm[:, None] & cm[None, :]
    off = b[:, None] * H + col[None, :]
    hv = (tl.load(o_ptr + off, mask=m, other=0.0).to(tl.float32)
          + tl.load(res_ptr + off, mask=m, other=0.0).to(tl.float32)).to(dt)
    tl.store(h_ptr + off, hv, mask=m)
    n = (hv.to(tl.float32) * rstd[:, None]).to(dt).to(tl.float32)
    xv = (tl.load(nw_ptr + col, mask=cm, other=0.0).to(tl.float32)[None, :] * n).to(dt)
    tl.store(x_ptr + off, xv, mask=m)
    if not EARLY:
        wt = tl.load(w_ptrs, mask=w_mask, other=0.0)
    if xv.dtype == tl.float32:
        part = tl.dot(xv, tl.trans(wt), input_precision="ieee")
    else:
        part = tl.dot(xv, tl.trans(wt))
    tl.store(part_ptr + (s * B + b[:, None]) * E + e[None, :], part, mask=bm[:, None] & (e < E)[None, :])
    if LAST:
        if last_arrival(count_ptr, S):
            for row in range(B):
                _route_row(part_ptr, w_out, ids_out, rows_ptr, block_expert_ptr, row, S, B, E, K, EB, KB, SB, ABM,
                           NORMALIZE, ALIGN, PACKED, True)


@triton.jit
def _route_row(part_ptr, w_out, ids_out, rows_ptr, block_expert_ptr, row, S, B, E, K: tl.constexpr,
               EB: tl.constexpr, KB: tl.constexpr, SB: tl.constexpr, BM: tl.constexpr, NORMALIZE: tl.constexpr,
               ALIGN: tl.constexpr, PACKED: tl.constexpr, CG: tl.constexpr):
    """Row ``row``'s S partial logits summed in a fixed order, rounded, then softmax + top-K (and, ALIGN, the
    experts' block layout). CG: the partials are read past L1 (other programs of this launch wrote them)."""
    e = tl.arange(0, EB)
    sb = tl.arange(0, SB)
    acc = tl.zeros((EB,), tl.float32)
    for s0 in range(0, S, SB):
        m = ((s0 + sb) < S)[:, None] & (e < E)[None, :]
        ptrs = part_ptr + ((s0 + sb[:, None]) * B + row) * E + e[None, :]
        if CG:
            acc += tl.sum(tl.load(ptrs, mask=m, other=0.0, cache_modifier=".cg"), 0)
        else:
            acc += tl.sum(tl.load(ptrs, mask=m, other=0.0), 0)
    dt = w_out.dtype.element_ty
    logits = tl.where(e < E, acc.to(dt).to(tl.float32), float("-inf"))  # the router's output, rounded
    kk = tl.arange(0, KB)
    top_w, top_i = topk_softmax(logits, e, kk, K, EB, NORMALIZE, PACKED)
    tl.store(w_out + row * K + kk, top_w.to(dt), mask=kk < K)
    tl.store(ids_out + row * K + kk, top_i, mask=kk < K)
    if ALIGN:  # one token (one program): block j is pair j alone, on expert ids[j]; the rest of its rows padding
        r = tl.arange(0, KB)[:, None] * BM + tl.arange(0, BM)[None, :]
        first = (tl.arange(0, BM) == 0)[None, :]
        tl.store(rows_ptr + r, tl.where(first, r // BM, K), mask=r < K * BM)
        tl.store(block_expert_ptr + kk, top_i, mask=kk < K)


@triton.jit(do_not_specialize=["B"])
def _route_partials_kernel(part_ptr, w_out, ids_out, rows_ptr, block_expert_ptr, S, B, E,
                           K: tl.constexpr, EB: tl.constexpr, KB: tl.constexpr, SB: tl.constexpr,
                           BM: tl.constexpr, NORMALIZE: tl.constexpr, ALIGN: tl.constexpr, PACKED: tl.constexpr,
                           PDL: tl.constexpr):
    grid_dependency(PDL)
    _route_row(part_ptr, w_out, ids_out, rows_ptr, block_expert_ptr, tl.program_id(0), S, B, E, K, EB, KB, SB, BM,
               NORMALIZE, ALIGN, PACKED, False)


def norm_route(o: torch.Tensor, residual: torch.Tensor, norm_weight: torch.Tensor, eps: float,
               router: torch.Tensor, k: int, normalize: bool, align_bm: int | None = None, pdl: bool = False,
               slice_width: int = SLICE, early: bool = False, packed: bool = False, one_launch: bool = False):
    """The decode chain from the attention output to the experts' routing, in two launches (or one): o, residual [B, H]
    -> (h = o + residual, x = rmsnorm(h), routed weights [B, K] in o's dtype, expert ids [B, K] int32, aligned):
    aligned = (rows [K * bm], block_expert [K]) as ``moe_triton.align`` lays them out for one token when
    ``align_bm`` is given and B = 1, else None. router [E, H] is the gate's bias-free weight. ``early``: each program
    loads its slice of the router's weight before it waits for the grid before it (kernels.pdl); ``packed``: the
    top-k picks by one reduction each (``topk_softmax``); ``one_launch``: the GEMV's last program to finish routes
    (kernels.arrivals) instead of a second launch."""
    b, hidden = o.shape
    e = router.shape[0]
    o, residual = o.contiguous(), residual.contiguous()
    h, x = torch.empty_like(o), torch.empty_like(o)
    s = triton.cdiv(hidden, slice_width)
    part = torch.empty(s, b, e, dtype=torch.float32, device=o.device)
    bm = max(16, triton.next_power_of_2(b))
    eb = max(16, triton.next_power_of_2(e))
    w = torch.empty(b, k, dtype=o.dtype, device=o.device)
    ids = torch.empty(b, k, dtype=torch.int32, device=o.device)
    aligned = None
    if align_bm is not None and b == 1:
        aligned = (torch.empty(k * align_bm, dtype=torch.int32, device=o.device),
                   torch.empty(k, dtype=torch.int32, device=o.device))
    rows, block_expert = aligned if aligned is not None else (ids, ids)
    route = dict(K=k, KB=max(2, triton.next_power_of_2(k)), SB=min(128, triton.next_power_of_2(s)),
                 NORMALIZE=normalize, ALIGN=aligned is not None, PACKED=packed)
    _norm_router_kernel[(s,)](o, residual, norm_weight, router, h, x, part, b, hidden, e, eps, w, ids, rows,
                              block_expert, counters(o.device, 1) if one_launch else ids, s, BM=bm,
                              SW=slice_width, EB=eb, HP=triton.next_power_of_2(hidden), EARLY=early, LAST=one_launch,
                              ABM=align_bm or 16, **route, num_warps=4, **launch_options(pdl))
    if not one_launch:
        # 4 warps, as the GEMV's (one_launch) last program: the partials' and the softmax's sums run in one order
        _route_partials_kernel[(b,)](part, w, ids, rows, block_expert, s, b, e, EB=eb, BM=align_bm or 16, **route,
                                     num_warps=4, **launch_options(pdl))
    return h, x, w, ids, aligned
