"""The Triton kernels on CUDA: the random-shape checks of tests/kernel_fuzz.py at GPU sizes in float32 and
bfloat16 (the CPU interpreter runs float32 and float16 at small sizes in ``make test``), float32 products at the
released model's shapes, and fp8-resident experts against float32 products of their dequantised weights."""

from __future__ import annotations

import pytest
import torch

from kernel_fuzz import CHECKS, GPU, rel, run_check
from paged import pool_blocks, shuffled_tables

pytestmark = pytest.mark.gpu
SEEDS = range(3)


@pytest.fixture(autouse=True)
def ieee_float32():
    """torch's float32 references without TF32 (the kernels' own float32 products are IEEE: kernels.tiles.mma)."""
    before = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32 = before


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("name", sorted(CHECKS))
def test_kernel_matches_reference_on_random_shapes(name, dtype, seed):
    run_check(name, dtype, seed, "cuda", GPU)


def test_float32_products_are_ieee_at_the_released_shapes():
    """The one-launch GEMV (q/k/v at 4096 -> 9216), the expert kernels (128 experts of 4096 x 1536, top-8; 1, 8 and
    512 tokens) and split-KV decode attention (64 query heads over 4 kv heads of 128, up to 1001 keys) against
    torch float32: summation order only (Triton's default TF32 would be ~1e-3). The attention reads its keys through
shuffled block tables of 16-token blocks."""
    from qwen_vl_distributed.kernels.decode_attention import decode_attention
    from qwen_vl_distributed.kernels.gemv import linear_small
    from qwen_vl_distributed.kernels.moe_triton import fused_experts
    from qwen_vl_distributed.model.attention import reference_cache_attention
    from qwen_vl_distributed.model.batch import SeqLayout
    from qwen_vl_distributed.model.moe import reference_experts, route

    torch.manual_seed(0)
    dev, h, i, e, k = "cuda", 4096, 1536, 128, 8
    x = torch.randn(4, h, device=dev)
    w = torch.randn(9216, h, device=dev) * 0.02
    assert rel(linear_small(x, w)[0], x @ w.T) < 1e-5
    gate_up = torch.randn(e, 2 * i, h, device=dev) * 0.02
    down = torch.randn(e, h, i, device=dev) * 0.02
    router = torch.randn(e, h, device=dev) * h ** -0.5
    for t in (1, 8, 512):
        xs = torch.randn(t, h, device=dev)
        wts, ids = route(xs @ router.T, k, True)
        err = rel(fused_experts(xs, ids, wts, gate_up, down), reference_experts(xs, ids, wts, gate_up, down))
        assert err < 1e-5, f"experts, {t} tokens: rel {err:.2e}"
    del gate_up, down
    kc, vc = (torch.randn(4 * 64, 4, 16, 128, device=dev) for _ in range(2))  # 4 sequences of 1024 in blocks of 16
    q = torch.randn(3, 64, 128, device=dev)
    blocks = torch.randperm(4 * 64).view(4, 64).tolist()
    layout = SeqLayout([blocks[i] for i in (0, 2, 3)], [1000, 17, 512], [1, 1, 1])
    got = decode_attention(q, kc, vc, layout.block_table(dev), layout.tensor("starts", dev), 128 ** -0.5)
    assert rel(got, reference_cache_attention(q, kc, vc, layout, 128 ** -0.5)) < 1e-5


@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 9),
                    reason="the fp8 kernels need compute capability 8.9+")
