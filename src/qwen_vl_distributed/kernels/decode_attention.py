"""Split-KV GQA decode attention over the KV cache in blocks (Triton).

Shapes: B decoding sequences (one new token each, so T = B), NH query heads, KVH kv heads, G = NH / KVH query
heads per kv head, D head_dim (DP: its tile width, ``tiles.padded_head_dim``), NB cache blocks, BS block size, W
block-table width, NS splits of the key range.

Decode (flash-decoding): program (b, kv head, split) loads the G query heads that share one kv head and walks its
share of keys [0, starts[b] + 1) once, keeping an online softmax; a second kernel merges the NS partial results by
their log-sum-exp. Each kv head is read once for its G query heads. Key p of sequence b is at offset p % BS of
block ``tables[b, p // BS]``: the kernel looks the block up per key. A table of width 1 (one block holds every
sequence: the contiguous layout) is read once per program instead. ``tables``/``starts`` are device tensors and
NS depends only on shapes, so a decode step is capturable in a CUDA graph (no host sync, no .tolist()).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .pdl import grid_dependency, launch_options
from .tiles import mma, norm_rope, padded_head_dim

BLOCK_N = 64  # keys per inner step
TARGET_PROGRAMS = 264  # ~2 waves on 132 SMs


@triton.jit
def head_bases(k_ptr, v_ptr, tab, kvh, sk_b, sk_h, sv_b, sv_h, PAGED: tl.constexpr):
    """Where ``key_rows`` starts for kv head ``kvh`` of the sequence whose block-table row is ``tab``: the head in
    the cache (PAGED), or the head in the sequence's one block."""
    k_base = k_ptr + kvh * sk_h
    v_base = v_ptr + kvh * sv_h
    if not PAGED:
        blk = tl.load(tab).to(tl.int64)
        k_base += blk * sk_b
        v_base += blk * sv_b
    return k_base, v_base


