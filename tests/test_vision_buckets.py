"""The vision tower's bucket graphs on CPU: the policy (bucket choice, sightings, LRU, fallbacks), the coded-segment
attention against per-segment attention, the padded rotary kernel (Triton's interpreter) and the padded tower
against the unpadded one. tests/gpu/test_vision_buckets_gpu.py replays the graphs at the 235B dimensions."""

from __future__ import annotations

import pytest
import torch

from qwen_vl_distributed.kernels.vision_attention import coded_attention, coded_buffer, coded_head_dim
from qwen_vl_distributed.model.config import preset
from qwen_vl_distributed.model.rope import vision_rope_tables
from qwen_vl_distributed.model.vision import reference_vision_attention, segment_bounds, vision_rotary
from qwen_vl_distributed.runtime.vision_policy import (BUCKET, CAPTURE, EAGER, EXACT, VisionGraphPolicy,
                                                       bucket_rows)

from test_kernels_cpu import needs_triton, rel


def test_bucket_rows_pad_at_most_an_eighth_and_hold_whole_merge_blocks():
    assert bucket_rows(1) == bucket_rows(256) == 256
    assert bucket_rows(4096) == 4096 and bucket_rows(4097) == 4608 and bucket_rows(257) == 288
    for n in range(4, 20000, 4):
        rows = bucket_rows(n)
        assert rows >= n and rows % 4 == 0 and (n <= 256 or rows - n < n / 8), n
    assert len({bucket_rows(n) for n in range(4, 16385, 4)}) <= 8 * 6 + 1  # 8 per doubling above 256


def test_policy_buckets_every_sight_and_captures_repeated_lists_no_bucket_fits():
    policy = VisionGraphPolicy(max_graphs=2, exact_after=3, slots=8)
    for _ in range(5):  # the same answer however often a size is seen
        assert policy.choose("a", [4096]) == (BUCKET, 4096)
    assert policy.choose("b", [3844]) == (BUCKET, 4096)  # another size, the same bucket
    many = [64] * 8  # 8 segments and the padding need 9 code slots: no bucket
    assert policy.choose("m", many) == (EAGER, 0)
    assert policy.choose("m", many) == (EAGER, 0)
    assert policy.choose("m", many) == (CAPTURE, 0)  # the third sight
    policy.keep("m", "graph m")
    assert policy.choose("m", many) == (EXACT, 0) and policy.exact["m"] == "graph m"
    for key in ("n", "o"):
        for _ in range(3):
            kind, _ = policy.choose(key, many)
        assert kind == CAPTURE
        policy.keep(key, f"graph {key}")
    assert list(policy.exact) == ["n", "o"]  # "m", least recently used, went out
    assert policy.choose("m", many) == (EAGER, 0)  # and counts its sightings again


def test_policy_falls_back_to_eager_where_no_bucket_fits():
    policy = VisionGraphPolicy(max_patches=16384, slots=8)
    assert policy.choose("huge", [20000])[0] == EAGER
    assert policy.choose("many", [64] * 8)[0] == EAGER  # 8 segments and the padding need 9 code slots
    assert policy.choose("seven", [64] * 7)[0] == BUCKET  # a small bucket: its dense attention is cheap anyway
    assert policy.choose("video", [1296, 1296])[0] == EAGER  # 2816^2 dense against 2 x 1296^2
    assert policy.choose("two", [4096, 64])[0] == BUCKET
    off = VisionGraphPolicy(buckets=False, exact_after=None)
    assert off.choose("a", [4096])[0] == EAGER and off.choose("a", [4096])[0] == EAGER
    old = VisionGraphPolicy(buckets=False, exact_after=1)  # one graph per shape at its first sight
    assert old.choose("a", [4096])[0] == CAPTURE
    with pytest.raises(ValueError, match="exact_after"):
        VisionGraphPolicy(exact_after=0)