@pytest.mark.parametrize("tokens", [8, 32, 2048])
def test_fp8_experts_err_like_bfloat16_at_the_released_shapes(tokens):
    """One experts call of the 235B's layer (128 experts, 4096 x 1536, top-8, 128 x 128 blocks) with the experts
    kept in fp8, through the shipped tile of each size, against float32 products of the dequantised weights: the
    error of the same kernels on bfloat16 copies of those weights (1.25x, a bfloat16 rounding's spread), never the
    doubled error of a tile whose operand order loses precision; W8A8, which rounds the inputs to fp8 too, about
    ten times bfloat16's (docs/parity.md), under fifteen times."""
    from qwen_vl_distributed.kernels.moe_triton import fused_experts
    from qwen_vl_distributed.model.moe import reference_experts, route
    from qwen_vl_distributed.model.quant import quantize_experts

    torch.manual_seed(0)
    e, h, i, k, dev, bf = 128, 4096, 1536, 8, "cuda", torch.bfloat16
    gq, dq, scales = quantize_experts((torch.randn(e, 2 * i, h, device=dev) * 0.02).to(bf),
                                      (torch.randn(e, h, i, device=dev) * 0.02).to(bf), (128, 128))
    deq = [scales.dequantize(j, gq, dq, bf) for j in range(e)]
    gate_up, down = torch.stack([p[0] for p in deq]), torch.stack([p[1] for p in deq])
    del deq
    x = torch.randn(tokens, h, device=dev).to(bf)
    w, ids = route(torch.randn(tokens, e, device=dev), k, True)
    ref = reference_experts(x.float(), ids, w.float(), gate_up.float(), down.float())
    bf16 = rel(fused_experts(x, ids, w, gate_up, down), ref)
    fp8 = rel(fused_experts(x, ids, w, gq, dq, scales), ref)
    w8a8 = rel(fused_experts(x, ids, w, gq, dq, scales._replace(act_quant=True)), ref)
    print(f"{tokens} tokens: rel vs float32 bf16 {bf16:.3e} fp8 {fp8:.3e} w8a8 {w8a8:.3e}")
    assert bf16 < 1e-2 and fp8 < 1.25 * bf16 and w8a8 < 15 * bf16, (bf16, fp8, w8a8)


# the shipped W8A8 tile of each size, and tiles that fuse h's quantisation at decode sizes too (the swapped epilogue
# of one and of two 128-column groups)
_W8A8_EXTRA_TILES = [
    dict(bn=128, bk=128, warps=4, stages=3, down_bn=64, down_bk=128, down_stages=3, swap=True),
    dict(bm=64, bn=256, bk=128, warps=8, stages=2, down_bn=128, down_bk=128, down_warps=8, down_stages=3,
         cols_first=True, split=True, tma=True, swap=True),
]


@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 9),
                    reason="the fp8 kernels need compute capability 8.9+")
