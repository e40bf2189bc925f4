"""The fast paths (kernels/) against the plain PyTorch references, on CPU.

Triton kernels run under Triton's interpreter (TRITON_INTERPRET=1, set by conftest.py when no GPU is present) in
fp32 and fp16: the interpreter's tl.dot mishandles bf16 operands, so bf16 is checked on the GPU (tests/gpu/).
Tolerances: fp32 paths agree to ~1e-6 relative (accumulation order only); fp16 to ~1e-3.
"""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch

from qwen_vl_distributed.kernels import enable_fast_paths, module_layers, register
from qwen_vl_distributed.kernels.attention import prefill_attention
from qwen_vl_distributed.kernels.choices import DEFAULT, GEMV_MAX_ROWS
from qwen_vl_distributed.runtime.cuda_graph import DecodeGraphs, GraphedStage
from qwen_vl_distributed.kernels.grouped import grouped_experts, has_grouped_mm
from qwen_vl_distributed.kernels.vision_attention import segment_attention
from qwen_vl_distributed.runtime.warmup import prompt_sizes, warm_prompt_path, warm_stage
from qwen_vl_distributed.model.attention import reference_cache_attention
from qwen_vl_distributed.model.batch import SeqLayout
from qwen_vl_distributed.model.config import preset
from qwen_vl_distributed.model.moe import reference_experts
from qwen_vl_distributed.model.qwen3_vl import Qwen3VLMoe
from qwen_vl_distributed.model.vision import VisionAttention, reference_segment_attention, vision_rotary
from paged import pool_blocks, shuffled_tables

try:
    import triton  # noqa: F401

    HAVE_TRITON = True
except ImportError:
    HAVE_TRITON = False
needs_triton = pytest.mark.skipif(not HAVE_TRITON, reason="triton is not importable here")


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def moe_inputs(t, k, e, h, i, dtype, seed=0, crowd=False):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(t, h, generator=g).to(dtype)
    ids = torch.stack([torch.randperm(e, generator=g)[:k] for _ in range(t)])
    if crowd:  # one expert chosen by every token: several BM blocks for it, and some experts idle
        ids[:, 0] = 1
        ids[:, 1:] = torch.where(ids[:, 1:] == 1, 0, ids[:, 1:])
    w = torch.softmax(torch.randn(t, k, generator=g), -1).to(dtype)
    gate_up = (torch.randn(e, 2 * i, h, generator=g) * 0.2).to(dtype)
    down = (torch.randn(e, h, i, generator=g) * 0.2).to(dtype)
    return x, ids, w, gate_up, down


# -- MoE --------------------------------------------------------------------------------------------------------


@needs_triton
@pytest.mark.parametrize("kernel", ["align_triton", "align_wide"])
@pytest.mark.parametrize("t,k,e,crowd,bm", [(1, 2, 8, False, 16), (5, 3, 6, False, 16), (40, 2, 4, True, 16),
                                            (9, 4, 32, True, 16), (600, 4, 12, True, 16),
                                            (700, 8, 16, False, 16),  # several 2048-pair chunks
                                            (700, 8, 128, True, 128)])  # the 235B's experts and prefill block
def test_align_kernels_match_torch_alignment(kernel, t, k, e, crowd, bm):
    from qwen_vl_distributed.kernels import moe_triton as mt

    if kernel == "align_triton" and t * k > mt.ALIGN_KERNEL_MAX_PAIRS:
        pytest.skip("above the single-program kernel's limit")
    ids = moe_inputs(t, k, e, 8, 8, torch.float32, seed=t, crowd=crowd)[1].reshape(-1)
    rows_t, blocks_t = mt.align_torch(ids, e, bm)
    rows_k, blocks_k = getattr(mt, kernel)(ids, e, bm)
    assert torch.equal(rows_t, rows_k) and torch.equal(blocks_t, blocks_k)
    # every pair appears exactly once, inside a block of its own expert
    p = ids.numel()
    real = rows_t[rows_t < p].long()
    assert sorted(real.tolist()) == list(range(p))
    block_of_row = torch.arange(rows_t.numel()) // bm
    assert torch.equal(blocks_t[block_of_row[rows_t < p]].long(), ids[real])


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("t,k,e,crowd,order", [(1, 2, 8, False, {}), (7, 3, 6, False, {}), (40, 2, 4, True, {}),
                                               (40, 2, 4, True, {"cols_first": True}),
                                               (90, 2, 8, True, {"bm": 64, "split": True}),
                                               (90, 2, 8, True, {"bm": 64, "split": True, "tma": True}),
                                               (40, 2, 4, True, {"swap": True}),
                                               (90, 2, 8, True, {"bm": 64, "split": True, "tma": True,
                                                                 "swap": True})])
def test_fused_experts_match_reference(dtype, t, k, e, crowd, order):
    from qwen_vl_distributed.kernels.moe_triton import MoeConfig, fused_experts

    x, ids, w, gate_up, down = moe_inputs(t, k, e, 64, 48, dtype, seed=3, crowd=crowd)
    # several column and K tiles, uneven I/BN; both launch orders; partial tiles (the crowded expert's 90 rows
    # fill one 64-row block and 26 rows of a second, which runs on its top half; the other experts' ~13 rows run on
    # a quarter block)
    small = MoeConfig(**{"bm": 16, "bn": 16, "bk": 32, "down_bn": 16, "down_bk": 16, **order})
    out = fused_experts(x, ids, w, gate_up, down, config=small)
    ref = reference_experts(x.float(), ids, w.float(), gate_up.float(), down.float())
    assert out.dtype == dtype and out.shape == x.shape
    assert rel(out, ref) < (1e-5 if dtype == torch.float32 else 3e-3)


def fp8_experts(gate_up: torch.Tensor, down: torch.Tensor, block):
    """(gate_up fp8, down fp8, ExpertScales, the dequantised gate_up and down in the weights' dtype)."""
    from qwen_vl_distributed.model.quant import dequantize_blockwise, quantize_experts

    i = down.shape[-1]
    gq, dq, scales = quantize_experts(gate_up, down, block)
    deq = lambda q, s: dequantize_blockwise(q, s, block, gate_up.dtype)  # noqa: E731
    return (gq, dq, scales, torch.cat([deq(gq[:, :i], scales.gate_up[:, 0]), deq(gq[:, i:], scales.gate_up[:, 1])], 1),
            deq(dq, scales.down))


# fp8 block shapes and tile variants (every launch order, partial tiles, TMA, swap) for the fp8 and W8A8 kernels
FP8_TILE_CASES = [((16, 16), {}), ((16, 32), {"cols_first": True}), ((32, 16), {"bm": 64, "split": True}),
                  ((16, 16), {"bm": 64, "split": True, "tma": True}), ((16, 32), {"swap": True}),
                  ((32, 16), {"bm": 64, "split": True, "tma": True, "swap": True})]


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("block,order", FP8_TILE_CASES)
def test_fp8_experts_kernels_compute_with_the_dequantised_weights(dtype, block, order):
    """fp8 weight tiles times their block scales give, bit for bit, the products of the dequantised weights (the
    same tiles; the kernel narrows its reduction tile to the block width): I = 48 is not a multiple of 32-row
    blocks, H = 64 spans several column blocks."""
    from qwen_vl_distributed.kernels.moe_triton import MoeConfig, fused_experts

    x, ids, w, gate_up, down = moe_inputs(90, 2, 8, 64, 48, dtype, seed=4, crowd=True)
    gq, dq, scales, gate_up_deq, down_deq = fp8_experts(gate_up, down, block)
    cfg = MoeConfig(**{"bm": 16, "bn": 16, "bk": 32, "down_bn": 16, "down_bk": 32, **order})
    narrowed = MoeConfig(**{**cfg.__dict__, "bk": min(32, block[1]), "down_bk": min(32, block[1])})
    out = fused_experts(x, ids, w, gq, dq, scales, config=cfg)
    assert torch.equal(out, fused_experts(x, ids, w, gate_up_deq, down_deq, config=narrowed))
    ref = reference_experts(x.float(), ids, w.float(), gq, dq, scales)
    assert rel(out, ref) < (1e-5 if dtype == torch.float32 else 3e-3)


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("kind", ["bf16", "fp8", "w8a8"])
@pytest.mark.parametrize("order", [{}, {"cols_first": True}, {"bm": 64, "split": True}, {"swap": True},
                                   {"bm": 64, "split": True, "tma": True}])
