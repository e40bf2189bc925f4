import dataclasses

import pytest

from qwen_vl_distributed.model.config import preset
from qwen_vl_distributed.model.param_counts import (
    component_bytes, layer_params, model_params, total_weight_bytes, vision_params)


@pytest.fixture(scope="module")
def big():
    return preset("235b-a22b")


def test_235b_reference_counts(big):
    # qwen3-vl-moe.md §1.4, counted by HF on the meta device
    p = model_params(big)
    assert p.total == 235_670_022_896
    assert p.vision.total == 576_388_336
    assert p.vision.merger == 40_119_040
    assert p.vision.deepstack_mergers == 120_377_856
    assert p.layer.total == 2_487_755_008
    assert p.embed == 622_329_856
    assert p.lm_head == 622_329_856
    assert p.text == 235_093_634_560


def test_235b_layer_breakdown(big):
    layer = layer_params(big)
    assert layer.attention == 71_303_168
    assert layer.experts == 2_415_919_104
    assert layer.expert == 18_874_368
    assert layer.router == 524_288
    assert layer.qk_norm == 256
    assert layer.norms == 8_192
    assert 94 * layer.experts == 227_096_395_776


def test_30b_reference_counts():
    cfg = preset("30b-a3b")
    assert model_params(cfg).total == 31_070_754_032
    assert vision_params(cfg).total == 538_631_408


def test_bf16_and_fp32_bytes(big):
    assert total_weight_bytes(big, "bf16") == 2 * 235_670_022_896
    assert total_weight_bytes(big, "fp32") == 4 * 235_670_022_896
    b = component_bytes(big, "bf16")
    assert b.lm_head == 1_244_659_712
    # attention + router + norms + 8 experts: the 446 MB read per layer at decode (performance.md)
    assert b.layer_active == 2 * (71_303_168 + 256 + 524_288 + 8_192 + 8 * 18_874_368) == 445_661_696


def test_fp8_bytes(big):
    b = component_bytes(big, "fp8")
    # as a run holds the release: experts fp8 with 128x128 blocks (per expert gate/up 12x32, down 32x12 fp32
    # scales); the attention projections dequantised to bf16
    attention = 2 * 71_303_168
    expert = 18_874_368 + 4 * (2 * 12 * 32 + 32 * 12)
    rest = 2 * (256 + 524_288 + 8_192)
    assert b.layer == attention + 128 * expert + rest
    assert b.layer_active == attention + 8 * expert + rest
    assert b.vision == 2 * 576_388_336 and b.lm_head == 2 * 622_329_856  # kept in bf16
    # the §6 estimate of the checkpoint is 237.6 GB; its attention projections take 6.7 GB more in bf16
    assert round(total_weight_bytes(big, "fp8") / 1e9, 1) == 244.3


def test_tied_lm_head_counted_once(big):
    tied = dataclasses.replace(big, tie_word_embeddings=True)
    assert model_params(tied).total == 235_670_022_896 - 622_329_856
    assert total_weight_bytes(tied, "bf16") == 2 * (235_670_022_896 - 622_329_856)


def test_unknown_dtype(big):
    with pytest.raises(ValueError, match="dtype must be one of bf16, fp8, fp32, got 'fp16'"):
        component_bytes(big, "fp16")
