"""The benchmark's accounting: what a prefill layer's roofline floor is, from the byte and FLOP counts."""

from __future__ import annotations

import pytest

from qwen_vl_distributed.bench.models import expert_params, prefill_layer_floor, prefill_layer_flops
from qwen_vl_distributed.bench.report import render
from qwen_vl_distributed.model.config import preset

CFG = preset("235b-a22b")
H100 = dict(copy_gbs=3030.0, matmul_tflops=780.0)


def test_a_2k_prompt_reads_every_expert_and_is_memory_bound_on_an_h100():
    f = prefill_layer_floor(CFG, 2048, **H100)
    t = CFG.text
    all_experts_s = 2 * t.num_experts * expert_params(CFG) / (H100["copy_gbs"] * 1e9)
    assert f["experts_bound"] == "memory"
    assert f["experts_ms"] == pytest.approx(1e3 * all_experts_s, rel=1e-6)  # all 128 experts hit at 2048 tokens
    assert f["floor_ms"] == pytest.approx(f["experts_ms"] + f["rest_ms"])
    # the 60% MFU at 2k would need 98% of this floor's speed on an H100
    assert 0.60 < f["mfu_at_floor"] < 0.62
    assert f["mfu_at_floor"] == pytest.approx(prefill_layer_flops(CFG, 2048) / (f["floor_ms"] * 1e-3) / 780e12)


def test_long_prompts_are_compute_bound_and_one_token_reads_only_its_experts():
    assert prefill_layer_floor(CFG, 8192, **H100)["mfu_at_floor"] == pytest.approx(1.0)
    one = prefill_layer_floor(CFG, 1, copy_gbs=1000.0, matmul_tflops=1e6)  # memory-bound everywhere
    k = CFG.text.num_experts_per_tok
    assert one["experts_ms"] == pytest.approx(1e3 * 2 * k * expert_params(CFG) / 1e12)


def test_the_report_reads_a_measurement_against_the_floor():
    f = prefill_layer_floor(CFG, 2048, **H100)
    row = {"ours_ms_layer": 2 * f["floor_ms"], "floor": f, "ours_frac_of_floor": 0.5}
    text = render({"prefill": {2048: row}})
    assert "T=2048: floor" in text and "memory-bound" in text and "ours at 50.0% of the floor's speed" in text