@pytest.mark.parametrize("tokens", [1, 8, 2048])
@pytest.mark.parametrize("tile", [None, *_W8A8_EXTRA_TILES], ids=["shipped", "bn128-swap", "bn256-split-swap"])
@pytest.mark.parametrize("with_x", [True, False], ids=["x-and-h", "h-only"])
def test_w8a8_fused_quantisation_equals_the_separate_launches_at_the_released_shapes(tokens, tile, with_x):
    """W8A8 at the 235B's shapes (128 experts, 4096 x 1536, top-8, 128 x 128 blocks): x quantised in the gate/up
    kernel's prologue (``with_x``; else by its launch) and h in its epilogue give the fp8 h, its scales and the
    experts' output bit for bit as the separate act_quant launches with the same tile."""
    import dataclasses

    from qwen_vl_distributed.kernels.choices import DEFAULT, MoeConfig
    from qwen_vl_distributed.kernels.moe_triton import align, fused_act_quant, fused_experts, gate_up_pairs
    from qwen_vl_distributed.model.moe import route
    from qwen_vl_distributed.model.quant import quantize_experts

    torch.manual_seed(tokens)
    e, h, i, k, dev, bf = 128, 4096, 1536, 8, "cuda", torch.bfloat16
    gq, dq, scales = quantize_experts((torch.randn(e, 2 * i, h, device=dev) * 0.02).to(bf),
                                      (torch.randn(e, h, i, device=dev) * 0.02).to(bf), (128, 128))
    w8a8 = scales._replace(act_quant=True)
    x = (torch.randn(tokens, h, device=dev) * torch.rand(tokens, 1, device=dev) * 4).to(bf)
    w, ids = route(torch.randn(tokens, e, device=dev), k, True)
    fused = dataclasses.replace(DEFAULT.moe_config(ids.numel(), w8a8) if tile is None else MoeConfig(**tile),
                                fuse_act_quant=True, fuse_x_quant=with_x)
    apart = dataclasses.replace(fused, fuse_act_quant=False)
    if with_x:
        assert fused_act_quant(fused, w8a8)[0], fused
    elif not fused_act_quant(fused, w8a8)[1]:
        pytest.skip(f"column tile {fused.bn} holds no whole group of 128: nothing to fuse without x")
    rows, blocks = align(ids, e, fused.bm)
    (h1, s1), (h2, s2) = (gate_up_pairs(x, ids.shape, rows, blocks, gq, cfg, w8a8) for cfg in (fused, apart))
    assert torch.equal(h1.view(torch.uint8), h2.view(torch.uint8)) and torch.equal(s1, s2)
    assert torch.equal(fused_experts(x, ids, w, gq, dq, w8a8, config=fused),
                       fused_experts(x, ids, w, gq, dq, w8a8, config=apart))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_mixed_step_split_kv_at_the_released_shapes(dtype):
    """A mixed step at the 235B's attention shape (64 query heads over 4 kv heads of 128, shuffled blocks of 16):
    4 decode rows after 2k-12k cached tokens, a 512-row chunk after 1024 and a 64-row prompt. The shipped split
    cuts the three longest decode rows into pieces; the result equals the float32 reference (the dtype's tolerance), and
    the unsplit launch's to summation order."""
    from qwen_vl_distributed.kernels import extend_attention as ea
    from qwen_vl_distributed.kernels.choices import SplitKV
    from qwen_vl_distributed.model.attention import reference_cache_attention
    from qwen_vl_distributed.model.batch import SeqLayout

    torch.manual_seed(0)
    dev, nh, kvh, d, bs = "cuda", 64, 4, 128, 16
    starts, lens = [12000, 9001, 4095, 2048, 1024, 0], [1, 1, 1, 1, 512, 64]
    tables = shuffled_tables([a + n for a, n in zip(starts, lens)], bs)
    kc, vc = (torch.randn(pool_blocks(tables), kvh, bs, d, device=dev).to(dtype) for _ in range(2))
    layout = SeqLayout(tables, starts, lens)
    q = torch.randn(layout.num_tokens, nh, d, device=dev).to(dtype)
    tile_rows, bn = ea.config(layout.num_tokens)[:2]
    plan = ea.step_plan(layout, ea.block_rows(nh // kvh, tile_rows), bn, kvh, SplitKV(), dev)
    assert plan.split_blocks == 3  # 12000, 9001 and 4095 cached: more than the step's fair share (~2.9k keys)
    out = ea.extend_attention(q, kc, vc, layout, d ** -0.5, SplitKV())
    ref = reference_cache_attention(q.float(), kc.float(), vc.float(), layout, d ** -0.5)
    bound = 1e-5 if dtype == torch.float32 else 1e-2
    assert rel(out, ref) < bound, f"split: rel {rel(out, ref):.2e}"
    whole = ea.extend_attention(q, kc, vc, layout, d ** -0.5, SplitKV(programs=0))
    assert rel(out, whole) < (1e-6 if dtype == torch.float32 else 1e-2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_qkv_post_inside_decode_attention_at_the_released_shapes(dtype):
    """decode_attention(post=...) against decode_layer.qkv_post then decode_attention: 64 query heads over 4 kv heads
    of 128, blocks of 16 in shuffled tables, new tokens at a block's first slot, its last, and position 0. The q/k
    norms' sums of squares run over other tiles there, so a bf16 value may round the other way: the outputs and
    the written k/v within bf16 rounding, every other cache entry untouched."""
    from types import SimpleNamespace

    from qwen_vl_distributed.kernels.decode_attention import decode_attention
    from qwen_vl_distributed.kernels.decode_layer import qkv_post

    torch.manual_seed(1)
    dev, nh, kvh, d, bs = "cuda", 64, 4, 128, 16
    starts = [16, 31, 0]  # the new token's position: a block's first slot, its last, the first of a sequence
    tables = shuffled_tables([64, 64, 64], bs, seed=4)
    kc, vc = (torch.randn(pool_blocks(tables), kvh, bs, d, device=dev).to(dtype) for _ in range(2))
    q, k, v = (torch.randn(3, n * d, device=dev).to(dtype) for n in (nh, kvh, kvh))
    norm = lambda: SimpleNamespace(weight=(torch.randn(d, device=dev) * 0.1 + 1).to(dtype), eps=1e-6)  # noqa: E731
    attn = SimpleNamespace(num_heads=nh, num_kv_heads=kvh, head_dim=d, q_norm=norm(), k_norm=norm())
    cos, sin = (torch.randn(3, d, device=dev).to(dtype) for _ in range(2))
    tab = torch.tensor([t[:4] for t in tables], dtype=torch.int32, device=dev)
    st = torch.tensor(starts, dtype=torch.int32, device=dev)
    blocks = torch.tensor([t[s // bs] for t, s in zip(tables, starts)], dtype=torch.int32, device=dev)
    offs = torch.tensor([s % bs for s in starts], dtype=torch.int32, device=dev)
    want_k, want_v = kc.clone(), vc.clone()
    qo = qkv_post(q, k, v, attn, cos, sin, (want_k, want_v), blocks, offs)
    want = decode_attention(qo, want_k, want_v, tab, st, d ** -0.5)
    got_k, got_v = kc.clone(), vc.clone()
    got = decode_attention(q, got_k, got_v, tab, st, d ** -0.5,
                           post=(k, v, attn.q_norm, attn.k_norm, cos, sin, blocks, offs))
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    assert rel(got, want) < tol
    assert rel(got_k, want_k) < tol and torch.equal(got_v, want_v)
    written = torch.zeros_like(kc, dtype=torch.bool)
    written[blocks.long(), :, offs.long()] = True
    assert torch.equal(got_k[~written], kc[~written])


@pytest.mark.parametrize("pdl", [0, 1, 2], ids=["plain", "pdl", "pdl-early"])
def test_split_k_gemv_at_the_released_shapes_under_graph_replay(pdl):
    """kernels.gemv's split-K at the 235B's decode GEMVs (q/k/v: K 4096 into 8192 + 512 + 512 rows; o: K 8192 into
    4096), 2-8 programs per row block, 0-2 weight tiles before the wait, captured in a CUDA graph: each replay gives
    the eager call's bits (the last program to arrive sums the partials in range order, whichever it is; a program
    summing before the others stored would read stale partials), the outputs are within bf16 rounding of float32
    products and of the unsplit kernel, and the arrival counters are back to 0."""
    from qwen_vl_distributed.kernels.arrivals import counters
    from qwen_vl_distributed.kernels.gemv import linear_small
    from qwen_vl_distributed.kernels.pdl import pdl_runs_on

    if pdl and not pdl_runs_on("cuda"):
        pytest.skip("programmatic dependent launch needs compute capability 9.0+")
    torch.manual_seed(3)
    for k, rows, (bn, bk) in ((4096, (8192, 512, 512), (64, 128)), (8192, (4096,), (32, 256))):
        x = torch.randn(3, k, device="cuda").to(torch.bfloat16)
        ws = [(torch.randn(n, k, device="cuda") * k ** -0.5).to(torch.bfloat16) for n in rows]
        want = [x.float() @ w.float().T for w in ws]
        unsplit = linear_small(x, *ws, bn=bn, bk=bk)
        for split in (2, 3, 4, 8):
            for pre in (0, 1, 2) if pdl else (0,):
                def run():
                    return linear_small(x, *ws, bn=bn, bk=bk, split=split, pre_wait=pre, pdl=pdl)

                eager = run()
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph):
                    outs = run()
                for _ in range(3):
                    graph.replay()
                    torch.cuda.synchronize()
                    assert all(torch.equal(o, e) for o, e in zip(outs, eager)), (k, split, pre)
                assert all(rel(e, w_) < 1e-2 and rel(e, u) < 1e-2 for e, w_, u in zip(eager, want, unsplit))
                assert not counters(x.device, 1).any()