@triton.jit
def key_rows(base, tab, keys, km, s_b, s_l, BS: tl.constexpr, PAGED: tl.constexpr):
    """Addresses of keys (or values) ``keys`` [BN] of one sequence and kv head: ``base`` points at the kv head in
    the cache (PAGED) or in the sequence's one block (not PAGED); ``tab`` at the sequence's block-table row."""
    if PAGED:
        blk = tl.load(tab + keys // BS, mask=km, other=0).to(tl.int64)
        rows = base + blk * s_b + (keys % BS).to(tl.int64) * s_l
    else:
        rows = base + keys.to(tl.int64) * s_l
    return rows


@triton.jit
def _halves_rope(src, rows, rmask, w_ptr, cos_row, sin_row, eps, D: tl.constexpr, HP: tl.constexpr, dt: tl.constexpr):
    """Rows ``rows`` [R] of raw heads at ``src`` (head stride D) -> their q/k RMSNorm + rotary as ``tiles.norm_rope``
    computes it for ``decode_layer.qkv_post``, laid out whole [R, 2 * HP] (D / 2 = HP, a power of two)."""
    i = tl.arange(0, HP)[None, :]
    m = rmask[:, None] & (i < HP)
    a = tl.load(src + rows[:, None] * D + i, mask=m, other=0.0).to(tl.float32)
    b = tl.load(src + rows[:, None] * D + HP + i, mask=m, other=0.0).to(tl.float32)
    oa, ob = norm_rope(a, b, w_ptr, cos_row, sin_row, eps, D, HP, HP, dt)
    return tl.reshape(tl.permute(tl.join(oa, ob), (0, 2, 1)), (rows.shape[0], 2 * HP))


@triton.jit
def _split_kernel(q_ptr, k_ptr, v_ptr, tab_ptr, starts_ptr, o_ptr, lse_ptr, scale,
                  sq_t, sq_h, st_b, sk_b, sk_h, sk_l, sv_b, sv_h, sv_l,
                  kr_ptr, vr_ptr, skv, qw_ptr, kw_ptr, cos_ptr, sin_ptr, blocks_ptr, offs_ptr, eps,
                  NH: tl.constexpr, G: tl.constexpr, GP: tl.constexpr, D: tl.constexpr, DP: tl.constexpr,
                  BN: tl.constexpr, NS: tl.constexpr, BS: tl.constexpr, PAGED: tl.constexpr, POST: tl.constexpr,
                  PDL: tl.constexpr):
    # POST: q_ptr holds the raw q projection and kr/vr the raw k/v rows (row stride skv): the q/k norm + rotary of
    # ``decode_layer.qkv_post`` run here -- on the G query heads as loaded, and on the new token's k, which stands in
    # for key n - 1 (not yet in the cache); the program whose key range holds it writes k and v to the cache at
    # (blocks[b], offs[b]), where ``qkv_post`` would have. No other program reads that key.
    grid_dependency(PDL)
    b = tl.program_id(0)
    kvh = tl.program_id(1)
    sp = tl.program_id(2)
    tab = tab_ptr + b * st_b
    n = tl.load(starts_ptr + b) + 1  # the new token's k/v are already in the cache (POST: written here)
    chunk = tl.cdiv(tl.cdiv(n, NS), BN) * BN
    lo = sp * chunk
    hi = tl.minimum(lo + chunk, n)
    g = tl.arange(0, GP)
    gmask = g < G
    heads = kvh * G + g
    d = tl.arange(0, DP)
    dmask = d < D
    if POST:
        dt = q_ptr.dtype.element_ty
        cos_row = cos_ptr + b * D
        sin_row = sin_ptr + b * D
        q = _halves_rope(q_ptr + b * sq_t, heads, gmask, qw_ptr, cos_row, sin_row, eps, D, DP // 2, dt)
        one = tl.arange(0, 1)
        k_new = _halves_rope(kr_ptr + b * skv, kvh + one, one < 1, kw_ptr, cos_row, sin_row, eps, D, DP // 2, dt)
        k_new = k_new.to(k_ptr.dtype.element_ty)  # as the cache holds it
        v_new = tl.load(vr_ptr + b * skv + kvh * D + d[None, :] + one[:, None] * 0, mask=dmask[None, :],
                        other=0.0).to(v_ptr.dtype.element_ty)
    else:
        q = tl.load(q_ptr + b * sq_t + heads[:, None] * sq_h + d[None, :], mask=gmask[:, None] & dmask[None, :],
                    other=0.0)
    k_base, v_base = head_bases(k_ptr, v_ptr, tab, kvh, sk_b, sk_h, sv_b, sv_h, PAGED)
    m = tl.full((GP,), float("-inf"), tl.float32)
    l_sum = tl.zeros((GP,), tl.float32)
    acc = tl.zeros((GP, DP), tl.float32)
    for start in range(lo, hi, BN):
        offs = start + tl.arange(0, BN)
        km = offs < hi
        kdm = km[:, None] & dmask[None, :]
        k_rows = key_rows(k_base, tab, offs, km, sk_b, sk_l, BS, PAGED)
        k = tl.load(k_rows[:, None] + d[None, :], mask=kdm, other=0.0)
        if POST:  # key n - 1 is the new token's, not yet in the cache
            k = tl.where((offs == n - 1)[:, None], k_new, k)
        s = mma(q, tl.trans(k), tl.zeros((GP, BN), tl.float32)) * scale  # [GP, BN] fp32
        s = tl.where(km[None, :], s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, 1))
        p = tl.exp(s - m_new[:, None])
        alpha = tl.exp(m - m_new)
        v_rows = key_rows(v_base, tab, offs, km, sv_b, sv_l, BS, PAGED)
        v = tl.load(v_rows[:, None] + d[None, :], mask=kdm, other=0.0)
        if POST:
            v = tl.where((offs == n - 1)[:, None], v_new, v)
        acc = acc * alpha[:, None] + mma(p.to(v.dtype), v, tl.zeros((GP, DP), tl.float32))
        l_sum = l_sum * alpha + tl.sum(p, 1)
        m = m_new
    if POST:
        if (lo <= n - 1) & (n - 1 < hi):  # this program's range held the new key: it writes k and v, after its reads
            blk = tl.load(blocks_ptr + b).to(tl.int64)
            pos = tl.load(offs_ptr + b).to(tl.int64)
            tl.store(k_ptr + blk * sk_b + kvh * sk_h + pos * sk_l + d[None, :] + one[:, None] * 0, k_new,
                     mask=dmask[None, :])
            tl.store(v_ptr + blk * sv_b + kvh * sv_h + pos * sv_l + d[None, :] + one[:, None] * 0, v_new,
                     mask=dmask[None, :])
    # an empty split (lo >= hi) reports lse = -inf and weighs nothing in the merge
    out = acc / tl.maximum(l_sum, 1e-30)[:, None]
    lse = tl.where(l_sum > 0, m + tl.log(tl.maximum(l_sum, 1e-30)), float("-inf"))
    row = (b * NH + heads) * NS + sp  # partials laid out [B, NH, NS(, DP)]
    tl.store(o_ptr + row[:, None] * DP + d[None, :], out, mask=gmask[:, None])
    tl.store(lse_ptr + row, lse, mask=gmask)


@triton.jit
def _merge_kernel(o_ptr, lse_ptr, out_ptr, so_t, so_h, NH: tl.constexpr, D: tl.constexpr, DP: tl.constexpr,
                  NS: tl.constexpr, NSP: tl.constexpr, PDL: tl.constexpr):
    grid_dependency(PDL)
    b = tl.program_id(0)
    h = tl.program_id(1)
    s = tl.arange(0, NSP)
    d = tl.arange(0, DP)
    row = (b * NH + h) * NS + s
    lse = tl.load(lse_ptr + row, mask=s < NS, other=float("-inf"))
    w = tl.exp(lse - tl.max(lse, 0))  # split 0 is never empty, so the max is finite
    o = tl.load(o_ptr + row[:, None] * DP + d[None, :], mask=(s < NS)[:, None], other=0.0)
    out = tl.sum(o * w[:, None], 0) / tl.sum(w, 0)
    tl.store(out_ptr + b * so_t + h * so_h + d, out.to(out_ptr.dtype.element_ty), mask=d < D)


def num_splits(batch: int, kv_heads: int, max_len: int) -> int:
    """Splits of the key range: enough programs to fill the GPU, at least BLOCK_N keys each (shape-only)."""
    want = max(1, TARGET_PROGRAMS // max(1, batch * kv_heads))
    return max(1, min(want, triton.cdiv(max_len, BLOCK_N), 64))


def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, tables: torch.Tensor,
                     starts: torch.Tensor, scale: float, pdl: bool = False, post: tuple | None = None
                     ) -> torch.Tensor:
    """q [B, NH, D]; k/v_cache [NB, KVH, BS, D]; tables [B, W] int32 block tables and starts [B] (tokens cached
    before this step's token, which is already written), device tensors -> [B, NH, D]. W x BS bounds every
    sequence's length (it sets the number of splits). ``pdl``: launch with programmatic dependent launch
    (kernels.pdl). ``post`` = (k, v, q_norm, k_norm, cos, sin, row_blocks, row_offsets): q is the raw projection
    [B, NH * D] (rows may be strided) and this step's token is not in the cache yet; the q/k norm + rotary and the
    cache write of ``decode_layer.qkv_post`` (whose arguments these are) run inside the attention kernel
    (``post_fits`` says where it can)."""
    kvh, bs = k_cache.shape[1], k_cache.shape[2]
    bsz, dim = q.shape[0], k_cache.shape[3]
    nh = q.shape[1] if post is None else q.shape[1] // dim
    g = nh // kvh
    paged = tables.shape[1] > 1
    ns = num_splits(bsz, kvh, tables.shape[1] * bs)
    dp = padded_head_dim(dim)
    part_o = torch.empty(bsz * nh * ns, dp, dtype=torch.float32, device=q.device)
    part_lse = torch.empty(bsz * nh * ns, dtype=torch.float32, device=q.device)
    if post is None:
        raw = (q, q, 0, q, q, q, q, starts, starts, 0.0)
        sq = (q.stride(0), q.stride(1))
    else:
        k, v, q_norm, k_norm, cos, sin, row_blocks, row_offsets = post
        if not post_fits(dim) or q.stride(-1) != 1 or k.stride(-1) != 1 or k.stride(0) != v.stride(0):
            raise ValueError(f"decode_attention(post=...): head_dim {dim} or these strides do not fit")
        raw = (k, v, k.stride(0), q_norm.weight, k_norm.weight, cos, sin, row_blocks, row_offsets, q_norm.eps)
        sq = (q.stride(0), dim)
    _split_kernel[(bsz, kvh, ns)](
        q, k_cache, v_cache, tables, starts, part_o, part_lse, scale,
        *sq, tables.stride(0), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), *raw,
        NH=nh, G=g, GP=max(16, triton.next_power_of_2(g)), D=dim, DP=dp, BN=BLOCK_N, NS=ns, BS=bs if paged else 1,
        PAGED=paged, POST=post is not None, num_warps=4, num_stages=2, **launch_options(pdl))
    out = torch.empty(bsz, nh, dim, dtype=q.dtype, device=q.device)
    _merge_kernel[(bsz, nh)](part_o, part_lse, out, out.stride(0), out.stride(1), NH=nh, D=dim, DP=dp, NS=ns,
                             NSP=max(2, triton.next_power_of_2(ns)), num_warps=4, **launch_options(pdl))
    return out


def post_fits(head_dim: int) -> bool:
    """Whether the q/k norm + rotary can run inside the attention kernel: half a head is a power of two, at least 8
    (its two halves then fill the head's tile exactly)."""
    half = head_dim // 2
    return head_dim % 2 == 0 and half >= 8 and half & (half - 1) == 0
