"""Every Triton kernel of kernels/ against its PyTorch reference on random shapes: the checks that the CPU
interpreter fuzz (tests/test_kernel_fuzz.py, in ``make test``) and the CUDA fuzz (tests/gpu/test_kernels_gpu.py)
both run, each drawing its shapes from a seeded ``random.Random`` within a ``Size``.

Each check draws head_dim, heads, hidden, expert width, experts, top-k, batch and lengths as the kernel takes them
(non-powers of two included: odd widths, uneven tiles, head dims the attention tiles must pad), and for the KV cache
a block size and shuffled block tables (or one block per sequence: the contiguous layout), runs the kernel's
public function and its reference, and fails with the drawn shape in the message. References run in float64 where
the math allows, on the same (rounded) inputs. Tolerances (relative L2): float32 1e-5 (summation order; the GPU's
products are IEEE float32, kernels.tiles.mma), float16 3e-3 and bfloat16 2e-2 (a few roundings of the activation
dtype, which the kernels make where the reference makes them).
"""

from __future__ import annotations

import dataclasses
import math
import random
from dataclasses import dataclass

import pytest
import torch

from paged import pool_blocks, shuffled_tables
from qwen_vl_distributed.model.batch import SeqLayout
from qwen_vl_distributed.model.config import preset

TOL = {torch.float32: 1e-5, torch.float16: 3e-3, torch.bfloat16: 2e-2}


@dataclass(frozen=True)
class Size:
    """Upper bounds of the random shapes: Triton's CPU interpreter runs each program in Python, so the CPU fuzz
    keeps them small; a GPU takes the released model's sizes."""

    head_dim: int
    heads: int  # query heads per kv head
    kv_heads: int
    batch: int
    length: int  # tokens of a sequence in the KV cache
    rows: int  # new rows of one sequence in a prompt step
    hidden: int
    width: int  # expert width I
    experts: int
    tokens: int  # tokens of an experts call


CPU = Size(head_dim=72, heads=5, kv_heads=3, batch=4, length=200, rows=40, hidden=96, width=48, experts=12,
           tokens=24)
GPU = Size(head_dim=160, heads=16, kv_heads=8, batch=32, length=2048, rows=600, hidden=1024, width=768, experts=128,
           tokens=600)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def assert_close(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype, what: str, bound: float | None = None,
                 **shape) -> None:
    """rel L2 under ``bound``, by default the dtype's (TOL)."""
    assert out.shape == ref.shape, f"{what} {shape}: shape {tuple(out.shape)} != {tuple(ref.shape)}"
    err, bound = rel(out, ref), max(bound or 0.0, TOL[dtype])
    assert err < bound, f"{what} {shape} {dtype}: rel L2 {err:.2e} >= {bound:.0e}"


def randn(gen: torch.Generator, *shape, dtype, device, scale: float = 1.0) -> torch.Tensor:
    return (torch.randn(*shape, generator=gen) * scale).to(dtype).to(device)