def test_eager_runs_of_a_list_that_may_get_a_graph_use_the_graphs_attention():
    """Until its graph is captured a grid list runs eagerly; it must run the per-segment attention the graph will
    hold (``graph_safe``), not the varlen kernel, or its first sights give other bits than the later ones. Past
    ``max_patches`` (never graphed) it keeps the faster kernel."""
    from qwen_vl_distributed.kernels import vision_attention
    from qwen_vl_distributed.runtime.vision_graph import GraphedVision

    class Tower:
        cfg = preset("tiny").vision

        def run_layers(self, pixels, grid, block_fn):
            return getattr(vision_attention._graph_safe, "depth", 0) > 0

    runner = GraphedVision(Tower(), max_patches=100, fused_blocks=False, buckets=False, exact_after=4)
    assert runner.eager(torch.zeros(64, 1), [(1, 8, 8)]) is True
    assert runner.eager(torch.zeros(144, 1), [(1, 12, 12)]) is False
    never = GraphedVision(Tower(), fused_blocks=False, buckets=False, exact_after=None)
    assert never.eager(torch.zeros(64, 1), [(1, 8, 8)]) is False
    assert VisionGraphPolicy(exact_after=2, max_patches=10).may_capture(10)
    assert not VisionGraphPolicy(exact_after=2, max_patches=10).may_capture(11)


def test_policy_remembers_a_bounded_number_of_sizes():
    policy = VisionGraphPolicy(exact_after=2, remember=3)
    many = [64] * 8
    for key in range(10):
        policy.choose(key, many)
    assert list(policy.seen) == [7, 8, 9]
    assert policy.choose(0, many)[0] == EAGER and policy.choose(9, many)[0] == CAPTURE


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_coded_attention_equals_per_segment_attention(dtype):
    """Three segments and padding rows in one dense call: the real rows equal one attention per segment."""
    heads, d = 3, 12
    lengths, rows = [16, 7, 21], 60
    n = sum(lengths)
    g = torch.Generator().manual_seed(0)
    qkv = (torch.randn(rows, 3 * heads * d, generator=g) * 2).to(dtype)
    pos = torch.arange(rows)
    rope = vision_rope_tables(pos // 5, pos % 5, d, 10000.0)
    segment = torch.cat([torch.full((m,), i) for i, m in enumerate(lengths)] + [torch.full((rows - n,), 4)])
    out = coded_attention(coded_buffer(segment, heads, d, dtype), qkv, rope, heads, d**-0.5)
    cu = [0, 16, 23, 44]
    ref = reference_vision_attention(qkv[:n].float(), tuple(t[:n] for t in rope), cu, heads, d**-0.5)
    assert out.shape == (rows, heads * d) and torch.isfinite(out).all()
    assert rel(out[:n], ref) < (1e-6 if dtype == torch.float32 else 2e-3)


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_padded_rotary_kernel_writes_the_first_columns_only(dtype):
    from qwen_vl_distributed.kernels.vision_rotary import rotate_qkv_into

    n, heads, d = 70, 3, 12
    dp = coded_head_dim(d)
    qkv = torch.randn(n, 3 * heads * d).to(dtype)
    rope = vision_rope_tables(torch.arange(n) // 7, torch.arange(n) % 7, d, 10000.0)
    out = torch.full((3, n, heads, dp), 7.0, dtype=dtype)
    rotate_qkv_into(qkv, rope, heads, out)
    q, k, v = qkv.view(n, 3, heads, d).unbind(1)
    assert torch.equal(out[2, ..., :d], v) and bool((out[..., d:] == 7).all())
    assert rel(out[0, ..., :d], vision_rotary(q, rope)) < 1e-6 and rel(out[1, ..., :d], vision_rotary(k, rope)) < 1e-6


@needs_triton
def test_bucket_tower_equals_the_unpadded_tower():
    """Two grid lists of one bucket through the padded tower (fused blocks, coded segments; Triton's interpreter)
    give the unpadded tower's merged tokens and DeepStack taps, fp32."""
    from qwen_vl_distributed.checkpoint.synth_weights import randomize_module
    from qwen_vl_distributed.model.vision import VisionTower
    from qwen_vl_distributed.runtime.vision_graph import BucketTower

    cfg = preset("tiny").vision
    with torch.device("meta"):
        tower = VisionTower(cfg)
    randomize_module(tower, 0, torch.device("cpu"), torch.float32)
    bucket = BucketTower(tower, 256, torch.float32, torch.device("cpu"))
    for grid in ([(1, 8, 8)], [(1, 4, 4), (2, 6, 10)]):
        n = segment_bounds(grid)[-1]
        px = torch.randn(n, cfg.patch_dim)
        with torch.no_grad():
            ref, ref_taps = tower.run_layers(px, grid)
            out, taps = bucket(px, grid)
        assert out.shape == ref.shape and len(taps) == len(ref_taps) > 0
        assert rel(out, ref) < 1e-5 and all(rel(a, b) < 1e-5 for a, b in zip(taps, ref_taps))