def test_the_down_kernel_reading_its_first_tile_before_the_wait_gives_the_same_bits(dtype, kind, order):
    """``expert_pairs(pre_wait=True)``: the block's expert and the first down tile read before the grid wait, the
    rest as before: the same products in the same order (unused blocks leave early; TMA tiles ignore it). I = 48
    over down tiles of 16 (several steps) and of 64 (one partial step)."""
    from qwen_vl_distributed.kernels.moe_triton import MoeConfig, expert_pairs

    x, ids, w, gate_up, down = moe_inputs(90, 2, 8, 64, 48, dtype, seed=5, crowd=True)
    scales = None
    if kind != "bf16":
        gate_up, down, scales, _, _ = fp8_experts(gate_up, down, (16, 32))
        scales = scales._replace(act_quant=kind == "w8a8")
    for down_bk in (16, 64):
        bk = 32 if kind != "bf16" else 16
        cfg = MoeConfig(**{"bm": 16, "bn": 16, "bk": bk, "down_bn": 16, "down_bk": down_bk, **order})
        want = expert_pairs(x, ids, w, gate_up, down, scales, cfg)
        assert torch.equal(expert_pairs(x, ids, w, gate_up, down, scales, cfg, pre_wait=True), want), down_bk


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("kind", ["bf16", "w8a8"])
@pytest.mark.parametrize("order", [{}, {"cols_first": True}, {"swap": True}, {"bm": 64, "split": True}])
@pytest.mark.parametrize("t", [1, 5])
def test_the_k_sum_in_the_down_launch_equals_sum_pairs(dtype, kind, order, t):
    """``expert_pairs(summed=...)``: the last program of each column tile to arrive sums the tokens' pairs there
    (kernels.arrivals): the very bits of ``sum_pairs`` after the pairs, with and without the residual, with a pair
    held elsewhere (id E: no output row) and with the first tile read before the wait; H = 80 over column tiles of
    16 and 32 (a partial last tile). The counters are back at 0 afterwards, so the next launch counts from 0."""
    from qwen_vl_distributed.kernels.arrivals import counters
    from qwen_vl_distributed.kernels.moe_triton import MoeConfig, expert_pairs, sum_pairs

    x, ids, w, gate_up, down = moe_inputs(t, 3, 8, 80, 48, dtype, seed=t, crowd=False)
    ids[0, 1] = 8  # an expert held by another rank
    scales = None
    if kind != "bf16":
        gate_up, down, scales, _, _ = fp8_experts(gate_up, down, (16, 32))
        scales = scales._replace(act_quant=True)
    res = torch.randn(t, 80).to(dtype)
    for down_bn in (16, 32):
        cfg = MoeConfig(**{"bm": 16, "bn": 16, "bk": 32, "down_bn": down_bn, "down_bk": 16, **order})
        pairs = expert_pairs(x, ids, w, gate_up, down, scales, cfg)
        for residual in (res, None):
            want = sum_pairs(pairs, ids, 8, residual=residual)
            for pre in (False, True):
                got = expert_pairs(x, ids, w, gate_up, down, scales, cfg, pre_wait=pre, summed=(residual,))
                assert got.shape == (t, 80) and torch.equal(got, want), (down_bn, residual is None, pre)
    assert not counters(x.device, 8).any()


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_act_quant_kernel_matches_reference(dtype):
    """The W8A8 input quantisation in one launch equals model.quant.quantize_activations bit for bit: rows past a
    16-row tile, a partial last group (K = 80 in groups of 32), an all-zero row."""
    from qwen_vl_distributed.kernels.moe_triton import act_quant
    from qwen_vl_distributed.model.quant import quantize_activations

    x = (torch.randn(37, 80, generator=torch.Generator().manual_seed(2)) * 5).to(dtype)
    x[3] = 0
    q, s = act_quant(x, 32)
    q_ref, s_ref = quantize_activations(x, 32)
    assert s.shape == (37, 3) and torch.equal(s, s_ref) and s[3].eq(1).all()
    assert torch.equal(q.view(torch.uint8), q_ref.view(torch.uint8))


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("block,order", [((r, max(c, 32)), o) for (r, c), o in FP8_TILE_CASES]
                         + [((32, 64), {"bm": 64, "bk": 64, "down_bk": 16})])
def test_w8a8_experts_kernels_match_the_w8a8_reference(dtype, block, order):
    """W8A8 (scales.act_quant): the kernels quantise each product's inputs per token and group and scale the fp8
    products by both scales, as model.quant.w8a8_linear does; not what the dequantised weights give. Blocks 32 or
    more wide (fp8 x fp8 products need a 32-wide reduction tile: a narrower tile asked for is widened)."""
    from qwen_vl_distributed.kernels.moe_triton import MoeConfig, fused_experts

    x, ids, w, gate_up, down = moe_inputs(90, 2, 8, 64, 48, dtype, seed=4, crowd=True)
    gq, dq, scales, gate_up_deq, down_deq = fp8_experts(gate_up, down, block)
    w8a8 = scales._replace(act_quant=True)
    cfg = MoeConfig(**{"bm": 16, "bn": 16, "bk": 32, "down_bn": 16, "down_bk": 32, **order})
    out = fused_experts(x, ids, w, gq, dq, w8a8, config=cfg)
    assert out.dtype == dtype and out.shape == x.shape
    ref = reference_experts(x, ids, w, gq, dq, w8a8)
    assert rel(out, ref) < (1e-5 if dtype == torch.float32 else 3e-3)
    assert rel(out, reference_experts(x, ids, w, gq, dq, scales)) > 1e-3  # the inputs were rounded to fp8


