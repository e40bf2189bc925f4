"""Bucket graphs of the vision tower at the 235B dimensions (27 blocks, 16 heads of 72, random weights, bf16): a
replay equals the same padded computation run eagerly, bit for bit, for two grids of one bucket and for two images
in one grid list; and equals the unpadded tower within bf16 rounding (the padded matmuls and the 80-wide attention
are other kernels). A size gets the same answer on every sight; a grid list no bucket fits runs eagerly, then from
its own graph, with the same bits."""

from __future__ import annotations

import pytest
import torch

from qwen_vl_distributed.bench.models import random_vision_tower
from qwen_vl_distributed.kernels.vision_attention import graph_safe
from qwen_vl_distributed.model.config import preset
from qwen_vl_distributed.model.vision import segment_bounds
from qwen_vl_distributed.runtime.vision_graph import BucketTower, GraphedVision
from qwen_vl_distributed.runtime.vision_policy import bucket_rows

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def rel(a, b) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.fixture(scope="module")
def tower():
    return random_vision_tower(preset("235b-a22b"), "cuda")


def pixels(tower, grid, seed):
    g = torch.Generator(device="cuda").manual_seed(seed)
    n = segment_bounds(grid)[-1]
    return torch.randn(n, tower.cfg.patch_dim, device="cuda", dtype=torch.bfloat16, generator=g)


@torch.inference_mode()
def test_bucket_replay_equals_the_padded_tower_eagerly(tower):
    runner = GraphedVision(tower, buckets=True, exact_after=None)
    grids = ([(1, 62, 62)], [(1, 64, 62)], [(1, 60, 64), (1, 8, 8)])
    assert len({bucket_rows(segment_bounds(g)[-1]) for g in grids}) == 1  # all in the 4096-row bucket
    for seed, grid in enumerate(grids):
        px = pixels(tower, grid, seed)
        out, taps = runner(px, grid)
        eager, eager_taps = BucketTower(tower, 4096, px.dtype, px.device)(px, grid)
        assert torch.equal(out, eager) and all(torch.equal(a, b) for a, b in zip(taps, eager_taps)), grid
        ref, ref_taps = tower.run_layers(px, grid, runner.block_fn)
        assert rel(out, ref) < 3e-2 and all(rel(a, b) < 3e-2 for a, b in zip(taps, ref_taps)), (grid, rel(out, ref))
    assert len(runner.buckets) == 1 and not runner.policy.exact


@torch.inference_mode()
def test_a_size_gives_the_same_answer_on_every_sight_and_unbucketed_lists_get_exact_graphs(tower):
    runner = GraphedVision(tower, buckets=True, exact_after=2)
    grid = [(1, 40, 52)]
    px = pixels(tower, grid, 7)
    first, _ = runner(px, grid)  # the bucket's capture: the warm-up's answer
    again, _ = runner(px, grid)  # its first replay
    assert torch.equal(first, again) and len(runner.buckets) == 1 and not runner.policy.exact
    many = [(1, 8, 8)] * 8  # 8 segments and the padding need 9 code slots: no bucket
    px = pixels(tower, many, 8)
    eager, _ = runner(px, many)
    second, taps = runner(px, many)  # captures, and answers with the capture's warm-up
    assert len(runner.policy.exact) == 1
    third, third_taps = runner(px, many)  # the graph's first replay
    with graph_safe():  # the per-segment attention a capture runs, as the eager tower runs it in a graph
        ref, ref_taps = tower.run_layers(px, many, runner.block_fn)
    assert torch.equal(eager, ref) and torch.equal(second, ref) and torch.equal(third, ref)
    assert all(torch.equal(a, b) for a, b in zip(taps, ref_taps))
    assert all(torch.equal(a, b) for a, b in zip(third_taps, ref_taps))
