"""One decoder layer's decode step (one new token per sequence) in 16 launches instead of ~60.

Same math as ``DecoderLayer.forward`` with the 'fast' implementations, for a decode layout, reading the layer's own
parameters; tests and ``qwen-vl bench`` hold it equal to the module. Why: at batch 1 a layer moves ~446 MB
(~0.1 ms at HBM speed) but the module's eager math is ~60 kernels (norms in fp32, rotary, router), and under
CUDA-graph replay each costs ~2 us of launch latency and tail -- more than the attention projections.

Shapes: B sequences (rows), H hidden, NH/KVH query/kv heads, D head_dim, E experts, K per token, P = B*K pairs.
Launches: rmsnorm | q, k, v GEMV (cuBLAS) | q/k norm + rotary + cache write | split-KV attention (2) | o GEMV |
residual + rmsnorm | router GEMV | softmax + top-k | align + gate/up + down (3) | K-sum + residual; up to
``KernelChoices.sum_in_down_rows`` rows the K-sum runs in the down kernel's launch (kernels.arrivals); with
``qkv_post_in_attention`` the q/k norm + rotary + cache write run in the attention kernel (kernels.decode_attention).
Up to ``KernelChoices.norm_qkv_rows`` rows, 1 fewer: the input norm runs inside the q/k/v GEMV (kernels.gemv); up
to ``norm_router_rows``, 1 fewer (2 for one token): residual + norm + router GEMV + top-k are two launches that, for
one token, also lay out the experts' blocks (kernels.router).

Rounding follows the reference op by op: every place the module rounds a product or sum to the activation dtype
(bf16), the kernels round too (``.to(dt).to(tl.float32)``), so results differ only by reduction order.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from . import grouped
from .choices import DEFAULT, KernelChoices
from .decode_attention import decode_attention, post_fits
from .gemv import linear_small
from .moe_triton import expert_pairs, sum_pairs
from .packing import packed_qkv
from .pdl import grid_dependency, launch_options, pdl_runs_on
from .router import norm_route, topk_softmax
from .tiles import norm_rope


def project(use: str, x: torch.Tensor, *weights: torch.Tensor, choices: KernelChoices = DEFAULT,
            norm: tuple[torch.Tensor, float] | None = None) -> tuple[torch.Tensor, ...]:
    """x @ W^T for each weight (bias-free), through the GEMV kernel or cuBLAS as ``choices.gemv[use]`` says.
    ``norm`` = (weight, eps): of rmsnorm(x), inside the GEMV kernel (which ``use`` must run there)."""
    tile = choices.gemv_tile(use, x.shape[0])
    if tile is None:
        if norm is not None:
            raise ValueError(f"project({use!r}, norm=...): the norm is fused into the GEMV kernel, and cuBLAS runs "
                             f"{x.shape[0]} rows of {use!r}")
        return tuple(F.linear(x, w) for w in weights)
    pdl = uses_pdl(choices, x.device)
    return linear_small(x, *weights, bn=tile[0], bk=tile[1], stages=choices.gemv_stages, pdl=pdl, norm=norm,
                        pre_wait=choices.pre_wait if pdl else 0, split=choices.gemv_split, warps=choices.gemv_warps)


def uses_pdl(choices: KernelChoices, device: torch.device) -> int:
    """How the fused layer's kernels launch here: 0 plainly, else the programmatic dependent launch mode of
    ``choices.pdl`` (kernels.pdl)."""
    return int(choices.pdl) if choices.pdl and _pdl_runs_on(device.type, device.index) else 0


@functools.lru_cache(maxsize=None)
def _pdl_runs_on(kind: str, index: int | None) -> bool:
    return pdl_runs_on(torch.device(kind, index))


@triton.jit
def _rmsnorm_kernel(x_ptr, res_ptr, w_ptr, y_ptr, h_ptr, H, eps, HAS_RES: tl.constexpr, BLOCK: tl.constexpr,
                    PDL: tl.constexpr):
    # one row per program: [h = x + res (stored)]; y = w * round(h * rsqrt(mean(h^2) + eps))
    grid_dependency(PDL)
    row = tl.program_id(0).to(tl.int64)
    c = tl.arange(0, BLOCK)
    m = c < H
    dt = y_ptr.dtype.element_ty
    x = tl.load(x_ptr + row * H + c, mask=m, other=0.0).to(tl.float32)
    if HAS_RES:
        x = (x + tl.load(res_ptr + row * H + c, mask=m, other=0.0).to(tl.float32)).to(dt).to(tl.float32)
        tl.store(h_ptr + row * H + c, x.to(dt), mask=m)
    rstd = 1.0 / tl.sqrt(tl.sum(x * x, 0) / H + eps)
    n = (x * rstd).to(dt).to(tl.float32)
    w = tl.load(w_ptr + c, mask=m, other=0.0).to(tl.float32)
    tl.store(y_ptr + row * H + c, (w * n).to(dt), mask=m)


def rmsnorm(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None,
            pdl: bool = False):
    """x [B, H] -> norm(x); with ``residual``: (h = x + residual, norm(h)). ``pdl``: launch with programmatic
    dependent launch (kernels.pdl)."""
    b, h = x.shape
    y = torch.empty_like(x)
    hsum = torch.empty_like(x) if residual is not None else y
    _rmsnorm_kernel[(b,)](x, residual if residual is not None else x, weight, y, hsum, h, eps,
                          HAS_RES=residual is not None, BLOCK=triton.next_power_of_2(h), num_warps=8,
                          **launch_options(pdl))
    return (hsum, y) if residual is not None else y


@triton.jit
def _qkv_post_kernel(q_ptr, k_ptr, v_ptr, qw_ptr, kw_ptr, cos_ptr, sin_ptr, blocks_ptr, offs_ptr,
                     qo_ptr, kc_ptr, vc_ptr, eps, sq, skv, sc_b, sc_h, sc_l,
                     NH: tl.constexpr, KVH: tl.constexpr, D: tl.constexpr, HP: tl.constexpr, HB: tl.constexpr,
                     PDL: tl.constexpr):
    grid_dependency(PDL)
    # program (b, j) takes HB heads of row b: j < cdiv(NH, HB): query heads from j*HB -> qo [B, NH, D]; else kv
    # heads from (j - cdiv(NH, HB))*HB -> k/v caches at (block, offset) of the row. Row b of q / k / v starts at
    # b*sq / b*skv.
    # HP: HALF = D/2 rounded up to a power of two (tl.arange's sizes); the columns past HALF are masked.
    b = tl.program_id(0).to(tl.int64)
    j = tl.program_id(1)
    HALF: tl.constexpr = D // 2
    QB: tl.constexpr = (NH + HB - 1) // HB
    i = tl.arange(0, HP)[None, :]
    dt = qo_ptr.dtype.element_ty
    cos_row = cos_ptr + b * D
    sin_row = sin_ptr + b * D
    if j < QB:
        hd = j * HB + tl.arange(0, HB)[:, None]
        m = (hd < NH) & (i < HALF)
        src = q_ptr + b * sq + hd * D + i
        a = tl.load(src, mask=m, other=0.0).to(tl.float32)
        bb = tl.load(src + HALF, mask=m, other=0.0).to(tl.float32)
        oa, ob = norm_rope(a, bb, qw_ptr, cos_row, sin_row, eps, D, HALF, HP, dt)
        dst = qo_ptr + b * NH * D + hd * D + i
        tl.store(dst, oa, mask=m)
        tl.store(dst + HALF, ob, mask=m)
    else:
        hd = (j - QB) * HB + tl.arange(0, HB)[:, None]
        m = (hd < KVH) & (i < HALF)
        blk = tl.load(blocks_ptr + b).to(tl.int64)
        pos = tl.load(offs_ptr + b).to(tl.int64)
        src = k_ptr + b * skv + hd * D + i
        a = tl.load(src, mask=m, other=0.0).to(tl.float32)
        bb = tl.load(src + HALF, mask=m, other=0.0).to(tl.float32)
        oa, ob = norm_rope(a, bb, kw_ptr, cos_row, sin_row, eps, D, HALF, HP, dt)
        off = blk * sc_b + hd * sc_h + pos * sc_l + i
        tl.store(kc_ptr + off, oa, mask=m)
        tl.store(kc_ptr + off + HALF, ob, mask=m)
        vsrc = v_ptr + b * skv + hd * D + i
        tl.store(vc_ptr + off, tl.load(vsrc, mask=m), mask=m)
        tl.store(vc_ptr + off + HALF, tl.load(vsrc + HALF, mask=m), mask=m)


@triton.jit
def _route_kernel(logits_ptr, ids_ptr, w_ptr, E: tl.constexpr, K: tl.constexpr, EB: tl.constexpr,
                  KB: tl.constexpr, NORMALIZE: tl.constexpr, PACKED: tl.constexpr, PDL: tl.constexpr):
    grid_dependency(PDL)
    # one row per program: softmax (fp32) -> top-K (descending, lowest index on ties) -> renormalise -> dtype
    row = tl.program_id(0).to(tl.int64)
    e = tl.arange(0, EB)
    logits = tl.load(logits_ptr + row * E + e, mask=e < E, other=float("-inf")).to(tl.float32)
    kk = tl.arange(0, KB)
    top_w, top_i = topk_softmax(logits, e, kk, K, EB, NORMALIZE, PACKED)
    tl.store(w_ptr + row * K + kk, top_w.to(w_ptr.dtype.element_ty), mask=kk < K)
    tl.store(ids_ptr + row * K + kk, top_i, mask=kk < K)


def route(logits: torch.Tensor, k: int, normalize: bool, pdl: bool = False, packed: bool = False, warps: int = 4
          ) -> tuple[torch.Tensor, torch.Tensor]:
    """logits [B, E] -> (weights [B, K] in logits' dtype, ids [B, K] int32), as model.moe.route; ``packed``: one
    reduction per pick (kernels.router.topk_softmax); ``warps`` per row's program (one warp: no cross-warp
    reduction at all, E / 32 logits a lane)."""
    b, e = logits.shape
    w = torch.empty(b, k, dtype=logits.dtype, device=logits.device)
    ids = torch.empty(b, k, dtype=torch.int32, device=logits.device)
    _route_kernel[(b,)](logits, ids, w, E=e, K=k, EB=triton.next_power_of_2(e), KB=max(2, triton.next_power_of_2(k)),
                        NORMALIZE=normalize, PACKED=packed, num_warps=warps, **launch_options(pdl))
    return w, ids


# Heads per program of the q/k norm + rotary kernel, and its warps, by row count: decode rows spread one head
# per program over the SMs; prompt rows take 8 heads per program (H200, 2048 rows of the 235B: one head per
# program 95 us, 8 heads with 4 warps 35-57 us; 8192 rows: 350 us against 95 us).
QKV_POST_HEADS = {64: (1, 1), 1 << 30: (8, 4)}


def qkv_post(q, k, v, attn, cos, sin, kv, row_blocks, row_offsets, pdl: bool = False) -> torch.Tensor:
    """q [B, NH*D], k/v [B, KVH*D] raw projections (rows may be strided, e.g. views into one packed q/k/v
    output) -> normed, rotated q [B, NH, D]; row b's k, v written to the cache at block row_blocks[b], offset
    row_offsets[b] (device tensors [B])."""
    k_cache, v_cache = kv
    b = q.shape[0]
    nh, kvh, d = attn.num_heads, attn.num_kv_heads, attn.head_dim
    assert q.stride(-1) == k.stride(-1) == v.stride(-1) == 1 and k.stride(0) == v.stride(0)
    hb, warps = QKV_POST_HEADS[min(n for n in QKV_POST_HEADS if n >= b)]
    qo = torch.empty(b, nh, d, dtype=q.dtype, device=q.device)
    grid = (b, triton.cdiv(nh, hb) + triton.cdiv(kvh, hb))
    _qkv_post_kernel[grid](q, k, v, attn.q_norm.weight, attn.k_norm.weight, cos, sin, row_blocks, row_offsets,
                           qo, k_cache, v_cache, attn.q_norm.eps, q.stride(0), k.stride(0), k_cache.stride(0),
                           k_cache.stride(1), k_cache.stride(2), NH=nh, KVH=kvh, D=d,
                           HP=triton.next_power_of_2(d // 2), HB=hb, num_warps=warps,
                           **launch_options(pdl))
    return qo


def decode_layer(layer, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, kv: tuple[torch.Tensor, torch.Tensor],
                 tables: torch.Tensor, starts: torch.Tensor, rows: tuple[torch.Tensor, torch.Tensor],
                 choices: KernelChoices = DEFAULT) -> torch.Tensor:
    """``layer`` (a DecoderLayer) on h [B, H] for one token per sequence; cos/sin [B, D] in h's dtype; device
    tensors: tables [B, W] block tables, starts [B] (tokens cached before this one), rows: the (block, offset)
    [B] each where each sequence's new k/v go."""
    attn = layer.self_attn
    scale = attn.scale
    pdl = uses_pdl(choices, h.device)
    raw = None
    if choices.qkv_post_in_attention and post_fits(attn.head_dim):
        def attend_raw(q, k, v):  # the q/k norm + rotary and the cache write inside the attention kernel
            return decode_attention(q, kv[0], kv[1], tables, starts, scale, pdl=pdl,
                                    post=(k, v, attn.q_norm, attn.k_norm, cos, sin, *rows))
        raw = attend_raw
    return fused_layer(layer, h, cos, sin, kv, *rows,
                       lambda q: decode_attention(q, kv[0], kv[1], tables, starts, scale, pdl=pdl), choices,
                       attend_raw=raw)


