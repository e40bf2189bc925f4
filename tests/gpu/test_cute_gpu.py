"""The optional CuTe-DSL kernels (kernels/cute.py) against the references on a Hopper GPU, where their packages are
installed (the ``hopper`` extra; skipped otherwise, with the reason): FlashAttention 4 on the vision tower's
attention (16 heads of 72, one segment and several, the per-segment calls a CUDA graph holds, and the whole tower
captured), and quack's grouped GEMMs on the experts at the 235B shapes and at odd ones (idle experts, pairs of
experts held elsewhere, one token). Each is held to float32 products within what bf16 itself differs by: the
SDPA / Triton path's own error on the same inputs, with a little slack."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from qwen_vl_distributed.kernels import register
from qwen_vl_distributed.kernels.choices import DEFAULT, KernelChoices
from qwen_vl_distributed.model.moe import reference_experts

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]
BF16 = torch.bfloat16


def rel(a, b) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def needs(what: str):
    from qwen_vl_distributed.kernels.cute import unavailable

    why = unavailable(what, "cuda")
    if why is not None:
        pytest.skip(why)


def fp32_segments(q, k, v, cu, scale):
    out = torch.empty(q.shape, dtype=torch.float32, device=q.device)
    for a, b in zip(cu[:-1], cu[1:]):
        if b > a:
            o = F.scaled_dot_product_attention(*(t[a:b].float().transpose(0, 1) for t in (q, k, v)), scale=scale)
            out[a:b] = o.transpose(0, 1)
    return out


@pytest.mark.parametrize("cu", [[0, 4096], [0, 1000, 4096], [0, 1, 17, 300, 1321], [0, 64, 64, 200]])
@pytest.mark.parametrize("per_segment", [False, True])
def test_fa4_vision_attention_matches_float32(cu, per_segment):
    needs("fa4")
    from qwen_vl_distributed.kernels.cute import fa4_segment_attention
    from qwen_vl_distributed.kernels.vision_attention import per_segment_attention

    g = torch.Generator(device="cuda").manual_seed(len(cu))
    n, heads, d = cu[-1], 16, 72
    qkv = torch.randn(n, 3 * heads * d, device="cuda", dtype=BF16, generator=g)
    q, k, v = qkv.view(n, 3, heads, d).unbind(1)  # strided views, as the tower passes v
    scale = d**-0.5
    exact = fp32_segments(q, k, v, cu, scale)
    got = fa4_segment_attention(q, k, v, cu, scale, per_segment=per_segment)
    assert got.shape == q.shape and got.dtype == BF16
    sdpa_err = rel(per_segment_attention(q, k, v, cu, scale), exact)
    assert rel(got, exact) < max(2 * sdpa_err, 4e-3), (rel(got, exact), sdpa_err)


@torch.inference_mode()
def test_fa4_in_the_vision_tower_graph_equals_its_eager_sights():
    """With "FA4" first the tower's eager sight, the capturing call and the replay give the same bits, and the
    tower stays within bf16 rounding of the SDPA tower."""
    needs("fa4")
    from qwen_vl_distributed.bench.models import random_vision_tower
    from qwen_vl_distributed.model.config import preset
    from qwen_vl_distributed.model.vision import segment_bounds
    from qwen_vl_distributed.runtime.vision_graph import GraphedVision

    tower = random_vision_tower(preset("235b-a22b"), "cuda")
    grids = [(1, 32, 48), (1, 16, 16)]
    px = torch.randn(segment_bounds(grids)[-1], tower.cfg.patch_dim, device="cuda", dtype=BF16,
                     generator=torch.Generator(device="cuda").manual_seed(3))
    try:
        sdpa, _ = GraphedVision(tower, exact_after=None)(px, grids)
        register(KernelChoices(vision_backends=("FA4", "CUDNN_ATTENTION", "FLASH_ATTENTION")))
        runner = GraphedVision(tower, exact_after=2)
        sights = [runner(px, grids)[0] for _ in range(3)]  # eager, capture (its warm-up's answer), replay
    finally:
        register(DEFAULT)
    assert all(torch.equal(s, sights[0]) for s in sights[1:])
    assert rel(sights[0], sdpa) < 3e-2  # 27 random bf16 blocks amplify single roundings (docs/benchmarks.md)


def expert_inputs(t, k, e, h, i, seed, held_elsewhere=False):
    g = torch.Generator(device="cuda").manual_seed(seed)
    x = 0.5 * torch.randn(t, h, device="cuda", generator=g).to(BF16)
    ids = torch.stack([torch.randperm(e, device="cuda", generator=g)[:k] for _ in range(t)])
    if t > 8:  # a crowded expert and an idle one
        ids[:, 0] = torch.where(ids[:, 0] == 5, 1, ids[:, 0])
        ids[:, 1:] = torch.where(ids[:, 1:] == 5, 1 + (ids[:, 1:] == 1).long(), ids[:, 1:])
        ids[t // 2:, 0] = 1
    if held_elsewhere:
        ids[::3, -1] = e
    w = torch.softmax(torch.randn(t, k, device="cuda", generator=g), -1).to(BF16)
    gate_up = (torch.randn(e, 2 * i, h, device="cuda", generator=g) * h**-0.5).to(BF16)
    down = (torch.randn(e, h, i, device="cuda", generator=g) * i**-0.5).to(BF16)
    return x, ids, w, gate_up, down


@torch.inference_mode()
@pytest.mark.parametrize("t,k,e,h,i,held", [(1, 8, 128, 4096, 1536, False), (2048, 8, 128, 4096, 1536, False),
                                            (300, 4, 16, 512, 256, True), (37, 2, 8, 256, 128, False)])
def test_quack_experts_match_float32(t, k, e, h, i, held):
    needs("quack")
    from qwen_vl_distributed.kernels.cute import quack_experts
    from qwen_vl_distributed.kernels.grouped import fast_experts

    x, ids, w, gu, dn = expert_inputs(t, k, e, h, i, seed=t, held_elsewhere=held)
    exact = reference_experts(x.float(), ids, w.float(), gu.float(), dn.float())
    got = quack_experts(x, ids, w, gu, dn)
    assert got.dtype == BF16 and not got.isnan().any()
    base_err = rel(fast_experts(x, ids, w, gu, dn), exact)  # the Triton / grouped path the choices dispatch
    assert rel(got, exact) < max(2 * base_err, 4e-3), (rel(got, exact), base_err)
    chosen = fast_experts(x, ids, w, gu, dn, choices=KernelChoices(quack_min_pairs=1))
    assert torch.equal(chosen, got)  # the dispatcher runs it where chosen


@torch.inference_mode()
def test_quack_runs_inside_the_fused_layers_when_chosen(monkeypatch):
    """The default prompt path is the fused decoder layer (kernels/decode_layer.py), not the 'fast' experts impl: with
    ``quack_min_pairs`` it must dispatch quack too, and the prompt's output stay the Triton path's within bf16."""
    needs("quack")
    import qwen_vl_distributed.kernels.cute as cute
    from gpu_models import text_config
    from paged import prompt_cache
    from qwen_vl_distributed.checkpoint.synth_weights import randomize_module
    from qwen_vl_distributed.kernels import enable_fast_paths
    from qwen_vl_distributed.model.qwen3_vl import Qwen3VLMoe

    cfg = text_config(hidden_size=256, head_dim=64, num_attention_heads=4, num_key_value_heads=2,
                      moe_intermediate_size=128, num_experts=16, num_experts_per_tok=4, num_hidden_layers=2)
    with torch.device("meta"):
        model = Qwen3VLMoe(cfg, vision=False)
    randomize_module(model, 3, torch.device("cuda"), BF16)
    calls = []
    real = cute.quack_experts
    monkeypatch.setattr(cute, "quack_experts", lambda *a, **kw: calls.append(a[1].numel()) or real(*a, **kw))
    ids = torch.randint(0, 1000, (300,), device="cuda")
    pos = torch.arange(300, device="cuda").expand(3, -1)
    outs = []
    for choices in (KernelChoices(), KernelChoices(quack_min_pairs=512)):
        enable_fast_paths(model, choices=choices)
        cache, layout = prompt_cache(model, 300)
        outs.append(model(positions=pos, layout=layout, cache=cache, input_ids=ids))
    register(DEFAULT)
    assert calls == [1200, 1200]  # both layers, 300 tokens x top-4, only with quack chosen
    assert rel(outs[1], outs[0]) < 2e-2


@torch.inference_mode()
@pytest.mark.parametrize("starts,lens", [([0], [700]), ([300], [200]), ([0, 128], [64, 333])])
def test_fa4_prompt_attention_over_the_cache_matches_sdpa(starts, lens):
    """``prompt_fa4``: whole prompts, a chunk continuing a cached prefix (FA4's causal mask aligned to the last key
    must give query r the keys [0, start + r]) and two sequences at once, GQA 8 / 2 heads of 128, keys read from
    shuffled blocks of the cache."""
    needs("fa4")
    from paged import pool_blocks, shuffled_tables
    from qwen_vl_distributed.kernels.attention import prefill_attention
    from qwen_vl_distributed.model.batch import SeqLayout

    g = torch.Generator(device="cuda").manual_seed(sum(lens))
    tables = shuffled_tables([a + n for a, n in zip(starts, lens)], 16, seed=1)
    k_cache, v_cache = (torch.randn(pool_blocks(tables), 2, 16, 128, device="cuda", dtype=BF16, generator=g)
                        for _ in range(2))
    q = torch.randn(sum(lens), 8, 128, device="cuda", dtype=BF16, generator=g)
    layout = SeqLayout(tables, starts, lens)
    want = prefill_attention(q.float(), k_cache.float(), v_cache.float(), layout, 128**-0.5)
    sdpa = prefill_attention(q, k_cache, v_cache, layout, 128**-0.5)
    got = prefill_attention(q, k_cache, v_cache, layout, 128**-0.5, fa4=True)
    assert got.shape == q.shape
    assert rel(got, want) < max(2 * rel(sdpa, want), 4e-3), (rel(got, want), rel(sdpa, want))
