"""CUDA-graph decode steps equal the model's own forward with the reference implementations, in float32, on the
shapes that gave wrong tokens on an H100 (issue 16: head_dim 8, hidden 48, 6 query / 3 kv heads, expert width 20,
12 experts top-3): several steps of a batch of three padded into a bucket of four, over a KV cache in blocks of 4
tokens with shuffled block tables (decode crosses block boundaries), through the fused layers and through the
modules' forward around the 'fast' attention and experts.

What went wrong there: head_dim 8 was outside the split-KV kernel's tiles, so a decode step fell back to attention
that reads the cache by the step's host lists, and the graph replayed its capture-time cache place and length (the
scratch, one key) at every step: right first tokens (the prompt's, not graphed), wrong ones from the second.
"""

from __future__ import annotations

import copy

import pytest
import torch

from gpu_models import NARROW_HEADS
from paged import pool_blocks, shuffled_tables
from qwen_vl_distributed.checkpoint.synth_weights import randomize_module
from qwen_vl_distributed.kernels import enable_fast_paths, fused_layers_fit, use_reference
from qwen_vl_distributed.model.batch import SeqLayout
from qwen_vl_distributed.model.kv_cache import blocks_for
from qwen_vl_distributed.model.qwen3_vl import Qwen3VLMoe
from qwen_vl_distributed.runtime.cuda_graph import DecodeGraphs

pytestmark = pytest.mark.gpu
PROMPTS = [[5, 6, 7, 8, 9], [11, 12, 13, 14, 15, 16, 17, 18, 19], [21, 22]]
STEPS, BLOCK = 6, 4
TABLES = shuffled_tables([len(p) + STEPS for p in PROMPTS], BLOCK, seed=3)  # each sequence's blocks, shuffled


def rel(a, b) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.fixture(scope="module")
def base():
    with torch.device("meta"):
        model = Qwen3VLMoe(NARROW_HEADS, vision=False)
    randomize_module(model, 5, torch.device("cuda"), torch.float32)
    return model.eval()


def layout_of(starts: list[int], lens: list[int]) -> SeqLayout:
    """As the engine sends it: each table as far as the step reaches."""
    return SeqLayout([t[:blocks_for(a + n, BLOCK)] for t, a, n in zip(TABLES, starts, lens)], starts, lens)


def prefill(model, cache):
    ids = [t for p in PROMPTS for t in p]
    pos = torch.cat([torch.arange(len(p)) for p in PROMPTS]).expand(3, -1).cuda()
    layout = layout_of([0] * len(PROMPTS), [len(p) for p in PROMPTS])
    with torch.inference_mode():
        return model(positions=pos, layout=layout, cache=cache, input_ids=torch.tensor(ids, device="cuda"))


def test_the_fused_layers_take_every_head_dim(base):
    assert fused_layers_fit(base)


@pytest.mark.parametrize("fused,norms", [(True, (0, 0)), (True, (4, 4)), (True, (4, 0)), (False, (0, 0))],
                         ids=["fused-layers", "fused-layers-norms-inside", "fused-layers-router-norm", "module-layers"])
@pytest.mark.parametrize("batch", [3, 1])
def test_graph_replay_equals_the_reference_forward_step_after_step(base, fused, norms, batch):
    """``norms``: KernelChoices.norm_router_rows, norm_qkv_rows (kernels.router, where at batch 1 the router lays out
    the experts' blocks itself; kernels.gemv)."""
    import dataclasses

    from qwen_vl_distributed.kernels.choices import DEFAULT

    fast = enable_fast_paths(copy.deepcopy(base), vision_graphs=False)
    ref = use_reference(copy.deepcopy(base))
    cache, ref_cache = (m.new_cache(pool_blocks(TABLES), BLOCK, 32) for m in (fast, ref))
    ids = prefill(ref, ref_cache).argmax(-1)[:batch]
    for i in ref.layer_ids:
        cache.k[i].copy_(ref_cache.k[i])
        cache.v[i].copy_(ref_cache.v[i])
    graphs = DecodeGraphs(fast, cache, buckets=(1, 4), fused=fused,
                          choices=dataclasses.replace(DEFAULT, norm_router_rows=norms[0], norm_qkv_rows=norms[1]))
    graphs.capture()
    assert sorted(graphs.graphs) == [1, 4]
    starts = [len(p) for p in PROMPTS][:batch]
    for step in range(STEPS):
        layout = layout_of(starts, [1] * batch)
        pos = torch.tensor(starts, device="cuda").expand(3, -1)
        out = graphs.run(positions=pos, layout=layout, input_ids=ids).clone()  # bucket 4: one padding row
        with torch.inference_mode():
            want = ref(positions=pos, layout=layout, cache=ref_cache, input_ids=ids)
        assert rel(out, want) < 1e-5, f"decode step {step}: rel {rel(out, want):.2e}"
        ids = want.argmax(-1)
        starts = [s + 1 for s in starts]