# (tokens, hidden, expert width, block, tile): ragged token counts, a hidden size that is a multiple of the group and
# one that ends in a partial group, expert widths that do and do not; column tiles of one and of two groups, every
# launch order, partial tiles, TMA and swap
FUSED_QUANT_CASES = [(37, 64, 48, (16, 32), {}),
                     (90, 80, 48, (32, 32), {"bn": 64, "cols_first": True}),
                     (90, 64, 64, (16, 32), {"bm": 64, "split": True, "tma": True}),
                     (23, 80, 64, (32, 32), {"bn": 64, "swap": True}),
                     (90, 96, 40, (32, 32), {"bm": 64, "split": True, "tma": True, "swap": True})]


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("t,h,i,block,order", FUSED_QUANT_CASES)
@pytest.mark.parametrize("with_x", [True, False], ids=["x-and-h", "h-only"])
def test_w8a8_quantisation_fused_into_the_gate_up_kernel_gives_the_same_bits(dtype, t, h, i, block, order, with_x):
    """W8A8 with x quantised in the gate/up kernel's prologue (BK = the group; ``with_x``) and h in its epilogue
    (BN whole groups): h in fp8, its scales and the experts' output equal, bit for bit, what the separate act_quant
    launches and the same kernels give. h-only: x comes in fp8 from its launch, so the kernel takes the
    activations' dtype from elsewhere for its roundings."""
    from qwen_vl_distributed.kernels.moe_triton import MoeConfig, align, fused_act_quant, fused_experts, gate_up_pairs

    x, ids, w, gate_up, down = moe_inputs(t, 2, 8, h, i, dtype, seed=t, crowd=True)
    x[1] = 0  # an all-zero row: scale 1
    gq, dq, scales, _, _ = fp8_experts(gate_up, down, block)
    w8a8 = scales._replace(act_quant=True)
    fused = MoeConfig(**{"bm": 16, "bn": 32, "bk": 32, "down_bn": 16, "down_bk": 32, "fuse_act_quant": True,
                         "fuse_x_quant": with_x, **order})
    apart = dataclasses.replace(fused, fuse_act_quant=False)
    assert fused_act_quant(fused, w8a8) == (with_x, True) and fused_act_quant(apart, w8a8) == (False, False)
    rows, blocks = align(ids, 8, fused.bm)
    (h1, s1), (h2, s2) = (gate_up_pairs(x, ids.shape, rows, blocks, gq, cfg, w8a8) for cfg in (fused, apart))
    assert h1.dtype == h2.dtype == torch.float8_e4m3fn and s1.shape == (t * 2, -(-i // 32))
    assert torch.equal(h1.view(torch.uint8), h2.view(torch.uint8)) and torch.equal(s1, s2)
    out = fused_experts(x, ids, w, gq, dq, w8a8, config=fused)
    assert torch.equal(out, fused_experts(x, ids, w, gq, dq, w8a8, config=apart))
    assert rel(out, reference_experts(x, ids, w, gq, dq, w8a8)) < (1e-5 if dtype == torch.float32 else 3e-3)


@needs_triton
def test_w8a8_fuses_only_whole_groups():
    """x's quantisation moves into the kernel only where its reduction tile is the whole group, h's only where the
    column tile also holds whole groups; elsewhere (or asked not to) the act_quant launches stay."""
    from qwen_vl_distributed.kernels.moe_triton import MoeConfig, fused_act_quant

    _, _, _, gate_up, down = moe_inputs(1, 1, 2, 64, 48, torch.float32)
    scales = fp8_experts(gate_up, down, (32, 32))[2]
    w8a8 = scales._replace(act_quant=True)
    on = dict(fuse_act_quant=True)
    assert fused_act_quant(MoeConfig(bn=64, bk=32, **on), w8a8) == (True, True)
    assert fused_act_quant(MoeConfig(bn=16, bk=32, **on), w8a8) == (True, False)
    assert fused_act_quant(MoeConfig(bn=64, bk=16, **on), w8a8) == (False, False)
    assert fused_act_quant(MoeConfig(bn=64, bk=32), w8a8) == (False, False)  # the default: separate launches
    h_only = dict(on, fuse_x_quant=False)  # x by its launch, h in the epilogue wherever the column tile holds groups
    assert fused_act_quant(MoeConfig(bn=64, bk=16, **h_only), w8a8) == (False, True)
    assert fused_act_quant(MoeConfig(bn=16, bk=32, **h_only), w8a8) == (False, False)
    # weight-only fp8: nothing to quantise
    assert fused_act_quant(MoeConfig(bn=64, bk=32, **on), scales) == (False, False)


@needs_triton
def test_the_experts_ab_benchmark_runs_every_path_and_reports_it():
    """bench/experts_ab.py (section fp8's one-experts-call A/B) on a tiny stage under the interpreter, with a
    counting timer in place of CUDA events: every path runs once per size, the two W8A8 paths agree bit for bit,
    and the report shows each path's ratio to bf16."""
    from qwen_vl_distributed.bench.experts_ab import PATHS, experts_ab
    from qwen_vl_distributed.bench.report import render

    cfg = preset("tiny")
    torch.manual_seed(0)
    stage = dict(layers=(0, 1), vision=False, embed=False, head=False)
    bf16, fp8 = Qwen3VLMoe(cfg, **stage), Qwen3VLMoe(cfg, **stage)
    experts = bf16.model.language_model.layers["0"].mlp.experts
    for p in (experts.gate_up_proj, experts.down_proj):  # the module leaves them to the loader
        p.data.normal_(0, 0.2)
    fp8.load_state_dict(bf16.state_dict())
    fp8.model.language_model.layers["0"].mlp.experts.quantize_fp8((32, 32))
    ran = []
    timed = {"bf16": 2.0, "fp8": 1.0, "w8a8_apart": 0.8, "w8a8_fused": 0.5, "w8a8_fused_h": 0.4}

    def timer(fn):
        ran.append(fn())
        return timed[PATHS[(len(ran) - 1) % len(PATHS)]]

    res = experts_ab(bf16, fp8, DEFAULT, [5, 9], timer=timer)
    assert len(ran) == 10 and all(y.shape == (n, cfg.text.hidden_size) for y, n in zip(ran, [5] * 5 + [9] * 5))
    assert res[9]["w8a8_fused_equal"] and res[9]["w8a8_fused_h_equal"]
    assert res[9]["speedup_vs_bf16"] == {"fp8": 2.0, "w8a8_apart": 2.5, "w8a8_fused": 4.0, "w8a8_fused_h": 5.0}
    text = render({"fp8": {"block": [32, 32], "call_ab": res}})
    assert "experts call alone, 9 tokens: bf16 2.000 ms, fp8 1.000 ms (2.00x), W8A8 separate quant 0.800 ms " \
           "(2.50x), W8A8 fused quant 0.500 ms (4.00x), W8A8 h quant fused 0.400 ms (5.00x); vs separate: W8A8 " \
           "fused quant identical and W8A8 h quant fused identical" in text


def test_fp8_block_rule_and_the_reference_for_blocks_the_kernels_cannot_tile():
    """The kernels take blocks of a power-of-two width >= 16, >= 32 for W8A8 (which path a CUDA tensor then takes
    shows on the GPU); fast_experts' reference on fp8 experts equals the reference on the dequantised weights, and
    on W8A8 ones the W8A8 reference; the kernels refuse such blocks by name; 'grouped' refuses fp8."""
    from qwen_vl_distributed.kernels import fp8_fits
    from qwen_vl_distributed.kernels.grouped import fast_experts
    from qwen_vl_distributed.kernels.moe_triton import fused_experts

    x, ids, w, gate_up, down = moe_inputs(5, 2, 4, 48, 24, torch.float32, seed=1)
    gq, dq, scales, gate_up_deq, down_deq = fp8_experts(gate_up, down, (24, 24))
    assert not fp8_fits(scales) and fp8_fits(None) and fp8_fits(scales._replace(block=(24, 128)))
    assert torch.equal(fast_experts(x, ids, w, gq, dq, scales), reference_experts(x, ids, w, gate_up_deq, down_deq))
    with pytest.raises(ValueError, match="not fp8 experts"):
        grouped_experts(x, ids, w, gq, dq, scales)
    gq, dq, scales, _, _ = fp8_experts(gate_up, down, (16, 16))
    w8a8 = scales._replace(act_quant=True)
    assert fp8_fits(scales) and not fp8_fits(w8a8) and fp8_fits(w8a8._replace(block=(16, 32)))
    assert torch.equal(fast_experts(x, ids, w, gq, dq, w8a8), reference_experts(x, ids, w, gq, dq, w8a8))
    with pytest.raises(ValueError, match="16x16 blocks.*>= 32 for W8A8"):
        fused_experts(x, ids, w, gq, dq, w8a8)


@needs_triton
def test_moe_config_guards():
    from qwen_vl_distributed.kernels import moe_triton as mt

    with pytest.raises(ValueError, match="split needs bm >= 64"):
        mt.MoeConfig(bm=32, split=True)
    # TMA only where a descriptor is legal: rows 16-byte aligned, tiles inside one expert, some weights at all
    ok = torch.zeros(2, 32, 16, dtype=torch.float16)
    assert mt._weight_arg(ok, True, 32, 16, 16)[1]
    assert not mt._weight_arg(ok, False, 32, 16, 16)[1]
    assert not mt._weight_arg(torch.zeros(2, 32, 12, dtype=torch.float16), True, 32, 16, 16)[1]  # 24-byte rows
    assert not mt._weight_arg(ok, True, 24, 16, 16)[1]  # a 16-row tile would cross an expert's 24 rows
    assert not mt._weight_arg(torch.zeros(0, 32, 16, dtype=torch.float16), True, 32, 16, 16)[1]


@pytest.mark.skipif(not has_grouped_mm(), reason="this torch has no grouped_mm")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_grouped_experts_match_reference(dtype):
    x, ids, w, gate_up, down = moe_inputs(37, 3, 8, 64, 24, dtype, seed=5, crowd=True)
    out = grouped_experts(x, ids, w, gate_up, down)
    ref = reference_experts(x.float(), ids, w.float(), gate_up.float(), down.float())
    assert rel(out, ref) < (1e-5 if dtype == torch.float32 else 1e-2)


# -- attention ----------------------------------------------------------------------------------------------------


def cache_inputs(dtype, s=5, kvh=2, length=300, d=16, nh=6, seed=0, block_size=16):
    """Random k/v caches of blocks holding s sequences of ``length`` tokens in shuffled blocks of ``block_size``
    (None: one block per sequence, the contiguous layout), and the sequences' block tables."""
    bs = block_size or length
    tables = shuffled_tables([length] * s, bs, seed) if block_size else [[i] for i in range(s)]
    g = torch.Generator().manual_seed(seed)
    k_cache = torch.randn(pool_blocks(tables) + 1, kvh, bs, d, generator=g).to(dtype)
    v_cache = torch.randn(pool_blocks(tables) + 1, kvh, bs, d, generator=g).to(dtype)
    return k_cache, v_cache, nh, tables


def test_reference_attention_reads_the_blocks_a_contiguous_cache_holds():
    """The same keys in shuffled blocks of 16 and in one block per sequence give the same attention."""
    k_flat, v_flat, nh, flat_tables = cache_inputs(torch.float32, s=2, length=70, block_size=None)
    k_paged, v_paged, _, tables = cache_inputs(torch.float32, s=2, length=70)
    for i, t in enumerate(tables):  # copy each sequence's keys into its blocks
        for j, b in enumerate(t):
            n = min(16, 70 - 16 * j)
            k_paged[b, :, :n] = k_flat[i, :, 16 * j:16 * j + n]
            v_paged[b, :, :n] = v_flat[i, :, 16 * j:16 * j + n]
    q = torch.randn(12, nh, 16)
    starts, lens = [3, 60], [9, 3]
    flat = reference_cache_attention(q, k_flat, v_flat, SeqLayout(flat_tables, starts, lens), 0.25)
    paged = reference_cache_attention(q, k_paged, v_paged, SeqLayout(tables, starts, lens), 0.25)
    assert rel(paged, flat) < 1e-6


@needs_triton
@pytest.mark.parametrize("block_size", [16, 64, None])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_split_kv_decode_matches_reference(dtype, block_size):
    """Blocks smaller than, equal to and (contiguous) larger than the kernel's 64-key step."""
    from qwen_vl_distributed.kernels.decode_attention import decode_attention, num_splits

    k_cache, v_cache, nh, tables = cache_inputs(dtype, block_size=block_size)
    # 1 key, many, the whole sequence
    layout = SeqLayout([tables[i] for i in (3, 0, 4)], starts=[0, 137, 299], lens=[1, 1, 1])
    assert num_splits(3, 2, 300) > 1  # several splits, some empty for the short sequence
    q = torch.randn(3, nh, 16).to(dtype)
    out = decode_attention(q, k_cache, v_cache, layout.block_table("cpu"), layout.tensor("starts", "cpu"), 0.25)
    ref = reference_cache_attention(q.float(), k_cache.float(), v_cache.float(), layout, 0.25)
    assert rel(out, ref) < (1e-5 if dtype == torch.float32 else 2e-3)


@pytest.mark.parametrize("block_size", [8, None])
def test_prefill_attention_matches_reference(block_size):
    k_cache, v_cache, nh, tables = cache_inputs(torch.float32, length=64, block_size=block_size)
    # a prompt from 0, a continued chunk, and a decode row in one packed step
    layout = SeqLayout([tables[i] for i in (1, 2, 0)], starts=[0, 20, 40], lens=[9, 5, 1])
    q = torch.randn(layout.num_tokens, nh, 16)
    out = prefill_attention(q, k_cache, v_cache, layout, 0.25)
    ref = reference_cache_attention(q, k_cache, v_cache, layout, 0.25)
    assert rel(out, ref) < 1e-5


@needs_triton
@pytest.mark.parametrize("tile,block_size", [(0, 16), (1, 16), (0, None), (1, 128)])
@pytest.mark.parametrize("dtype,nh", [(torch.float32, 6), (torch.float16, 6), (torch.float32, 16)])
def test_extend_attention_matches_reference(dtype, nh, tile, block_size, monkeypatch):
    from qwen_vl_distributed.kernels import extend_attention as ea
    from qwen_vl_distributed.kernels.extend_attention import block_rows, config, extend_attention

    monkeypatch.setattr(ea, "CONFIGS", {1 << 30: list(ea.CONFIGS.values())[tile]})  # each shipped tile
    # 3 (padded to 4) or 8 query heads per kv head; cache blocks of 16, 128 keys or contiguous
    k_cache, v_cache, _, tables = cache_inputs(dtype, length=300, nh=nh, block_size=block_size)
    # a prompt from 0 over several row blocks, a chunk whose prefix spans whole key blocks and ends mid-block,
    # a decode row, a one-row chunk, and a prompt shorter than a block
    layout = SeqLayout([tables[i] for i in (1, 2, 0, 4, 3)], starts=[0, 150, 299, 70, 0], lens=[70, 83, 1, 1, 3])
    assert 70 > block_rows(nh // 2, config(158)[0]) and 150 > config(158)[1]
    q = torch.randn(layout.num_tokens, nh, 16).to(dtype)
    out = extend_attention(q, k_cache, v_cache, layout, 0.25)
    ref = reference_cache_attention(q.float(), k_cache.float(), v_cache.float(), layout, 0.25)
    assert rel(out, ref) < (1e-5 if dtype == torch.float32 else 2e-3)
    strided = torch.randn(layout.num_tokens, 3, nh, 16).to(dtype)[:, 1]  # q as a view into a packed buffer
    strided.copy_(q)
    assert torch.equal(extend_attention(strided, k_cache, v_cache, layout, 0.25), out)


@needs_triton
@pytest.mark.parametrize("nh,kvh", [(2, 2), (6, 2), (16, 2)])
def test_extend_attention_random_layouts(nh, kvh):
    """Row blocks and key blocks meeting at every offset: random starts and lengths, including lengths that are
    not multiples of a block and prefixes ending just before, on and after a key-block boundary."""
    from qwen_vl_distributed.kernels.extend_attention import extend_attention

    k_cache, v_cache, _, tables = cache_inputs(torch.float32, s=6, kvh=kvh, length=260, nh=nh, block_size=8)
    g = torch.Generator().manual_seed(nh)
    for _ in range(4):
        b = int(torch.randint(1, 5, (1,), generator=g))
        starts = [int(x) for x in torch.randint(0, 200, (b,), generator=g)]
        starts[0] = [62, 64, 65, 126][_]  # just before, on and after key-block boundaries (64 keys)
        lens = [int(torch.randint(1, 60, (1,), generator=g)) for _ in range(b)]
        layout = SeqLayout(tables[:b], starts=starts, lens=lens)
        q = torch.randn(layout.num_tokens, nh, 16, generator=g)
        out = extend_attention(q, k_cache, v_cache, layout, 0.25)
        assert rel(out, reference_cache_attention(q, k_cache, v_cache, layout, 0.25)) < 1e-5, layout


FORCE_SPLIT = dict(programs=1 << 20, min_keys=1)  # every row block cut at each key step below its first row


@needs_triton
@pytest.mark.parametrize("tile,block_size", [(0, 16), (1, 16), (0, None), (1, 64)])
@pytest.mark.parametrize("dtype,nh", [(torch.float32, 6), (torch.float16, 6), (torch.float32, 16)])
def test_extend_attention_split_kv_matches_reference(dtype, nh, tile, block_size, monkeypatch):
    """Split-KV: decode rows after 0, 127, 128, 129 and 299 cached keys (no cut; none just below two key steps;
    one cut on and just after; several), a chunk after a long prefix and a prompt from 0, every block cut as
    finely as the key step allows: the reference's result, and the unsplit launch's to summation order."""
    from qwen_vl_distributed.kernels import extend_attention as ea
    from qwen_vl_distributed.kernels.choices import SplitKV

    monkeypatch.setattr(ea, "CONFIGS", {1 << 30: list(ea.CONFIGS.values())[tile]})
    k_cache, v_cache, _, tables = cache_inputs(dtype, s=8, length=300, nh=nh, block_size=block_size)
    layout = SeqLayout([tables[i] for i in (0, 1, 2, 3, 4, 5, 6)], starts=[299, 0, 127, 200, 128, 0, 129],
                       lens=[1, 1, 1, 37, 1, 45, 1])
    q = torch.randn(layout.num_tokens, nh, 16).to(dtype)
    split = SplitKV(**FORCE_SPLIT)
    bn = ea.config(layout.num_tokens)[1]
    plan = ea.step_plan(layout, ea.block_rows(nh // 2, ea.config(layout.num_tokens)[0]), bn, 2, split, "cpu")
    assert plan.split_blocks >= 4 and plan.items >= 2 * plan.split_blocks
    out = ea.extend_attention(q, k_cache, v_cache, layout, 0.25, split)
    ref = reference_cache_attention(q.float(), k_cache.float(), v_cache.float(), layout, 0.25)
    assert rel(out, ref) < (1e-5 if dtype == torch.float32 else 2e-3)
    whole = ea.extend_attention(q, k_cache, v_cache, layout, 0.25, SplitKV(programs=0))
    assert rel(out, whole) < (1e-6 if dtype == torch.float32 else 2e-3)


@needs_triton
@pytest.mark.parametrize("programs,min_keys", [(0, 1), (264, 256), (1 << 20, 1), (40, 100)])
def test_step_plan_pieces_cover_each_row_block_once(programs, min_keys):
    """The host plan of a split step, on random layouts: each row block's pieces tile its keys [0, hi) without
    gap or overlap, every cut is a multiple of the piece size (a multiple of the key step) below the block's
    first row (so each row sees a key
    of each piece), split pieces own disjoint partial rows in piece order, and the items run longest first (row
    order, one item per block, where no block is cut)."""
    from qwen_vl_distributed.kernels.choices import SplitKV
    from qwen_vl_distributed.kernels.extend_attention import split_keys, step_plan

    g = torch.Generator().manual_seed(programs)
    bm, bn, kvh = 4, 64, 2
    split_blocks = 0
    for _ in range(6):
        b = int(torch.randint(1, 7, (1,), generator=g))
        starts = [int(x) for x in torch.randint(0, 700, (b,), generator=g)]
        lens = [1 if int(torch.randint(0, 2, (1,), generator=g)) else int(torch.randint(1, 30, (1,), generator=g))
                for _ in range(b)]
        split = SplitKV(programs, min_keys)
        plan = step_plan(SeqLayout([[0]] * b, starts, lens), bm, bn, kvh, split, "cpu")
        split_blocks += plan.split_blocks
        tab = plan.table.tolist()
        seq, r0, lo, hi, part = (tab[i][:plan.items] for i in range(3, 8))
        blocks = {(i, r): [] for i, n in enumerate(lens) for r in range(0, n, bm)}
        assert len(seq) == plan.items and len(blocks) <= plan.items
        for i, r, a, z, p in zip(seq, r0, lo, hi, part):
            blocks[(i, r)].append((a, z, p))
        chunk = split_keys(torch.tensor([starts[i] + min(r + bm, lens[i]) for i, r in blocks]), kvh, bn, split)
        assert chunk % bn == 0 and (chunk >= min_keys if programs else chunk == 0)
        for (i, r), pieces in blocks.items():
            pieces.sort()
            full = (starts[i] + r) // bn * bn
            assert pieces[0][0] == 0 and pieces[-1][1] == starts[i] + min(r + bm, lens[i]), (i, r, pieces)
            assert all(z == a2 and z % chunk == 0 and z < full for (_, z, _), (a2, _, _) in zip(pieces, pieces[1:]))
            assert (len(pieces) == 1) == (pieces[0][2] == -1)
            if len(pieces) > 1:
                rows = min(bm, lens[i] - r)
                assert [p for _, _, p in pieces] == [pieces[0][2] + k * rows for k in range(len(pieces))]
        assert sorted(p for p in part if p >= 0) == sorted(set(p for p in part if p >= 0))
        sizes = [z - a for a, z in zip(lo, hi)]
        if plan.split_blocks:
            assert sizes == sorted(sizes, reverse=True)
        else:
            assert list(zip(seq, r0)) == list(blocks)
    assert (split_blocks > 0) == (programs > 0)


def test_prompt_attention_path_keeps_sdpa_only_for_a_lone_long_prompt():
    from qwen_vl_distributed.kernels import attention
    from qwen_vl_distributed.kernels.choices import DEFAULT

    n = DEFAULT.prompt_sdpa_min_tokens
    assert attention.prompt_attention_path(SeqLayout([[0]], [0], [n])) == "sdpa"
    assert attention.prompt_attention_path(SeqLayout([[0]], [0], [n - 1])) == "triton"
    assert attention.prompt_attention_path(SeqLayout([[0]], [5], [n])) == "triton"  # a chunk after a prefix
    assert attention.prompt_attention_path(SeqLayout([[0], [1]], [0, 0], [n, 1])) == "triton"  # a mixed step
    sdpa = dataclasses.replace(DEFAULT, prompt_attention="sdpa")  # passed in, as the bench passes its choices
    assert attention.prompt_attention_path(SeqLayout([[0]], [0], [3]), sdpa) == "sdpa"


def test_segment_attention_matches_reference():
    q, k, v = (torch.randn(50, 2, 8) for _ in range(3))
    cu = [0, 16, 20, 50]
    assert rel(segment_attention(q, k, v, cu, 8**-0.5), reference_segment_attention(q, k, v, cu, 8**-0.5)) < 1e-5


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_vision_rotary_kernel_matches_reference(dtype):
    from qwen_vl_distributed.kernels.vision_rotary import rotate_qk
    from qwen_vl_distributed.model.rope import vision_rope_tables

    n, heads, d = 70, 3, 12  # d/2 = 6 is not a power of two; 70 tokens leave a partial token block
    qkv = torch.randn(n, 3 * heads * d).to(dtype)
    rope = vision_rope_tables(torch.arange(n) // 7, torch.arange(n) % 7, d, 10000.0)
    q, k = rotate_qk(qkv, rope, heads)
    ref_q, ref_k, _ = qkv.view(n, 3, heads, d).unbind(1)
    assert q.shape == (n, heads, d) and q.is_contiguous() and q.dtype == dtype
    assert rel(q, vision_rotary(ref_q, rope)) < 1e-6 and rel(k, vision_rotary(ref_k, rope)) < 1e-6


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_layer_norm_kernel_matches_torch(dtype):
    from qwen_vl_distributed.kernels.vision_block import layer_norm

    norm = torch.nn.LayerNorm(40, eps=1e-6).to(dtype)  # 40: a partial column block; 7 rows: a partial row block
    torch.nn.init.normal_(norm.weight)
    torch.nn.init.normal_(norm.bias)
    x, r = torch.randn(7, 40).to(dtype), torch.randn(7, 40).to(dtype)
    with torch.no_grad():
        s, y = layer_norm(x, norm)
        assert s is x and rel(y, norm(x)) < (1e-6 if dtype == torch.float32 else 1e-3)
        s, y = layer_norm(x, norm, residual=r)
        assert torch.equal(s, x + r) and rel(y, norm(x + r)) < (1e-6 if dtype == torch.float32 else 1e-3)


@needs_triton
def test_fused_vision_blocks_match_the_modules():
    """The whole (tiny) vision tower through kernels.vision_block's fused blocks (Triton LayerNorms, the fast
    attention core) equals the modules' blocks, fp32: two images, so two attention segments."""
    from qwen_vl_distributed.checkpoint.synth_weights import randomize_module
    from qwen_vl_distributed.kernels.vision_block import fused_block_forward
    from qwen_vl_distributed.model.vision import VisionTower

    register()
    cfg = preset("tiny").vision
    with torch.device("meta"):
        tower = VisionTower(cfg)
    randomize_module(tower, 0, torch.device("cpu"), torch.float32)
    for m in tower.modules():
        if isinstance(m, VisionAttention):
            m.impl = "fast"
    grid = [(1, 4, 4), (1, 6, 10)]
    px = torch.randn(16 + 60, cfg.patch_dim)
    with torch.no_grad():
        ref, ref_taps = tower.run_layers(px, grid)
        out, taps = tower.run_layers(px, grid, fused_block_forward)
    assert rel(out, ref) < 1e-5 and all(rel(a, b) < 1e-5 for a, b in zip(taps, ref_taps))


# -- a whole (tiny) model -----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny():
    cfg = preset("tiny")
    torch.manual_seed(0)
    model = Qwen3VLMoe(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.randn(p.shape) * (0.5 if name.endswith("mlp.gate.weight") else 0.1)
                    + (1.0 if "norm" in name else 0.0))
    return cfg, model


# the block tables of the tiny-model tests: blocks of 4 tokens, up to 16 tokens per sequence, in a pool of 16
TABLES = shuffled_tables([16, 16, 16], 4, seed=1)


def prefill(model, cache, prompts: dict[int, list[int]]):
    """Run the prompts (sequence i of TABLES -> ids) in one packed step; returns the step's logits."""
    ids = [t for p in prompts.values() for t in p]
    pos = torch.cat([torch.arange(len(p)) for p in prompts.values()]).expand(3, -1)
    layout = SeqLayout([TABLES[i] for i in prompts], starts=[0] * len(prompts), lens=[len(p) for p in prompts.values()])
    with torch.no_grad():
        return model(positions=pos, layout=layout, cache=cache, input_ids=torch.tensor(ids))


def test_fast_paths_equal_reference_on_tiny_model(tiny):
    cfg, model = tiny
    prompts = {0: [5, 6, 7, 8, 9], 2: [100, 200, 300]}
    ref = prefill(model, model.new_cache(16, 4), prompts)
    fast_model = enable_fast_paths(copy.deepcopy(model))
    out = prefill(fast_model, fast_model.new_cache(16, 4), prompts)
    assert rel(out, ref) < 1e-5


@needs_triton
def test_triton_experts_impl_in_tiny_model_decode(tiny):
    cfg, model = tiny
    register()
    m = copy.deepcopy(model)
    cache = m.new_cache(16, 4)
    prefill(m, cache, {0: [1, 2, 3], 1: [4, 5]})
    layout = SeqLayout(TABLES[:2], starts=[3, 2], lens=[1, 1])
    pos = torch.tensor([3, 2]).expand(3, -1)
    outs = {}
    for impl in ("reference", "triton"):
        m.set_impl(experts=impl)
        with torch.no_grad():
            outs[impl] = m(positions=pos, layout=layout, cache=copy.deepcopy(cache), input_ids=torch.tensor([7, 8]))
    assert rel(outs["triton"], outs["reference"]) < 1e-5


def test_decode_graph_step_equals_forward_and_pads_into_scratch(tiny):
    cfg, model = tiny
    m = enable_fast_paths(copy.deepcopy(model))
    cache = m.new_cache(16, 4, 16)  # block 16 is the scratch block
    prefill(m, cache, {0: [1, 2, 3, 4], 1: [9, 8], 2: [7, 7, 7]})
    layout = SeqLayout([TABLES[i] for i in (2, 0, 1)], starts=[3, 4, 2], lens=[1, 1, 1])  # 4: a new block
    pos = torch.tensor([3, 4, 2]).expand(3, -1)
    ids = torch.tensor([11, 12, 13])
    ref_cache = copy.deepcopy(cache)
    with torch.no_grad():
        ref = m(positions=pos, layout=layout, cache=ref_cache, input_ids=ids)
    graphs = DecodeGraphs(m, cache, buckets=(1, 4))
    out = graphs.run(positions=pos, layout=layout, input_ids=ids)  # bucket 4: one padding row
    assert out.shape == ref.shape and rel(out, ref) < 1e-6
    for i in m.layer_ids:  # the real blocks got what forward wrote (up to matmul row-count rounding); padding
        assert rel(cache.k[i][:16], ref_cache.k[i][:16]) < 1e-6  # went to the scratch block only
        assert rel(cache.v[i][:16], ref_cache.v[i][:16]) < 1e-6
        assert cache.k[i][16].abs().sum() > 0 and ref_cache.k[i][16].abs().sum() == 0


def test_graphed_stage_middle_stage_hidden_in_hidden_out(tiny):
    cfg, model = tiny
    mid = Qwen3VLMoe(cfg, layers=(1, 3), vision=False, embed=False, head=False).eval()
    mid.load_state_dict({k: v for k, v in model.state_dict().items() if k in mid.state_dict()}, strict=True)
    enable_fast_paths(mid)
    cache = mid.new_cache(6, 4, 8)
    stage = GraphedStage(mid, cache, buckets=(2,))
    layout = SeqLayout([[3, 1]], starts=[0], lens=[1])
    hidden = torch.randn(1, cfg.text.hidden_size)
    pos = torch.zeros(3, 1, dtype=torch.long)
    ref_cache = copy.deepcopy(cache)
    with torch.no_grad():
        ref = mid(positions=pos, layout=layout, cache=ref_cache, hidden=hidden)
    out = stage(positions=pos, layout=layout, cache=cache, hidden=hidden)
    assert stage.has_head is False and rel(out, ref) < 1e-6
    with pytest.raises(ValueError):
        stage.graphs.bucket(3)


def test_prompt_sizes_reach_every_power_of_two_bucket():
    assert prompt_sizes(8192) == [2, 3] + [2**i for i in range(2, 14)]
    assert prompt_sizes(100) == [2, 3, 4, 8, 16, 32, 64, 100]
    assert prompt_sizes(2) == [2] and prompt_sizes(1) == []


class _Recorder:
    """A stage stand-in that records each call's layout and runs the real stage."""

    def __init__(self, model):
        self.model, self.layouts = model, []

    def __call__(self, **kw):
        self.layouts.append(kw["layout"])
        return self.model(**kw)


@pytest.mark.parametrize("where", ["first", "middle"])
def test_warm_up_runs_each_prompt_size_in_the_scratch_block_only(tiny, where):
    cfg, model = tiny
    if where == "first":
        m = enable_fast_paths(copy.deepcopy(model))
    else:
        m = Qwen3VLMoe(cfg, layers=(1, 3), vision=False, embed=False, head=False).eval()
        m.load_state_dict({k: v for k, v in model.state_dict().items() if k in m.state_dict()}, strict=True)
    cache = m.new_cache(6, 4, 12)  # sequences of up to 12 tokens; block 6 is the scratch block
    for i in m.layer_ids:  # blocks 0-5 hold sequences
        cache.k[i][:6].normal_()
        cache.v[i][:6].normal_()
    before = copy.deepcopy(cache)
    rec = _Recorder(m)
    sizes = warm_prompt_path(rec, cache, max_tokens=30)  # steps over 12 tokens: several prompts
    assert sizes == [2, 3, 4, 8, 16, 30]
    assert [lay.lens for lay in rec.layouts] == [[2], [3], [4], [8], [12, 4], [12, 12, 6]]
    assert all({b for t in lay.block_tables for b in t} == {6} and set(lay.starts) == {0} for lay in rec.layouts)
    assert all(len(t) * 4 >= n for lay in rec.layouts for t, n in zip(lay.block_tables, lay.lens))
    for i in m.layer_ids:
        assert torch.equal(cache.k[i][:6], before.k[i][:6]) and torch.equal(cache.v[i][:6], before.v[i][:6])
        assert cache.k[i][6].abs().sum() > 0
    assert warm_prompt_path(m, cache, max_tokens=5) == [2, 3, 4, 5]  # the bare stage model too
    assert warm_stage(m, cache, max_tokens=1) >= 0  # a 1-token budget: nothing to warm, no error


# -- the fused decode layer -----------------------------------------------------------------------------------------


def _decode_case(model, dtype, max_len: int = 16):
    """A model cast to dtype, a random cache and one decode step of 3 sequences (one at position 0)."""
    from qwen_vl_distributed.model.rope import text_rope_tables

    m = enable_fast_paths(copy.deepcopy(model).to(dtype))
    tables = shuffled_tables([max_len] * 3, 4, seed=2)
    cache = m.new_cache(pool_blocks(tables), 4, max_len)
    for i in m.layer_ids:
        cache.k[i].normal_()
        cache.v[i].normal_()
    layout = SeqLayout([tables[i] for i in (2, 0, 1)], starts=[3, 7, 0], lens=[1, 1, 1])
    pos = torch.tensor([3, 7, 0]).expand(3, -1)
    t = m.cfg.text
    rope = text_rope_tables(pos, t.head_dim, t.rope_theta, t.mrope_section, dtype)
    return m, cache, layout, pos, rope


@needs_triton
@pytest.mark.parametrize("rows", [3, 1])
@pytest.mark.parametrize("norms", [0, GEMV_MAX_ROWS], ids=["norm-launches", "norms-fused"])
@pytest.mark.parametrize("dtype,fp8", [(torch.float32, False), (torch.float16, False), (torch.float32, True)])
def test_decode_layer_matches_module(tiny, dtype, fp8, norms, rows):
    """(bf16 is checked on the GPU: the interpreter truncates fp32 -> bf16 instead of rounding to nearest.) fp8: the
    layer's experts quantised in 16x16 blocks and kept fp8 (partial blocks: I = 24). ``norms``: the norms inside
    the next kernels up to that many rows (kernels.router; one row: the router lays out the experts' blocks), and
    the K-sum in the down kernel's launch (kernels.arrivals)."""
    from qwen_vl_distributed.kernels.decode_layer import decode_layer

    m, cache, layout, _, rope = _decode_case(tiny[1], dtype)
    if rows == 1:
        layout = SeqLayout(layout.block_tables[1:2], starts=layout.starts[1:2], lens=[1])
        rope = tuple(r[1:2] for r in rope)
    layer = m.model.language_model.layers["1"]
    if fp8:
        layer.mlp.experts.quantize_fp8((16, 16))
        assert layer.mlp.experts.gate_up_proj.dtype == torch.float8_e4m3fn
    h = torch.randn(rows, m.cfg.text.hidden_size).to(dtype)
    fused_cache = copy.deepcopy(cache)
    choices = dataclasses.replace(DEFAULT, norm_router_rows=norms, norm_qkv_rows=norms,
                                  sum_in_down_rows=norms)
    with torch.no_grad():
        with module_layers(m):
            ref = layer(h, rope, cache.layer(1), layout)
        out = decode_layer(layer, h, *rope, fused_cache.layer(1), layout.block_table("cpu"),
                           layout.tensor("starts", "cpu"), layout.row_tables("cpu", cache.block_size),
                           choices=choices)
    tol = 1e-5 if dtype == torch.float32 else 2e-3
    assert rel(out, ref) < tol
    assert rel(fused_cache.k[1], cache.k[1]) < tol and rel(fused_cache.v[1], cache.v[1]) < tol


@needs_triton
@pytest.mark.parametrize("rows", [3, 1])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_the_qkv_post_inside_the_attention_kernel_changes_no_bit(tiny, dtype, rows):
    """``qkv_post_in_attention``: the q/k norm + rotary in the split-KV kernel's loads, the new token's k standing in
    for its key, and its k/v written by the program whose range holds it: the layer's output and both caches equal
    the separate launch's bit for bit (3 sequences, one at position 0, paged in shuffled blocks of 4)."""
    from qwen_vl_distributed.kernels.decode_attention import post_fits
    from qwen_vl_distributed.kernels.decode_layer import decode_layer

    m, cache, layout, _, rope = _decode_case(tiny[1], dtype)
    if rows == 1:
        layout = SeqLayout(layout.block_tables[1:2], starts=layout.starts[1:2], lens=[1])
        rope = tuple(r[1:2] for r in rope)
    layer = m.model.language_model.layers["1"]
    assert post_fits(layer.self_attn.head_dim)
    h = torch.randn(rows, m.cfg.text.hidden_size).to(dtype)
    outs, caches = [], []
    for post in (False, True):
        c = copy.deepcopy(cache)
        with torch.no_grad():
            outs.append(decode_layer(layer, h, *rope, c.layer(1), layout.block_table("cpu"),
                                     layout.tensor("starts", "cpu"), layout.row_tables("cpu", cache.block_size),
                                     choices=dataclasses.replace(DEFAULT, qkv_post_in_attention=post)))
        caches.append(c)
    assert torch.equal(outs[0], outs[1])
    assert torch.equal(caches[0].k[1], caches[1].k[1]) and torch.equal(caches[0].v[1], caches[1].v[1])
    assert not torch.equal(caches[1].k[1], cache.k[1])  # the new tokens' k were written


def test_the_qkv_post_fits_heads_whose_half_is_a_power_of_two():
    from qwen_vl_distributed.kernels.decode_attention import post_fits

    assert [d for d in range(2, 300, 2) if post_fits(d)] == [16, 32, 64, 128, 256]


@needs_triton
def test_route_kernel_matches_reference():
    from qwen_vl_distributed.kernels.decode_layer import route as fused_route
    from qwen_vl_distributed.model.moe import route

    logits = torch.randn(5, 128)
    for normalize in (True, False):
        w, ids = fused_route(logits, 8, normalize)
        w_ref, ids_ref = route(logits, 8, normalize)
        assert torch.equal(ids.long(), ids_ref) and rel(w, w_ref) < 1e-6


@needs_triton
@pytest.mark.parametrize("norms", [0, 4], ids=["norm-launches", "norms-fused"])
def test_fused_decode_graph_step_equals_forward(tiny, norms):
    m, cache, layout, pos, _ = _decode_case(tiny[1], torch.float32)
    ids = torch.tensor([11, 12, 13])
    ref_cache = copy.deepcopy(cache)
    with torch.no_grad(), module_layers(m):
        ref = m(positions=pos, layout=layout, cache=ref_cache, input_ids=ids)
    graphs = DecodeGraphs(m, cache, buckets=(4,), fused=True,
                          choices=dataclasses.replace(DEFAULT, norm_router_rows=norms, norm_qkv_rows=norms,
                                  sum_in_down_rows=norms))
    out = graphs.run(positions=pos, layout=layout, input_ids=ids)
    assert rel(out, ref) < 1e-5


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("b", [1, 5])
def test_gemv_with_the_norm_inside_equals_norm_then_gemv(dtype, b):
    from qwen_vl_distributed.kernels.decode_layer import rmsnorm
    from qwen_vl_distributed.kernels.gemv import linear_small

    torch.manual_seed(b)
    x = (torch.randn(b, 200) * 3).to(dtype)  # K = 200: the last tile partial, the squares summed over 4 tiles
    nw = (torch.randn(200) * 0.1 + 1).to(dtype)
    weights = [torch.randn(n, 200).to(dtype) for n in (80, 16, 40)]
    normed = rmsnorm(x, nw, 1e-6)
    outs = linear_small(x, *weights, bn=16, bk=64, norm=(nw, 1e-6))
    for out, w in zip(outs, weights):
        assert rel(out, linear_small(normed, w, bn=16, bk=64)[0]) < (1e-6 if dtype == torch.float32 else 2e-3)
    x[0, 0] = 1e3  # the norm is of each row on its own: a change in row 0 leaves the other rows' outputs alone
    again = linear_small(x, *weights, bn=16, bk=64, norm=(nw, 1e-6))
    assert not torch.equal(again[0][0], outs[0][0]) and torch.equal(again[0][1:], outs[0][1:])


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("b", [1, 3])
@pytest.mark.parametrize("normalize", [True, False])
def test_norm_route_equals_the_norm_the_router_and_route(dtype, b, normalize):
    """kernels.router against the separate launches: h and x as the residual RMSNorm gives them, the top-k of the
    rounded logits; hidden 100 over slices of 32 (a partial last slice), 20 experts (not a power of two)."""
    from qwen_vl_distributed.kernels.decode_layer import rmsnorm, route as fused_route
    from qwen_vl_distributed.kernels.moe_triton import align, expert_pairs
    from qwen_vl_distributed.kernels.router import norm_route
    from qwen_vl_distributed.model.moe import route

    torch.manual_seed(b)
    o, res = (torch.randn(b, 100).to(dtype) for _ in range(2))
    nw = (torch.randn(100) * 0.1 + 1).to(dtype)
    router = torch.randn(20, 100).to(dtype)
    h, x, w, ids, aligned = norm_route(o, res, nw, 1e-6, router, 4, normalize, align_bm=16, slice_width=32)
    h_ref, x_ref = rmsnorm(o, nw, 1e-6, residual=res)
    assert torch.equal(h, h_ref) and rel(x, x_ref) < (1e-6 if dtype == torch.float32 else 1e-3)
    logits = x.float() @ router.float().T
    w_ref, ids_ref = route(logits.to(dtype), 4, normalize)
    assert torch.equal(ids.long(), ids_ref) and rel(w, w_ref) < (1e-6 if dtype == torch.float32 else 1e-3)
    w_k, ids_k = fused_route(logits.to(dtype), 4, normalize)
    assert torch.equal(ids, ids_k)
    if b > 1:
        assert aligned is None
        return
    rows, block_expert = aligned  # one token: pair j alone in block j, on its expert
    assert block_expert.tolist() == ids[0].tolist()
    assert rows.view(4, 16)[:, 0].tolist() == [0, 1, 2, 3] and (rows.view(4, 16)[:, 1:] == 4).all()
    gate_up, down = torch.randn(20, 48, 100).to(dtype) * 0.1, torch.randn(20, 100, 24).to(dtype) * 0.1
    cfg = DEFAULT.moe_config(4)
    assert cfg.bm == 16
    want = expert_pairs(x, ids, w, gate_up, down, None, cfg)
    assert torch.equal(expert_pairs(x, ids, w, gate_up, down, None, cfg, aligned=aligned), want)
    assert align(ids, 20, 16)[1].numel() > block_expert.numel()  # the sorted layout's bound has spare blocks


@needs_triton
@pytest.mark.parametrize("k", [200, 512, 40])
def test_split_k_gemv_covers_each_reduction_range_once(k):
    """kernels.gemv's ``split``: a row block's K cut into ranges of whole tiles, one program each, the last to
    arrive adding the partials. On small integers every partial sum is exact, so any range read twice or skipped
    gives another integer; K = 200 (a partial last tile), 512 (8 tiles, 3 splits of 3 + 3 + 2) and 40 (one tile:
    no split). With the weights' first tiles before the wait, the norm inside, and 1 or 5 rows; the counters are
    back to 0 after each launch. (The interpreter runs the programs one after another, so which program sums is
    not tested here: tests/gpu/test_kernels_gpu.py runs the split under a CUDA graph at the released shapes.)"""
    from qwen_vl_distributed.kernels.arrivals import counters
    from qwen_vl_distributed.kernels.gemv import linear_small

    gen = torch.Generator().manual_seed(k)
    ints = lambda *shape: torch.randint(-3, 4, shape, generator=gen).float()  # noqa: E731
    weights = [ints(n, k) for n in (80, 16, 40)]
    for b in (1, 5):
        x = ints(b, k)
        want = [x.double() @ w.double().T for w in weights]
        unsplit = linear_small(x, *weights, bn=16, bk=64)
        for split in (2, 3, 8):
            for pre in (0, 1, 2):
                got = linear_small(x, *weights, bn=16, bk=64, split=split, pre_wait=pre)
                assert all(torch.equal(g.double(), w_) for g, w_ in zip(got, want)), (b, split, pre)
                assert all(torch.equal(g, u) for g, u in zip(got, unsplit)), (b, split, pre)
                assert not counters(x.device, 1).any()
        nw = torch.full((k,), 0.5)
        normed = linear_small(x, *weights, bn=16, bk=64, norm=(nw, 1e-6))
        for split in (2, 3):
            got = linear_small(x, *weights, bn=16, bk=64, norm=(nw, 1e-6), split=split)
            assert all(rel(g, n_) < 1e-6 for g, n_ in zip(got, normed)), split
    with pytest.raises(ValueError, match="split 0"):
        linear_small(x, *weights, split=0)


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("k", [200, 64, 40])
def test_weights_loaded_before_the_wait_give_the_same_bits(dtype, k):
    """kernels.gemv's ``pre_wait`` tiles and kernels.router's ``early`` slice: the same products in the same order,
    so the same bits as without; K = 200 (a partial last tile), 64 (one tile: the second early tile does not
    exist) and 40 (less than a tile)."""
    from qwen_vl_distributed.kernels.gemv import linear_small
    from qwen_vl_distributed.kernels.router import norm_route

    torch.manual_seed(k)
    x = torch.randn(3, k).to(dtype)
    nw = (torch.randn(k) * 0.1 + 1).to(dtype)
    weights = [torch.randn(n, k).to(dtype) for n in (80, 16, 40)]
    for norm in (None, (nw, 1e-6)):
        want = linear_small(x, *weights, bn=16, bk=64, norm=norm)
        for pre in (1, 2):
            got = linear_small(x, *weights, bn=16, bk=64, norm=norm, pre_wait=pre)
            assert all(torch.equal(a, b) for a, b in zip(got, want)), (pre, norm is not None)
    with pytest.raises(ValueError, match="pre_wait 3"):
        linear_small(x, *weights, pre_wait=3)
    router = torch.randn(20, k).to(dtype)
    want = norm_route(x, x * 0.5, nw, 1e-6, router, 4, True, slice_width=32)
    got = norm_route(x, x * 0.5, nw, 1e-6, router, 4, True, slice_width=32, early=True)
    assert all(torch.equal(a, b) for a, b in zip(got[:4], want[:4]))


def test_the_decode_variants_are_reported_per_batch():
    from qwen_vl_distributed.bench.report import render

    r = {"default_ms_layer": 0.15, "other_ms_layer": 0.147, "other_over_default": 0.98, "equal": True, "rel": 0.0}
    text = render({"decode_variants": {"default": "pdl 1, 0 tiles, packed top-k off",
                                       "pdl 2, 2 tiles before the wait": {1: r}}})
    assert ("B=1: pdl 2, 2 tiles before the wait 0.1470 ms/L against this run's (pdl 1, 0 tiles, packed top-k off) "
            "0.1500 ms/L: 0.9800, outputs identical") in text
    assert "decode variants: no PDL: skipped" in render({"decode_variants": {"skipped": "no PDL", "default": "x"}})


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("normalize", [True, False])
def test_the_packed_top_k_picks_what_the_two_reductions_pick(dtype, normalize):
    """kernels.router.topk_softmax with PACKED: the same ids and weights, bit for bit, as a max then a min per
    pick -- on ties (equal logits: the lower index first), on weights that underflow to 0 (logits 100 below the
    max: real experts tie with the padding columns past E and must still win), and on E = 20 (not a power of
    two) -- in the unfused route kernel and the fused router."""
    from qwen_vl_distributed.kernels.decode_layer import route
    from qwen_vl_distributed.kernels.router import norm_route

    torch.manual_seed(0)
    logits = torch.randn(6, 20) * 3
    logits[1, [3, 7, 11]] = 5.0  # a three-way tie at the top
    logits[2] = 0.5  # all equal
    logits[3, :] = -200.0
    logits[3, [2, 9]] = 10.0  # two real weights, the rest exp() == 0
    logits = logits.to(dtype)
    for k in (4, 8):
        w, ids = route(logits, k, normalize)
        for packed, warps in ((True, 4), (False, 1), (True, 1)):
            w_p, ids_p = route(logits, k, normalize, packed=packed, warps=warps)
            assert torch.equal(ids_p, ids) and torch.equal(w_p, w), (k, packed, warps)
    assert ids[1, :3].tolist() == [3, 7, 11] and ids[2].tolist() == list(range(8))
    assert ids[3, :2].tolist() == [2, 9] and ids[3, 2:].tolist() == [0, 1, 3, 4, 5, 6]
    o, res = torch.randn(3, 100).to(dtype), torch.randn(3, 100).to(dtype)
    nw, router = (torch.randn(100) * 0.1 + 1).to(dtype), torch.randn(20, 100).to(dtype)
    want = norm_route(o, res, nw, 1e-6, router, 4, normalize, slice_width=32)
    got = norm_route(o, res, nw, 1e-6, router, 4, normalize, slice_width=32, packed=True)
    assert all(torch.equal(a, b) for a, b in zip(got[:4], want[:4]))


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("b", [1, 3])
def test_the_router_in_one_launch_routes_as_in_two(dtype, b):
    """norm_route(one_launch=True): the GEMV's last program to finish sums the partials and routes (kernels.arrivals):
    h, x, the weights, the ids and (one token) the experts' block layout equal the two launches' bit for bit; the
    counter is back at 0."""
    from qwen_vl_distributed.kernels.arrivals import counters
    from qwen_vl_distributed.kernels.router import norm_route

    torch.manual_seed(b)
    o, res = torch.randn(b, 100).to(dtype), torch.randn(b, 100).to(dtype)
    nw, router = (torch.randn(100) * 0.1 + 1).to(dtype), torch.randn(20, 100).to(dtype)
    for packed in (False, True):
        want = norm_route(o, res, nw, 1e-6, router, 4, True, align_bm=16, slice_width=32)
        got = norm_route(o, res, nw, 1e-6, router, 4, True, align_bm=16, slice_width=32, packed=packed,
                         one_launch=True)
        assert all(torch.equal(a, c) for a, c in zip(got[:4], want[:4]))
        assert (got[4] is None) == (want[4] is None) == (b > 1)
        if b == 1:
            assert all(torch.equal(a, c) for a, c in zip(got[4], want[4]))
    assert not counters(o.device, 1).any()


def test_pre_wait_is_zero_one_or_two_tiles_and_pdl_a_mode():
    from qwen_vl_distributed.kernels.pdl import launch_options

    with pytest.raises(ValueError, match="pre_wait 4"):
        dataclasses.replace(DEFAULT, pre_wait=4)
    with pytest.raises(ValueError, match="pdl 3"):
        dataclasses.replace(DEFAULT, pdl=3)
    with pytest.raises(ValueError, match="route_warps 3"):
        dataclasses.replace(DEFAULT, route_warps=3)
    with pytest.raises(ValueError, match="gemv_stages 9"):
        dataclasses.replace(DEFAULT, gemv_stages=9)
    with pytest.raises(ValueError, match="gemv_split 0"):
        dataclasses.replace(DEFAULT, gemv_split=0)
    with pytest.raises(ValueError, match="gemv_warps 3"):
        dataclasses.replace(DEFAULT, gemv_warps=3)
    assert launch_options(False) == {"PDL": 0} and launch_options(True) == {"PDL": 1, "launch_pdl": True}
    assert launch_options(2) == {"PDL": 2, "launch_pdl": True}


@needs_triton
def test_the_gemv_pipeline_depth_and_split_reach_the_kernel_launch(monkeypatch):
    """``KernelChoices.gemv_stages``, ``gemv_split`` and ``gemv_warps`` are what project() hands the GEMV (the interpreter ignores
    the depth, so the wiring is what can be checked here; bench decode times them on a GPU)."""
    from qwen_vl_distributed.kernels import decode_layer

    seen = []
    real = decode_layer.linear_small
    monkeypatch.setattr(decode_layer, "linear_small",
                        lambda *a, **kw: seen.append((kw["stages"], kw["split"], kw["warps"])) or real(*a, **kw))
    x, w = torch.randn(2, 64), torch.randn(48, 64)
    for stages, split, warps in ((4, 1, 4), (8, 2, 8)):
        (y,) = decode_layer.project("o", x, w, choices=dataclasses.replace(
            DEFAULT, gemv={"o": (16, 32)}, gemv_stages=stages, gemv_split=split, gemv_warps=warps))
        assert rel(y, x.double() @ w.double().T) < 1e-6
    assert seen == [(4, 1, 4), (8, 2, 8)]


def test_the_norm_fusion_ab_is_reported_per_batch():
    from qwen_vl_distributed.bench.report import render

    ab = {"default": 0,
          1: {"plain_ms_layer": 0.2, "fused_ms_layer": 0.19, "fused_over_plain": 0.95, "fused_here": True,
              "equal": False, "rel": 1.5e-3},
          32: {"plain_ms_layer": 0.5, "fused_ms_layer": 0.5, "fused_over_plain": 1.0, "fused_here": False,
               "equal": True, "rel": 0.0}}
    text = render({"decode_norm_fusion": {"norm_router_rows": ab, "norm_qkv_rows": ab}})
    assert ("B=1: residual + norm + router in two launches 0.1900 ms/L, as launches 0.2000 ms/L: fused / launches "
            "0.9500, outputs rel 1.50e-03") in text
    assert "B=32: the norm in the q/k/v GEMV 0.5000 ms/L, as launches 0.5000 ms/L: fused / launches 1.0000 (not " \
           "fused at this batch), outputs identical" in text


@pytest.mark.parametrize("name", ["norm_router_rows", "norm_qkv_rows", "sum_in_down_rows"])
def test_norm_fusion_rows_are_a_decode_batch(name):
    with pytest.raises(ValueError, match=name):
        dataclasses.replace(DEFAULT, **{name: GEMV_MAX_ROWS + 1})


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("b", [1, 5])
def test_one_launch_gemv_matches_linear(dtype, b):
    from qwen_vl_distributed.kernels.gemv import linear_small

    x = torch.randn(b, 96).to(dtype)
    weights = [torch.randn(n, 96).to(dtype) for n in (80, 16, 40)]  # uneven row counts, K not a tile multiple
    for ws in (weights, weights[:1]):
        outs = linear_small(x, *ws, bn=16, bk=64)
        for out, w in zip(outs, ws):
            ref = x.double() @ w.double().T
            assert out.shape == ref.shape and rel(out, ref) < (1e-6 if dtype == torch.float32 else 2e-3)


@needs_triton
def test_fused_forward_equals_model_forward_on_mixed_step(tiny):
    """A prompt, a continued chunk and a decode row in one step; logits of every row and the cache writes."""
    m, cache, layout, _, _ = _decode_case(tiny[1], torch.float32)
    layout = SeqLayout(layout.block_tables, starts=[0, 4, 9], lens=[5, 3, 1])
    pos = torch.cat([torch.arange(0, 5), torch.arange(4, 7), torch.tensor([9])]).expand(3, -1)
    _assert_fused_step_equals_model(m, cache, layout, pos, rows=list(range(9)))


def _assert_fused_step_equals_model(m, cache, layout, pos, rows, ids=None, visual=None):
    """The 'fused' layer impl against the modules' layers on one step: logits of ``rows`` and every layer's
    cache writes."""
    ids = torch.randint(0, 1000, (layout.num_tokens,)) if ids is None else ids
    ref_cache = copy.deepcopy(cache)
    m.set_impl(layer="fused")
    with torch.no_grad():
        with module_layers(m):
            ref = m(positions=pos, layout=layout, cache=ref_cache, input_ids=ids, visual=visual, logits_rows=rows)
        out = m(positions=pos, layout=layout, cache=cache, input_ids=ids, visual=visual, logits_rows=rows)
    assert rel(out, ref) < 1e-5
    for i in m.layer_ids:
        assert rel(cache.k[i], ref_cache.k[i]) < 1e-5 and rel(cache.v[i], ref_cache.v[i]) < 1e-5


@needs_triton
def test_fused_layers_on_a_prompt_with_an_image_and_a_video(tiny):
    """Steps with images and videos run the fused layers too: the features written over the placeholder rows and
    the DeepStack additions happen in the model's forward around them."""
    from mm_inputs import IMG, VID, chat, image_tokens, pixels, video_tokens
    from qwen_vl_distributed.model.positions import rope_positions, token_types
    from qwen_vl_distributed.model.qwen3_vl import VisualInputs

    cfg = tiny[0]
    m, cache, decode, _, _ = _decode_case(tiny[1], torch.float32, max_len=160)
    ids = chat([100] + image_tokens(8, 12) + [200] + video_tokens(2, 4, 6) + [300])
    types = token_types(ids, cfg.image_token_id, cfg.video_token_id)
    pos, _ = rope_positions(types, [(1, 8, 12)], [(2, 4, 6)], cfg.vision.spatial_merge_size)
    tt = torch.tensor(ids)
    visual = VisualInputs(pixels(96, cfg.vision.patch_dim, 1), [(1, 8, 12)], pixels(48, cfg.vision.patch_dim, 2),
                          [(2, 4, 6)], tt == IMG, tt == VID)
    layout = SeqLayout(decode.block_tables[:1], starts=[0], lens=[len(ids)])
    _assert_fused_step_equals_model(m, cache, layout, pos, list(range(len(ids))), tt, visual)


@needs_triton
@pytest.mark.parametrize("heads", [(1, 1), (2, 1), (8, 4)])
def test_fused_forward_prompt_rows_packed_qkv_and_heads_per_program(tiny, heads, monkeypatch):
    """Rows past the GEMV limit: one GEMM over the packed q/k/v weight, then the q/k norm + rotary kernel taking
    1, 2 or 8 heads per program (more than the tiny model has: masked heads) on its strided q/k/v views."""
    from qwen_vl_distributed.kernels import decode_layer
    from qwen_vl_distributed.kernels.packing import packed_qkv

    monkeypatch.setitem(decode_layer.QKV_POST_HEADS, 1 << 30, heads)
    monkeypatch.setitem(decode_layer.QKV_POST_HEADS, 64, heads)
    m, cache, decode, _, _ = _decode_case(tiny[1], torch.float32, max_len=96)
    attn = m.model.language_model.layers["1"].self_attn
    packed = packed_qkv(attn)
    assert packed is not None and torch.equal(packed[:attn.q_proj.out_features], attn.q_proj.weight)
    assert torch.equal(packed[-attn.v_proj.out_features:], attn.v_proj.weight)
    n = GEMV_MAX_ROWS + 6
    layout = SeqLayout(decode.block_tables[:2], starts=[0, 4], lens=[n, 3])
    pos = torch.cat([torch.arange(0, n), torch.arange(4, 7)]).expand(3, -1)
    _assert_fused_step_equals_model(m, cache, layout, pos, rows=[0, n - 1, n + 2])


def test_pack_qkv_keeps_values_and_state_dict_and_notices_reassignment(tiny):
    from qwen_vl_distributed.kernels.packing import pack_qkv, packed_qkv

    m = copy.deepcopy(tiny[1])
    before = {k: v.clone() for k, v in m.state_dict().items()}
    pack_qkv(m)
    after = m.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    attn = m.model.language_model.layers["0"].self_attn
    assert packed_qkv(attn) is not None
    attn.k_proj.weight = torch.nn.Parameter(attn.k_proj.weight.clone())  # e.g. load_state_dict(assign=True)
    assert packed_qkv(attn) is None


def test_packed_qkv_recognises_only_views_of_one_buffer():
    """Separate weights are not a packed q/k/v (on a GPU they can still sit back to back in one segment)."""
    from qwen_vl_distributed.kernels.packing import packed_qkv
    from qwen_vl_distributed.model.attention import TextAttention

    attn = TextAttention(preset("tiny").text)
    buf = torch.randn(attn.q_proj.out_features + 2 * attn.k_proj.out_features, attn.q_proj.in_features)
    parts = buf.split([attn.q_proj.out_features, attn.k_proj.out_features, attn.k_proj.out_features])
    for lin, part in zip((attn.q_proj, attn.k_proj, attn.v_proj), parts):
        lin.weight = torch.nn.Parameter(part.clone())  # own storages
    assert packed_qkv(attn) is None
    for lin, part in zip((attn.q_proj, attn.k_proj, attn.v_proj), parts):
        lin.weight = torch.nn.Parameter(part)  # views of one buffer
    assert torch.equal(packed_qkv(attn), buf)


def test_fit_stages_keeps_the_bf16_tiles_and_shrinks_float32_ones_into_shared_memory():
    """The tuned tiles keep their stages in bf16; float32 (twice the bytes) drops stages to fit: a 64-row GEMV
    (BM 64, BN 64, BK 128: 256 KB at 4 stages, which the H200 refused) and the prefill expert tiles."""
    from qwen_vl_distributed.bench import tune
    from qwen_vl_distributed.kernels import moe_triton as mt
    from qwen_vl_distributed.kernels.tiles import fit_stages

    for c in [*mt.CONFIGS.values(), *tune.CANDIDATES, *tune.PREFILL_CANDIDATES, *tune.FP8_PREFILL_CANDIDATES]:
        assert fit_stages(c.stages, (c.bm + 2 * c.bn) * c.bk * 2) == c.stages
        assert fit_stages(c.down_stages, (c.bm + c.down_bn) * c.down_bk * 2) == c.down_stages
    assert fit_stages(4, (64 + 64) * 128 * 4) == 3 and fit_stages(4, (64 + 64) * 128 * 2) == 4  # GEMV, 64 rows
    pre = mt.CONFIGS[1 << 30]  # prefill: gate/up 96 KB and down 96 KB per stage in float32
    assert fit_stages(pre.stages, (pre.bm + 2 * pre.bn) * pre.bk * 4) == 2
    assert fit_stages(pre.down_stages, (pre.bm + pre.down_bn) * pre.down_bk * 4) == 2
    assert fit_stages(3, 1 << 21) == 1  # a tile too big for any stage count still gets one


def test_unfused_decode_graph_step_runs_the_modules_even_when_the_layers_are_fused(tiny, monkeypatch):
    """DecodeGraphs(fused=False) means the modules' forward: it must not take the 'fused' layer impl, whose row
    tables are a host-to-device copy (never inside a graph capture)."""
    from qwen_vl_distributed.model import batch

    m, cache, layout, pos, _ = _decode_case(tiny[1], torch.float32)
    m.set_impl(layer="fused")
    ids = torch.tensor([11, 12, 13])
    ref_cache = copy.deepcopy(cache)
    with torch.no_grad(), module_layers(m):
        ref = m(positions=pos, layout=layout, cache=ref_cache, input_ids=ids)
    monkeypatch.setattr(batch, "to_device", lambda *a: pytest.fail("row tables built in a graph step"))
    out = DecodeGraphs(m, cache, buckets=(4,), fused=False).run(positions=pos, layout=layout, input_ids=ids)
    assert rel(out, ref) < 1e-6
    assert {layer.impl for layer in m.model.language_model.layers.values()} == {"fused"}


def test_fused_layers_are_the_default_only_with_fast_experts_and_attention(tiny, monkeypatch):
    import qwen_vl_distributed.kernels as kernels

    monkeypatch.setattr(kernels, "fused_layers_fit", lambda model: True)  # as on a GPU
    m = copy.deepcopy(tiny[1])
    impls = lambda: {layer.impl for layer in m.model.language_model.layers.values()}  # noqa: E731
    kernels.enable_fast_paths(m, vision_graphs=False)
    assert impls() == {"fused"}
    kernels.enable_fast_paths(m, experts="reference", vision_graphs=False)  # the fused layer has its own experts
    assert impls() == {"reference"}


def test_decode_graph_safe_rule_names_what_a_graph_can_hold(tiny):
    """The rule DecodeGraphs captures by: 'fast' attention and 'fast' / 'triton' experts on weights the expert
    kernels take; the reference attention or experts, grouped GEMM, or fp8 blocks the kernels cannot tile are not."""
    from qwen_vl_distributed.kernels import decode_graph_safe

    m = enable_fast_paths(copy.deepcopy(tiny[1]), vision_graphs=False)
    assert decode_graph_safe(m)
    for impls, safe in [({"experts": "triton"}, True), ({"experts": "reference"}, False),
                        ({"experts": "grouped"}, False), ({"attention": "reference"}, False)]:
        m.set_impl(**{"experts": "fast", "attention": "fast", **impls})
        assert decode_graph_safe(m) is safe, impls
        assert DecodeGraphs(m, m.new_cache(2, 8), buckets=(1,), fused=False).capturable is safe, impls
    m.set_impl(experts="fast", attention="fast")
    m.model.language_model.layers["2"].mlp.experts.quantize_fp8((24, 24))  # 24-wide blocks: not tileable
    assert not decode_graph_safe(m)
    assert DecodeGraphs(m, m.new_cache(2, 8), buckets=(1,), fused=True).capturable  # the fused layers: as chosen


@pytest.mark.parametrize("attention", ["reference", "fast"])
def test_a_captured_decode_step_refuses_attention_that_reads_the_layout_on_the_host(tiny, attention):
    """What broke decode on a GPU for head dims the split-KV kernel did not take: the step fell back to attention
    that slices the cache by the layout's python lists, and a graph replayed the capture-time block table and length for
    every later token. The captured step's layout refuses such reads (on the CPU, 'fast' attention has no decode
    kernel and takes that fallback too), so a capture fails with a named error instead."""
    m = enable_fast_paths(copy.deepcopy(tiny[1]), attention=attention, vision_graphs=False)
    graphs = DecodeGraphs(m, m.new_cache(3, 8), buckets=(2,), fused=False)
    with torch.no_grad(), pytest.raises(RuntimeError, match="CUDA-graph capture of a decode step.*host lists"):
        graphs.step(2, captured=True)
    with torch.no_grad():
        assert graphs.step(2).shape == (2, tiny[0].text.vocab_size)  # the eager step reads them, as it may


def test_graphed_vision_builds_with_the_fused_blocks(tiny):
    """The fused-block tower runner imports its kernels module (CPU pixels run the blocks' own forward)."""
    from qwen_vl_distributed.runtime.vision_graph import GraphedVision

    tower = tiny[1].model.visual
    runner = GraphedVision(tower, fused_blocks=True)
    assert runner.block_fn is not None
    px = torch.randn(16, tiny[0].vision.patch_dim)
    with torch.no_grad():
        out, taps = runner(px, [(1, 4, 4)])
        ref, ref_taps = tower.run_layers(px, [(1, 4, 4)])
    assert torch.equal(out, ref) and all(torch.equal(a, b) for a, b in zip(taps, ref_taps))