def fused_layer(layer, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, kv: tuple[torch.Tensor, torch.Tensor],
                row_blocks: torch.Tensor, row_offsets: torch.Tensor, attend, choices: KernelChoices = DEFAULT,
                attend_raw=None) -> torch.Tensor:
    """``layer`` on T rows h [T, H]: row t's k/v go to cache block row_blocks[t], offset row_offsets[t] (device
    tensors [T]); ``attend(q [T, NH, D]) -> [T, NH, D]`` reads the cache after that write. ``attend_raw(q, k, v)``
    (the raw projections) -> [T, NH, D], where given, does ``qkv_post``'s work itself and replaces both."""
    attn, mlp = layer.self_attn, layer.mlp
    t = h.shape[0]
    pdl = uses_pdl(choices, h.device)
    norm_in = layer.input_layernorm
    qkv_tile = choices.gemv_tile("qkv", t)
    # the norms inside the following kernels (kernels.gemv, kernels.router)
    fuse_in = t <= choices.norm_qkv_rows and attn.q_proj.bias is None and qkv_tile is not None
    x = h if fuse_in else rmsnorm(h, norm_in.weight, norm_in.eps, pdl=pdl)
    # where cuBLAS projects (prompt rows; decode rows too if choices.gemv["qkv"] is None): one GEMM for q, k and v
    # over the packed weight (kernels.packing)
    packed = packed_qkv(attn) if qkv_tile is None else None
    if packed is not None:
        q, k, v = F.linear(x, packed).split([attn.q_proj.out_features, attn.k_proj.out_features,
                                             attn.v_proj.out_features], dim=1)
    elif attn.q_proj.bias is None:
        q, k, v = project("qkv", x, attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight, choices=choices,
                          norm=(norm_in.weight, norm_in.eps) if fuse_in else None)
    else:
        q, k, v = attn.q_proj(x), attn.k_proj(x), attn.v_proj(x)
    if attend_raw is not None:
        o = attend_raw(q, k, v).reshape(t, -1)
    else:
        o = attend(qkv_post(q, k, v, attn, cos, sin, kv, row_blocks, row_offsets, pdl)).reshape(t, -1)
    o = project("o", o, attn.o_proj.weight, choices=choices)[0] if attn.o_proj.bias is None else attn.o_proj(o)
    if attn.reduce is not None:  # tensor parallel: this rank's heads' share of o_proj, summed over the ranks
        o = attn.reduce(o)
    gate_up, down, scales = mlp.experts.gate_up_proj, mlp.experts.down_proj, mlp.experts.scales
    post, aligned = layer.post_attention_layernorm, None
    if t <= choices.norm_router_rows and mlp.gate.bias is None:
        # one token on the Triton experts of this module's own ids: the router lays the experts' blocks out itself
        direct = (t == 1 and mlp.experts.expert_range is None
                  and (mlp.top_k <= choices.fused_max_pairs or scales is not None))
        bm = choices.moe_config(t * mlp.top_k, scales).bm if direct else None
        h, x, w, ids, aligned = norm_route(o, h, post.weight, post.eps, mlp.gate.weight, mlp.top_k, mlp.normalize,
                                           align_bm=bm, pdl=pdl, early=bool(pdl) and choices.pre_wait > 0,
                                           packed=choices.packed_topk, one_launch=choices.router_one_launch)
    else:
        h, x = rmsnorm(o, post.weight, post.eps, residual=h, pdl=pdl)
        w, ids = route(project("router", x, mlp.gate.weight, choices=choices)[0], mlp.top_k, mlp.normalize, pdl,
                       choices.packed_topk, choices.route_warps)
    ids, w = mlp.experts.local_routing(ids, w)  # expert parallel: ids of experts held elsewhere become E
    if scales is None and grouped.quack_runs(x, ids.numel(), choices):  # prompts: quack's grouped GEMMs (kernels.cute)
        from .cute import quack_experts

        y = quack_experts(x, ids.long(), w, gate_up, down)
        return h + (y if mlp.reduce is None else mlp.reduce(y))
    if ids.numel() > choices.fused_max_pairs and scales is None:  # large chunks: grouped GEMM (returns the K-sum)
        y = grouped.grouped_experts(x, ids.long(), w, gate_up, down)
        return h + (y if mlp.reduce is None else mlp.reduce(y))
    cfg = choices.moe_config(ids.numel(), scales)
    pre = bool(pdl) and choices.pre_wait > 0  # (down_pairs refuses it with EARLY: it reads the layout early)
    if t <= choices.sum_in_down_rows:  # the K-sum (and the residual) in the down kernel's launch
        out = expert_pairs(x, ids, w, gate_up, down, scales, cfg, pdl, aligned, pre_wait=pre,
                           summed=(h if mlp.reduce is None else None,))
        return out if mlp.reduce is None else h + mlp.reduce(out)
    pairs = expert_pairs(x, ids, w, gate_up, down, scales, cfg, pdl, aligned, pre_wait=pre)
    if mlp.reduce is None:
        return sum_pairs(pairs, ids, gate_up.shape[0], residual=h, pdl=pdl)
    return h + mlp.reduce(sum_pairs(pairs, ids, gate_up.shape[0], pdl=pdl))
