"""config.json is read through transformers' Qwen3VLMoeConfig: its spellings and defaults are ours, and every refusal
names the field."""

from __future__ import annotations

import copy

import pytest

from qwen_vl_distributed.model.config import PRESETS, ConfigError, config_from_dict, config_to_dict, preset


@pytest.mark.parametrize("name", sorted(PRESETS))
@pytest.mark.parametrize("spelling", ["released", "hf"])
def test_written_configs_read_back(name, spelling):
    cfg = preset(name)
    assert config_from_dict(config_to_dict(cfg, spelling)) == cfg


def _edited(fn, spelling: str = "released") -> dict:
    d = copy.deepcopy(config_to_dict(preset("tiny"), spelling))
    fn(d)
    return d


def test_transformers_aliases_and_legacy_names():
    """num_local_experts (what transformers 5 writes) for num_experts, torch_dtype (transformers 4) for dtype."""
    def respell(d):
        d["text_config"]["num_local_experts"] = d["text_config"].pop("num_experts")
        d["torch_dtype"] = d.pop("dtype")
        del d["text_config"]["dtype"]

    cfg = config_from_dict(_edited(respell))
    assert cfg == preset("tiny")


def test_transformers_defaults_fill_absent_fields():
    """An absent field means what it means to transformers: here, its default rope and M-RoPE section, which a
    config of head_dim 128 (the 235B's) then fits."""
    def strip(d):
        del d["text_config"]["rope_scaling"], d["text_config"]["rope_theta"]

    d = copy.deepcopy(config_to_dict(preset("235b-a22b")))
    strip(d)
    t = config_from_dict(d).text
    assert (t.rope_theta, t.mrope_section) == (500000.0, (24, 20, 20))


@pytest.mark.parametrize("edit,message", [
    (lambda d: d.update(model_type="llama"), "config.json: model_type 'llama' is not a Qwen3-VL-MoE model"),
    (lambda d: d.pop("model_type"), "config.json: model_type None is not a Qwen3-VL-MoE model"),
    (lambda d: d["text_config"].update(hidden_size="64"),
     "config.json: text_config.hidden_size: TypeError: Field 'hidden_size' expected int, got str"),
    (lambda d: d["vision_config"].update(hidden_size=32.5),
     "config.json: vision_config.hidden_size: TypeError: Field 'hidden_size' expected int, got float"),
    (lambda d: d["text_config"]["rope_scaling"].update(rope_type="yarn"),
     "config.json: text_config: KeyError: \"Missing required keys in `rope_parameters` for 'rope_type'='yarn'"),
    (lambda d: d["text_config"]["rope_scaling"].update(rope_type="linear", factor=2.0),
     "config.json: text_config.rope_parameters.rope_type 'linear' is not supported"),
    (lambda d: d["text_config"].update(norm_topk_prob=False),
     "config.json: text_config.norm_topk_prob false is not supported"),
    (lambda d: d["text_config"].update(norm_topk_prob="yes"),
     "config.json: text_config.norm_topk_prob must be true or false, got 'yes'"),
    (lambda d: d["text_config"]["rope_scaling"].update(mrope_interleaved=False),
     "config.json: text_config mrope_interleaved false is not supported"),
    (lambda d: d["text_config"].update(num_key_value_heads=3),
     "config.json: text_config.num_attention_heads (4) must be a multiple of text_config.num_key_value_heads (3)"),
    (lambda d: d["vision_config"].update(rope_parameters={"rope_type": "linear", "rope_theta": 1e4, "factor": 2.0}),
     "config.json: vision_config.rope_parameters.rope_type 'linear' is not supported"),
])
def test_refusals_name_the_field(edit, message):
    with pytest.raises(ConfigError) as e:
        config_from_dict(_edited(edit))
    assert str(e.value).startswith(message)
    assert "\n" not in str(e.value)


def test_vision_rope_theta_is_read():
    """transformers' vision rotary takes its theta from vision_config.rope_parameters; so do we."""
    cfg = config_from_dict(_edited(lambda d: d["vision_config"]["rope_parameters"].update(rope_theta=2e4), "hf"))
    assert cfg.vision.rope_theta == 2e4