def draw_head_dim(rng: random.Random, size: Size) -> int:
    """An even head_dim (rotary pairs): a power of two >= 16 (the released models' kind), one below 16 (narrower
    than tl.dot's smallest tile), or any even value up to ``size.head_dim``, a third of the time each."""
    kind = rng.randrange(3)
    if kind == 0:
        return rng.choice([d for d in (16, 32, 64, 128) if d <= size.head_dim])
    return 2 * rng.randint(1, 7 if kind == 1 else size.head_dim // 2)


def _gen(rng: random.Random) -> torch.Generator:
    return torch.Generator().manual_seed(rng.randrange(1 << 30))


# -- attention ------------------------------------------------------------------------------------------------------


def draw_tables(rng: random.Random, totals: list[int], max_len: int) -> tuple[list[list[int]], int, int]:
    """(block tables, block size, pool blocks) for sequences of ``totals`` tokens: shuffled blocks of a pool with a
    few spare ones (tests/paged.py), a power-of-two block size from 1 to 64; a fifth of the time one block as long
    as ``max_len`` per sequence (the contiguous layout: the kernels' one-block-table path)."""
    bs = max_len if rng.random() < 0.2 else 2 ** rng.randint(0, 6)
    tables = shuffled_tables(totals, bs, seed=rng.randrange(1 << 30), spare=rng.randint(0, 3))
    return tables, bs, pool_blocks(tables)


def _cache(rng, size, dtype, device, totals: list[int], max_len: int):
    """Random k and v caches in blocks [NB, KVH, BS, D] holding sequences of ``totals`` tokens, their block
    tables, and a query head count (whole kv groups)."""
    d = draw_head_dim(rng, size)
    kvh, g = rng.randint(1, size.kv_heads), rng.randint(1, size.heads)
    tables, bs, nb = draw_tables(rng, totals, max_len)
    gen = _gen(rng)
    kc, vc = (randn(gen, nb, kvh, bs, d, dtype=dtype, device=device) for _ in range(2))
    return kc, vc, tables, kvh * g, gen


def check_decode_attention(rng: random.Random, dtype, device, size: Size) -> None:
    from qwen_vl_distributed.kernels.decode_attention import decode_attention
    from qwen_vl_distributed.model.attention import reference_cache_attention

    b = rng.randint(1, size.batch)
    length = rng.randint(2, size.length)
    starts = [rng.randrange(length) for _ in range(b)]
    starts[0] = length - 1  # the longest; the others anywhere, one key (start 0) included by chance
    kc, vc, tables, nh, gen = _cache(rng, size, dtype, device, [n + 1 for n in starts], length)
    d, bs = kc.shape[3], kc.shape[2]
    layout = SeqLayout(tables, starts, [1] * b)
    q = randn(gen, b, nh + 2, d, dtype=dtype, device=device)[:, 1:nh + 1]  # a view, as into a packed buffer
    scale = d ** -0.5
    out = decode_attention(q, kc, vc, layout.block_table(device), layout.tensor("starts", device), scale)
    ref = reference_cache_attention(q.double(), kc.double(), vc.double(), layout, scale)
    assert_close(out, ref, dtype, "decode_attention", b=b, nh=nh, kvh=kc.shape[1], d=d, block_size=bs,
                 starts=starts)


def check_extend_attention(rng: random.Random, dtype, device, size: Size) -> None:
    from qwen_vl_distributed.kernels.choices import SplitKV
    from qwen_vl_distributed.kernels.extend_attention import extend_attention
    from qwen_vl_distributed.model.attention import reference_cache_attention

    # split-KV: half the time pieces of any size (rounded up to the key step) over a grid the step's keys cannot
    # fill, so that every block with a few key steps of prefix is cut, over long sequences; else shipped or none
    cut = rng.random() < 0.5
    split = (SplitKV(programs=1 << 20, min_keys=rng.randint(1, 100)) if cut
             else rng.choice([SplitKV(), SplitKV(programs=0)]))
    b = rng.randint(1, size.batch)
    length = rng.randint(size.length // 2 if cut else 2, size.length)
    lens, starts = [], []
    for _ in range(b):  # prompts from 0, chunks after a cached prefix (the longest one can be), decode rows
        n = 1 if rng.random() < 0.25 else rng.randint(1, min(size.rows, length))
        lens.append(n)
        starts.append(rng.choice([0, length - n, rng.randint(0, length - n)]))
    kc, vc, tables, nh, gen = _cache(rng, size, dtype, device, [a + n for a, n in zip(starts, lens)], length)
    d, bs = kc.shape[3], kc.shape[2]
    layout = SeqLayout(tables, starts, lens)
    q = randn(gen, layout.num_tokens, nh, d, dtype=dtype, device=device)
    scale = d ** -0.5
    out = extend_attention(q, kc, vc, layout, scale, split)
    ref = reference_cache_attention(q.double(), kc.double(), vc.double(), layout, scale)
    assert_close(out, ref, dtype, "extend_attention", nh=nh, kvh=kc.shape[1], d=d, block_size=bs, starts=starts,
                 lens=lens, split=split)


# -- experts --------------------------------------------------------------------------------------------------------


def _routing(rng, size, device, tokens=None):
    """(expert ids [T, K] on ``device``, routed weights [T, K] fp32 on the CPU, a generator): K distinct experts
    per token; sometimes one expert chosen by every token (several row blocks for it, others idle)."""
    t = rng.randint(1, tokens or size.tokens)
    e = rng.randint(2, size.experts)
    k = rng.randint(1, min(e, 8))
    gen = _gen(rng)
    hot = rng.randrange(e) if rng.random() < 0.3 else None
    rows = []
    for _ in range(t):
        perm = torch.randperm(e, generator=gen).tolist()
        if hot is not None:
            perm = [hot] + [x for x in perm if x != hot]
        rows.append(perm[:k])
    w = torch.softmax(torch.randn(t, k, generator=gen), -1)
    return torch.tensor(rows).to(device), w, gen


def held_elsewhere(rng: random.Random, ids: torch.Tensor, e: int) -> torch.Tensor:
    """Expert parallel: half the time, a random share of the pairs (up to all of them) get id ``e``, the id of an
    expert held on another rank, which every experts kernel leaves out."""
    if rng.random() < 0.5:
        return ids
    foreign = torch.rand(ids.shape, generator=_gen(rng)) < rng.random()
    return torch.where(foreign.to(ids.device), torch.full_like(ids, e), ids)


def random_moe_config(rng: random.Random):
    """A tile configuration of the expert kernels, launch orders, partial tiles, TMA and swap included."""
    from qwen_vl_distributed.kernels.choices import MoeConfig

    bm = rng.choice([16, 32, 64])
    return MoeConfig(bm=bm, bn=rng.choice([16, 32, 64]), bk=rng.choice([16, 32, 64]), warps=4, stages=2,
                     down_bn=rng.choice([16, 32, 64]), down_bk=rng.choice([16, 32, 64]), down_stages=2,
                     cols_first=rng.random() < 0.5, split=bm == 64 and rng.random() < 0.5, tma=rng.random() < 0.3,
                     swap=rng.random() < 0.3)


def check_experts(rng: random.Random, dtype, device, size: Size) -> None:
    """fused_experts with the shipped tile table, or a random tile configuration, against reference_experts; some
    pairs may be of experts held on another rank (id E)."""
    from qwen_vl_distributed.kernels.moe_triton import fused_experts
    from qwen_vl_distributed.model.moe import reference_experts

    ids, w, gen = _routing(rng, size, device)
    e = int(ids.max()) + 1 + rng.randint(0, 2)
    ids = held_elsewhere(rng, ids, e)
    h, i = rng.randint(8, size.hidden), rng.randint(4, size.width)
    x = randn(gen, ids.shape[0], h, dtype=dtype, device=device)
    gate_up = randn(gen, e, 2 * i, h, dtype=dtype, device=device, scale=h ** -0.5)
    down = randn(gen, e, h, i, dtype=dtype, device=device, scale=i ** -0.5)
    cfg = random_moe_config(rng) if rng.random() < 0.5 else None
    out = fused_experts(x, ids, w.to(dtype).to(device), gate_up, down, config=cfg)
    ref = reference_experts(x.double(), ids, w.to(dtype).double().to(device), gate_up.double(), down.double())
    assert_close(out, ref, dtype, "fused_experts", t=ids.shape[0], k=ids.shape[1], e=e, h=h, i=i, config=cfg)


def check_fp8_experts(rng: random.Random, dtype, device, size: Size) -> None:
    """fp8-resident experts (random block shapes, partial edge blocks) compute with the dequantised weights: bit for
    bit in the interpreter (the same tiles, the same arithmetic); on a GPU the dequantised tile reaches the MMA
    from registers, another summation order (docs/parity.md), so within the dtype's bound of float64 products.
    W8A8 on the same weights equals the W8A8 reference where its blocks are wide enough for fp8 products
    (kernels.fp8_fits), and is refused by name where they are not."""
    from qwen_vl_distributed.kernels import fp8_fits
    from qwen_vl_distributed.kernels.moe_triton import fused_experts
    from qwen_vl_distributed.model.moe import reference_experts
    from qwen_vl_distributed.model.quant import dequantize_blockwise, quantize_experts

    ids, w, gen = _routing(rng, size, device)
    e = int(ids.max()) + 1
    ids = held_elsewhere(rng, ids, e)
    h, i = rng.randint(16, size.hidden), rng.randint(8, size.width)
    block = (rng.choice([16, 32]), rng.choice([16, 32, 64]))
    x = randn(gen, ids.shape[0], h, dtype=dtype, device=device)
    gq, dq, scales = quantize_experts(randn(gen, e, 2 * i, h, dtype=dtype, device=device, scale=h ** -0.5),
                                      randn(gen, e, h, i, dtype=dtype, device=device, scale=i ** -0.5), block)
    w = w.to(dtype).to(device)
    cfg = dataclasses.replace(random_moe_config(rng), bk=min(32, block[1]), down_bk=min(32, block[1]))
    shape = dict(t=ids.shape[0], k=ids.shape[1], e=e, h=h, i=i, block=block, config=cfg)
    deq = lambda q, s: dequantize_blockwise(q, s, block, dtype)  # noqa: E731
    gate_up_deq = torch.cat([deq(gq[:, :i], scales.gate_up[:, 0]), deq(gq[:, i:], scales.gate_up[:, 1])], 1)
    down_deq = deq(dq, scales.down)
    out = fused_experts(x, ids, w, gq, dq, scales, config=cfg)
    if torch.device(device).type == "cpu":
        same = fused_experts(x, ids, w, gate_up_deq, down_deq, config=cfg)
        assert torch.equal(out, same), f"fp8 experts {shape} {dtype}: not the dequantised weights' products"
    else:
        ref = reference_experts(x.double(), ids, w.double(), gate_up_deq.double(), down_deq.double())
        assert_close(out, ref, dtype, "fp8 experts", **shape)
    w8a8 = scales._replace(act_quant=True)
    if not fp8_fits(w8a8):
        with pytest.raises(ValueError, match=f"{block[0]}x{block[1]} blocks"):
            fused_experts(x, ids, w, gq, dq, w8a8, config=cfg)
        return
    out = fused_experts(x, ids, w, gq, dq, w8a8, config=cfg)
    ref = reference_experts(x, ids, w, gq, dq, w8a8).float()
    assert_close(out, ref, dtype, "w8a8 experts", bound=W8A8_GPU_TOL if device != "cpu" else None, **shape)


# W8A8 on a GPU against its reference: Hopper's fp8 tensor cores accumulate a product's partial sums with fewer
# bits than float32 (Triton's default there, max_num_imprecise_acc), measured 1.3e-3 in float32 on an H200 (one
# W8A8 experts call is 4.4e-2 from float32 products by design: docs/parity.md); a requantised input then
# may land on the next fp8 value
W8A8_GPU_TOL = 1e-2


def check_align(rng: random.Random, dtype, device, size: Size) -> None:
    """align_triton and align_wide lay out the pairs exactly as align_torch (every pair of an expert held here
    once, in its expert's blocks; pairs with id E nowhere)."""
    from qwen_vl_distributed.kernels import moe_triton as mt

    ids, _, _ = _routing(rng, size, device, tokens=size.tokens * 8)
    e, bm = int(ids.max()) + 1 + rng.randint(0, 3), rng.choice([16, 64, 128])
    flat = held_elsewhere(rng, ids, e).reshape(-1)
    rows, blocks = mt.align_torch(flat, e, bm)
    kernels = [mt.align_wide] + ([mt.align_triton] if flat.numel() <= mt.ALIGN_KERNEL_MAX_PAIRS else [])
    for fn in kernels:
        got_rows, got_blocks = fn(flat, e, bm)
        assert torch.equal(got_rows, rows) and torch.equal(got_blocks, blocks), \
            f"{fn.__name__} pairs={flat.numel()} e={e} bm={bm}"


def check_act_quant(rng: random.Random, dtype, device, size: Size) -> None:
    """The W8A8 input quantisation equals model.quant.quantize_activations bit for bit (partial last groups, zero
    rows)."""
    from qwen_vl_distributed.kernels.moe_triton import act_quant
    from qwen_vl_distributed.model.quant import quantize_activations

    t, kd, group = rng.randint(1, size.tokens * 2), rng.randint(1, size.hidden), rng.choice([16, 32, 64, 128])
    x = randn(_gen(rng), t, kd, dtype=dtype, device=device, scale=rng.choice([0.01, 1.0, 30.0]))
    x[rng.randrange(t)] = 0
    q, s = act_quant(x, group)
    q_ref, s_ref = quantize_activations(x, group)
    ok = torch.equal(s, s_ref) and torch.equal(q.view(torch.uint8), q_ref.view(torch.uint8))
    assert ok, f"act_quant t={t} k={kd} group={group} {dtype}"


# -- the decode layer's pieces ----------------------------------------------------------------------------------------


def check_gemv(rng: random.Random, dtype, device, size: Size) -> None:
    from qwen_vl_distributed.kernels.gemv import linear_small

    b, kd = rng.randint(1, 64), rng.randint(1, size.hidden)
    gen = _gen(rng)
    x = randn(gen, b, kd, dtype=dtype, device=device)
    ws = [randn(gen, rng.randint(1, size.hidden), kd, dtype=dtype, device=device) for _ in range(rng.randint(1, 3))]
    bn, bk = rng.choice([16, 32, 64]), rng.choice([32, 64, 128, 256])
    norm = None
    if rng.random() < 0.5:  # the input's RMSNorm inside the kernel (decode_layer's norm fusion)
        from qwen_vl_distributed.model.layers import RMSNorm

        norm = RMSNorm(kd, 1e-6).to(dtype).to(device)
        with torch.no_grad():
            norm.weight.copy_(1 + 0.1 * torch.randn(kd, generator=gen))
    split = rng.choice([1, 1, 2, 3, 4])  # split-K: programs per row block
    with torch.no_grad():
        outs = linear_small(x, *ws, bn=bn, bk=bk, norm=None if norm is None else (norm.weight, norm.eps), split=split)
        xn = x if norm is None else norm(x)
    for out, w in zip(outs, ws):
        assert_close(out, xn.double() @ w.double().T, dtype, "linear_small", b=b, k=kd, n=w.shape[0], bn=bn, bk=bk,
                     norm=norm is not None, split=split)


def check_rmsnorm(rng: random.Random, dtype, device, size: Size) -> None:
    from qwen_vl_distributed.kernels.decode_layer import rmsnorm
    from qwen_vl_distributed.model.layers import RMSNorm

    b, h = rng.randint(1, size.batch * 4), rng.randint(1, size.hidden * 4)
    gen = _gen(rng)
    norm = RMSNorm(h, 1e-6).to(dtype).to(device)
    with torch.no_grad():
        norm.weight.copy_(1 + 0.1 * torch.randn(h, generator=gen))
    x, res = (randn(gen, b, h, dtype=dtype, device=device) for _ in range(2))
    with torch.no_grad():
        assert_close(rmsnorm(x, norm.weight, norm.eps), norm(x), dtype, "rmsnorm", b=b, h=h)
        hsum, y = rmsnorm(x, norm.weight, norm.eps, residual=res)
        assert torch.equal(hsum, res + x), f"rmsnorm residual b={b} h={h} {dtype}"
        assert_close(y, norm(res + x), dtype, "rmsnorm after residual", b=b, h=h)


def check_route(rng: random.Random, dtype, device, size: Size) -> None:
    """The softmax / top-k / renormalise kernel picks the reference's experts in its order, with its weights.
    Logits are distinct multiples of 1/4 (exact in every dtype), so no tie makes either order arbitrary."""
    from qwen_vl_distributed.kernels.decode_layer import route as fused_route
    from qwen_vl_distributed.model.moe import route

    b, e = rng.randint(1, size.batch * 2), rng.randint(2, min(size.experts * 2, 256))
    k = rng.randint(1, min(e, 10))
    gen = _gen(rng)
    logits = torch.stack([(torch.randperm(e, generator=gen) - e + 1) * 0.25 for _ in range(b)]).to(dtype).to(device)
    for normalize in (True, False):
        w, ids = fused_route(logits, k, normalize)
        w_ref, ids_ref = route(logits, k, normalize)
        assert torch.equal(ids.long(), ids_ref), f"route ids b={b} e={e} k={k} {dtype}"
        assert_close(w, w_ref, dtype, "route weights", b=b, e=e, k=k)


def check_norm_route(rng: random.Random, dtype, device, size: Size) -> None:
    """kernels.router: residual + RMSNorm + the router GEMV over hidden slices + top-k, against the RMSNorm module
    and the router's logits in float64 from the kernel's own x: h exact, x close, the chosen experts a top-K of the
    reference logits (up to the dtype's rounding of near ties), the weights the reference softmax's there; and for
    one token the experts' block layout (pair j alone in block j)."""
    from qwen_vl_distributed.kernels.router import norm_route
    from qwen_vl_distributed.model.layers import RMSNorm

    b, hd = (1 if rng.random() < 0.4 else rng.randint(2, 16)), rng.randint(1, size.hidden * 2)
    e = rng.randint(2, min(size.experts * 2, 256))
    k, bm, sw = rng.randint(1, min(e, 8)), rng.choice([16, 64]), rng.choice([16, 32, 64])
    normalize = rng.random() < 0.5
    gen = _gen(rng)
    norm = RMSNorm(hd, 1e-6).to(dtype).to(device)
    with torch.no_grad():
        norm.weight.copy_(1 + 0.1 * torch.randn(hd, generator=gen))
    o, res = (randn(gen, b, hd, dtype=dtype, device=device) for _ in range(2))
    router = randn(gen, e, hd, dtype=dtype, device=device)
    shape = dict(b=b, hidden=hd, e=e, k=k, slice=sw, normalize=normalize)
    with torch.no_grad():
        h, x, w, ids, aligned = norm_route(o, res, norm.weight, norm.eps, router, k, normalize, align_bm=bm,
                                           slice_width=sw)
        assert torch.equal(h, res + o), f"norm_route h {shape} {dtype}"
        assert_close(x, norm(res + o), dtype, "norm_route x", **shape)
    logits = (x.double() @ router.double().T).to(dtype).double()
    ids = ids.long()
    assert ids.shape == (b, k) and ((ids >= 0) & (ids < e)).all(), f"norm_route ids {shape}"
    assert all(len(set(r)) == k for r in ids.tolist()), f"norm_route repeats an expert {shape}"
    chosen = logits.gather(1, ids)
    rest = logits.scatter(1, ids, float("-inf")).max(1).values
    slack = 4 * torch.finfo(dtype).eps * logits.abs().amax(1)  # the logits' rounding in the kernel's sum order
    assert (chosen.min(1).values >= rest - slack).all(), f"norm_route: not a top-{k} {shape} {dtype}"
    p = torch.softmax(logits, 1).gather(1, ids)
    assert_close(w, p / p.sum(1, keepdim=True) if normalize else p, dtype, "norm_route weights", **shape)
    if b == 1:
        rows, block_expert = aligned
        assert block_expert.tolist() == ids[0].tolist(), f"norm_route block experts {shape}"
        want = torch.full((k, bm), k, dtype=torch.int32)
        want[:, 0] = torch.arange(k)
        assert torch.equal(rows.cpu().view(k, bm), want), f"norm_route rows {shape}"
    else:
        assert aligned is None


def check_sum_pairs(rng: random.Random, dtype, device, size: Size) -> None:
    """Each token's K pair outputs summed (the pairs of experts held elsewhere, id E, left out), plus the residual
    when there is one."""
    from qwen_vl_distributed.kernels.moe_triton import sum_pairs

    b, k, h = rng.randint(1, size.batch), rng.randint(1, 8), rng.randint(1, size.hidden * 4)
    e = rng.randint(k, size.experts + k)
    gen = _gen(rng)
    ids = held_elsewhere(rng, torch.randint(0, e, (b, k), generator=gen), e).to(device)
    y, res = randn(gen, b * k, h, dtype=dtype, device=device), randn(gen, b, h, dtype=dtype, device=device)
    ref = (y.view(b, k, h).double() * (ids < e)[..., None]).sum(1)
    residual = res if rng.random() < 0.5 else None
    if residual is not None:
        ref += res.double()
    assert_close(sum_pairs(y, ids, e, residual), ref, dtype, "sum_pairs", b=b, k=k, h=h, e=e,
                 held=int((ids < e).sum()), residual=residual is not None)


def _attention_module(rng, size, dtype, device):
    """A TextAttention of random head counts and head_dim, norm weights near 1."""
    from qwen_vl_distributed.model.attention import TextAttention

    d = draw_head_dim(rng, size)
    kvh = rng.randint(1, size.kv_heads)
    nh = kvh * rng.randint(1, size.heads)
    text = dataclasses.replace(preset("tiny").text, head_dim=d, num_attention_heads=nh, num_key_value_heads=kvh,
                               hidden_size=rng.randint(8, size.hidden))
    attn = TextAttention(text).to(dtype).to(device)
    gen = _gen(rng)
    with torch.no_grad():
        for p in attn.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * (0.1 if p.dim() == 1 else p.shape[-1] ** -0.5)
                    + (1.0 if p.dim() == 1 else 0.0))
    return attn, gen


def _rope(gen, rows: int, d: int, dtype, device):
    """cos, sin [rows, d] as text_rope_tables makes them: angles in fp32, both halves alike, cast."""
    ang = torch.rand(rows, d // 2, generator=gen) * 100
    emb = torch.cat((ang, ang), -1)
    return emb.cos().to(dtype).to(device), emb.sin().to(dtype).to(device)


def check_qkv_post(rng: random.Random, dtype, device, size: Size) -> None:
    """q/k RMSNorm + rotary + the cache write in one kernel (any even head_dim: padded half tiles) against the
    module's ops, each row's k/v to its own (block, offset) of a cache in blocks; rows past the decode bucket take
    several heads per program."""
    from qwen_vl_distributed.kernels.decode_layer import qkv_post
    from qwen_vl_distributed.model.layers import apply_rotary

    attn, gen = _attention_module(rng, size, dtype, device)
    nh, kvh, d = attn.num_heads, attn.num_kv_heads, attn.head_dim
    t = rng.choice([rng.randint(1, size.batch), rng.randint(65, 100)])  # decode rows, or prompt rows
    bs = 2 ** rng.randint(0, 4)
    nb = -(-(t + rng.randint(0, 8)) // bs)
    qkv = randn(gen, t, (nh + 2 * kvh) * d, dtype=dtype, device=device)
    q, k, v = qkv.split([nh * d, kvh * d, kvh * d], dim=1)  # strided views, as over one packed projection
    cos, sin = _rope(gen, t, d, dtype, device)
    places = torch.randperm(nb * bs, generator=gen)[:t]  # distinct places: no two rows write one
    row_blocks, row_offsets = places // bs, places % bs
    caches = [torch.zeros(nb, kvh, bs, d, dtype=dtype, device=device) for _ in range(4)]
    with torch.no_grad():
        qo = qkv_post(q, k, v, attn, cos, sin, caches[:2], row_blocks.to(device), row_offsets.to(device))
        q_ref = apply_rotary(attn.q_norm(q.reshape(t, nh, d)), cos, sin)
        k_ref = apply_rotary(attn.k_norm(k.reshape(t, kvh, d)), cos, sin)
        caches[2][row_blocks, :, row_offsets] = k_ref
        caches[3][row_blocks, :, row_offsets] = v.reshape(t, kvh, d)
    shape = dict(t=t, nh=nh, kvh=kvh, d=d, block_size=bs)
    assert_close(qo, q_ref, dtype, "qkv_post q", **shape)
    assert_close(caches[0], caches[2], dtype, "qkv_post k cache", **shape)
    assert torch.equal(caches[1], caches[3]), f"qkv_post v cache {shape} {dtype}"


def check_decoder_layer(rng: random.Random, dtype, device, size: Size) -> None:
    """The fused layer (kernels.decode_layer) on a decode step or a step of prompts and chunks, against the
    module's forward with the reference attention and experts: output rows and the cache it wrote. float32 only:
    in 16-bit dtypes a 1-ulp change of the router's input flips near-tied expert choices (docs/parity.md)."""
    from qwen_vl_distributed.checkpoint.synth_weights import randomize_module
    from qwen_vl_distributed.kernels.choices import DEFAULT, GEMV_MAX_ROWS
    from qwen_vl_distributed.kernels.fast_forward import fused_decoder_layer
    from qwen_vl_distributed.model.decoder import DecoderLayer
    from qwen_vl_distributed.model.kv_cache import KVCache

    d = draw_head_dim(rng, dataclasses.replace(size, head_dim=min(size.head_dim, 64)))
    kvh = rng.randint(1, size.kv_heads)
    e = rng.randint(2, size.experts)
    text = dataclasses.replace(
        preset("tiny").text, head_dim=d, num_attention_heads=kvh * rng.randint(1, size.heads),
        num_key_value_heads=kvh, hidden_size=rng.randint(8, size.hidden // 2), num_experts=e,
        num_experts_per_tok=rng.randint(1, min(e, 8)), moe_intermediate_size=rng.randint(4, size.width),
        mrope_section=(d // 2, 0, 0))
    with torch.device("meta"):
        layer = DecoderLayer(text, 0)
    randomize_module(layer, rng.randrange(1 << 30), torch.device(device), dtype)
    b = rng.randint(1, size.batch)
    length = rng.randint(2, 64)
    decode = rng.random() < 0.5
    lens = [1] * b if decode else [rng.randint(1, min(length, size.rows) // 2 + 1) for _ in range(b)]
    starts = [rng.randint(0, length - n) for n in lens]
    tables, bs, nb = draw_tables(rng, [a + n for a, n in zip(starts, lens)], length)
    layout = SeqLayout(tables, starts, lens)
    gen = _gen(rng)
    cache, ref_cache = (KVCache(text, range(1), nb, bs, length, dtype, device) for _ in range(2))
    for c in (cache.k[0], cache.v[0]):
        c.copy_(torch.randn(c.shape, generator=gen))
    ref_cache.k[0].copy_(cache.k[0])
    ref_cache.v[0].copy_(cache.v[0])
    h = randn(gen, layout.num_tokens, text.hidden_size, dtype=dtype, device=device)
    rope = _rope(gen, layout.num_tokens, d, dtype, device)
    choices = dataclasses.replace(DEFAULT, norm_router_rows=rng.choice([0, GEMV_MAX_ROWS]),
                                  norm_qkv_rows=rng.choice([0, GEMV_MAX_ROWS]))
    with torch.no_grad():
        ref = layer(h, rope, ref_cache.layer(0), layout)
        out = fused_decoder_layer(layer, h, rope, cache.layer(0), layout, choices)
    shape = dict(d=d, nh=text.num_attention_heads, kvh=kvh, hidden=text.hidden_size, e=e,
                 k=text.num_experts_per_tok, i=text.moe_intermediate_size, block_size=bs, starts=starts, lens=lens,
                 norm_router_rows=choices.norm_router_rows, norm_qkv_rows=choices.norm_qkv_rows)
    assert_close(out, ref, dtype, "fused decoder layer", **shape)
    assert_close(cache.k[0], ref_cache.k[0], dtype, "fused decoder layer k cache", **shape)


# -- vision -----------------------------------------------------------------------------------------------------------


def check_vision_rotary(rng: random.Random, dtype, device, size: Size) -> None:
    from qwen_vl_distributed.kernels.vision_rotary import rotate_qk
    from qwen_vl_distributed.model.rope import vision_rope_tables
    from qwen_vl_distributed.model.vision import vision_rotary

    n, heads, d = rng.randint(1, size.rows * 4), rng.randint(1, 4), 4 * rng.randint(1, size.head_dim // 4)
    side = max(1, int(math.sqrt(n)))
    rope = tuple(t.to(device) for t in vision_rope_tables(torch.arange(n) // side, torch.arange(n) % side, d,
                                                          10000.0))
    qkv = randn(_gen(rng), n, 3 * heads * d, dtype=dtype, device=device)
    q, k = rotate_qk(qkv, rope, heads)
    ref_q, ref_k, _ = qkv.view(n, 3, heads, d).unbind(1)
    assert_close(q, vision_rotary(ref_q, rope), dtype, "rotate_qk q", n=n, heads=heads, d=d)
    assert_close(k, vision_rotary(ref_k, rope), dtype, "rotate_qk k", n=n, heads=heads, d=d)


def check_layer_norm(rng: random.Random, dtype, device, size: Size) -> None:
    from qwen_vl_distributed.kernels.vision_block import layer_norm

    n, d = rng.randint(1, size.rows), rng.randint(1, size.hidden * 2)
    gen = _gen(rng)
    norm = torch.nn.LayerNorm(d, eps=1e-6).to(dtype).to(device)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(d, generator=gen))
        norm.bias.copy_(torch.randn(d, generator=gen))
        x, r = (randn(gen, n, d, dtype=dtype, device=device) for _ in range(2))
        s, y = layer_norm(x, norm, residual=r, rows=rng.choice([1, 4]))
        assert torch.equal(s, x + r), f"layer_norm residual n={n} d={d} {dtype}"
        assert_close(y, norm(x + r), dtype, "layer_norm", n=n, d=d)


CHECKS = {f.__name__.removeprefix("check_"): f for f in (
    check_decode_attention, check_extend_attention, check_experts, check_fp8_experts, check_align, check_act_quant,
    check_gemv, check_rmsnorm, check_route, check_norm_route, check_sum_pairs, check_qkv_post, check_decoder_layer,
    check_vision_rotary, check_layer_norm)}

# checks run in float32 only, and why
FLOAT32_ONLY = {"decoder_layer": "near-tied expert choices flip in 16-bit dtypes (see check_decoder_layer)",
                "align": "expert ids only: no floating-point data"}


def run_check(name: str, dtype: torch.dtype, seed: int, device: str, size: Size) -> None:
    """Check ``name`` on the shapes seed ``seed`` draws (the same ones every run, per device)."""
    if name in FLOAT32_ONLY and dtype != torch.float32:
        pytest.skip(f"{name}: float32 only ({FLOAT32_ONLY[name]})")
    CHECKS[name](random.Random(f"{name}-{seed}-{device}"), dtype, device, size)