def _graph_steps(base, choices):
    fast = enable_fast_paths(copy.deepcopy(base), vision_graphs=False)
    cache = fast.new_cache(pool_blocks(TABLES), BLOCK, 32)
    ids = prefill(fast, cache).argmax(-1)
    graphs = DecodeGraphs(fast, cache, buckets=(4,), fused=True, choices=choices)
    graphs.capture()
    starts, steps = [len(p) for p in PROMPTS], []
    for _ in range(STEPS):
        pos = torch.tensor(starts, device="cuda").expand(3, -1)
        out = graphs.run(positions=pos, layout=layout_of(starts, [1, 1, 1]), input_ids=ids).clone()
        steps.append(out)
        ids = out.argmax(-1)
        starts = [s + 1 for s in starts]
    return steps


@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() < (9, 0),
                    reason="programmatic dependent launch needs compute capability 9.0+")
@pytest.mark.parametrize("norm_router", [0, 4], ids=["router-apart", "router-norm"])
def test_programmatic_dependent_launch_changes_no_bit(base, norm_router):
    """The fused decode step with its kernels launched with PDL (kernels.pdl: each waits on the grid before it), with
    weight tiles loaded before that wait (``pre_wait`` 1 and 2: the GEMVs, the experts' first down tile, and the
    fused router's slice with ``norm_router``), with each program letting the next grid launch before its wait
    (pdl 2), with the top-k by packed keys, and with the K-sum in the down kernel's launch (its last program per
    column tile sums in the K-sum kernel's order: kernels.arrivals) gives the very bits of plain launches, step after
    step, under graph replay. The variants whose fp32 reductions run over other tiles or warps -- the top-k kernel
    in one warp (its softmax sum), the router's top-k in its GEMV's launch, split-K in the GEMVs (their partials),
    the q/k post inside attention (head_dim 8 here: it falls back; test_kernels_gpu.py runs it at the released
    shapes) -- are held to the first step's hidden states within float32 rounding. The GEMV's pipeline depth and
    split-K run with 16-wide tiles, so that this model's K spans several."""
    import dataclasses

    from qwen_vl_distributed.kernels.choices import DEFAULT

    # every switch named below off in the base, whatever the defaults, so that each variant is held to plain launches
    plain = dataclasses.replace(DEFAULT, pdl=False, norm_router_rows=norm_router, pre_wait=0, packed_topk=False,
                                route_warps=4, sum_in_down_rows=0, router_one_launch=False,
                                qkv_post_in_attention=False, gemv_stages=4, gemv_split=1, gemv_warps=4)
    want = _graph_steps(base, plain)
    exact = [dict(pdl=pdl, pre_wait=pre) for pdl, pre in ((True, 0), (True, 1), (True, 2), (2, 0), (2, 2))]
    exact += [dict(pdl=True, packed_topk=True), dict(pdl=False, sum_in_down_rows=4),
              dict(pdl=True, pre_wait=2, sum_in_down_rows=4)]
    for variant in exact:
        got = _graph_steps(base, dataclasses.replace(plain, **variant))
        assert all(torch.equal(a, b) for a, b in zip(got, want)), variant
    close = [dict(pdl=True, packed_topk=True, route_warps=1), dict(pdl=True, router_one_launch=True),
             dict(pdl=True, qkv_post_in_attention=True),
             dict(pdl=True, pre_wait=2, sum_in_down_rows=4, packed_topk=True, router_one_launch=True,
                  qkv_post_in_attention=True)]
    for variant in close:
        got = _graph_steps(base, dataclasses.replace(plain, **variant))
        assert rel(got[0], want[0]) < 1e-5, variant
    # the GEMV's pipeline depth and split-K need several K tiles: this model's hidden size is one default tile
    small = dataclasses.replace(plain, gemv={"qkv": (16, 16), "o": (16, 16), "router": None})
    want = _graph_steps(base, small)
    got = _graph_steps(base, dataclasses.replace(small, pdl=True, gemv_stages=8))
    assert all(torch.equal(a, b) for a, b in zip(got, want)), "gemv_stages"
    for variant in (dict(pdl=True, pre_wait=1, gemv_split=3), dict(pdl=2, gemv_split=2), dict(gemv_warps=8),
                    dict(pdl=True, gemv_warps=8, gemv_stages=6)):
        got = _graph_steps(base, dataclasses.replace(small, **variant))
        assert rel(got[0], want[0]) < 1e-5, variant
