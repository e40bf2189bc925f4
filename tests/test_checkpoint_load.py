"""Loading stages from synthetic checkpoints: layouts, stage isolation, dtypes, and every strictness error."""

from __future__ import annotations

import os

import pytest
import torch

from checkpoint_testlib import L, edit_config, edit_shard, index, logits, odd_cfg, shard_of, small_cfg, stage_model
from qwen_vl_distributed.checkpoint import errors as E
from qwen_vl_distributed.checkpoint.index import INDEX_NAME, open_checkpoint
from qwen_vl_distributed.checkpoint.loader import load_stage
from qwen_vl_distributed.checkpoint.safetensors_io import ShardReader
from qwen_vl_distributed.checkpoint.synth_weights import synthetic_param, write_synthetic_weights
from qwen_vl_distributed.model.config import ConfigError

LAYOUTS = ("hf", "released", "per-expert")
IDS = [1, 5, 77, 300, 2, 9, 511]


def _write(d, cfg=None, layout="hf", **kw):
    write_synthetic_weights(d, cfg or small_cfg(), seed=3, layout=layout, shard_bytes=kw.pop("shard_bytes", 150_000),
                            **kw)
    return d


def _load(d, layers=None, vision=True, embed=True, head=True, **kw):
    ckpt = open_checkpoint(d)
    m = stage_model(ckpt.cfg, layers, vision, embed, head)
    report = load_stage(m, ckpt, progress=False, **kw)
    return m, ckpt, report


@pytest.fixture
def ckpt_dir(tmp_path):
    return _write(tmp_path / "ck")


# --------------------------------------------------------------------------------------------------------------------
# Layouts


def test_tied_head_reads_the_embedding_matrix(tmp_path):
    """tie_word_embeddings: no lm_head.weight is stored; a last stage without the embedding reads it as its head."""
    import dataclasses

    cfg = dataclasses.replace(small_cfg(), tie_word_embeddings=True)
    d = _write(tmp_path / "ck", cfg)
    assert "lm_head.weight" not in index(d)["weight_map"]
    first, _, _ = _load(d, layers=(0, 3), head=False)
    last, _, _ = _load(d, layers=(3, 4), vision=False, embed=False)
    assert torch.equal(last.lm_head.weight, first.model.language_model.embed_tokens.weight)
    edit_shard(d, "model.language_model.embed_tokens.weight",
               lambda t: t.update({"lm_head.weight": t["model.language_model.embed_tokens.weight"].clone()}))
    with pytest.raises(E.UnexpectedKeyError, match="unexpected key lm_head.weight in .*: it belongs to stage"):
        _load(d, layers=(3, 4), vision=False, embed=False)


@pytest.mark.parametrize("make_cfg", [small_cfg, odd_cfg], ids=["H=2I", "H!=2I"])
def test_layouts_load_identical_params_and_logits(tmp_path, make_cfg):
    cfg = make_cfg()
    models = {lay: _load(_write(tmp_path / lay, cfg, lay))[0] for lay in LAYOUTS}
    ref = dict(models["hf"].named_parameters())
    for name, p in ref.items():  # the loaded values are the generator's, in the in-memory orientation
        assert torch.equal(p, synthetic_param(name, tuple(p.shape), 3, torch.float32)), name
    want = logits(models["hf"], IDS)
    for lay in ("released", "per-expert"):
        got = dict(models[lay].named_parameters())
        assert got.keys() == ref.keys()
        for name in ref:
            assert torch.equal(got[name], ref[name]), (lay, name)
        assert torch.equal(logits(models[lay], IDS), want)


def test_stored_orientation_differs_between_layouts(tmp_path):
    """The layouts really are different on disk (else the test above proves nothing)."""
    cfg = odd_cfg()
    key = L + "0.mlp.experts.gate_up_proj"
    shapes = {}
    for lay in ("hf", "released"):
        ckpt = open_checkpoint(_write(tmp_path / lay, cfg, lay))
        shapes[lay] = ckpt.info(key).shape
    assert shapes == {"hf": (8, 48, 64), "released": (8, 64, 48)}
    per = open_checkpoint(_write(tmp_path / "pe", cfg, "per-expert"))
    assert key not in per.weight_map and per.info(L + "0.mlp.experts.7.up_proj.weight").shape == (24, 64)


def test_bf16_checkpoint_converts_to_requested_dtype(tmp_path):
    import dataclasses
    d = _write(tmp_path / "bf", dataclasses.replace(small_cfg(), torch_dtype="bfloat16"), "released")
    ckpt = open_checkpoint(d)
    assert ckpt.info("lm_head.weight").dtype == "BF16"
    m, _, _ = _load(d)  # default: the config's dtype
    assert {p.dtype for p in m.parameters()} == {torch.bfloat16}
    m32, _, _ = _load(d, dtype=torch.float32)
    name = L + "1.mlp.experts.down_proj"
    p32, p16 = dict(m32.named_parameters())[name], dict(m.named_parameters())[name]
    assert p32.dtype == torch.float32 and torch.equal(p32, p16.float())


def test_meta_parameters_become_real_and_frozen(ckpt_dir):
    m, _, report = _load(ckpt_dir)
    params = list(m.parameters())
    assert all(p.device.type == "cpu" and not p.requires_grad for p in params)
    assert report.params == len(params) and report.bytes == sum(p.numel() * 4 for p in params)


# --------------------------------------------------------------------------------------------------------------------
# A stage reads only its own shards and tensors


def test_stage_opens_only_its_shards(tmp_path, monkeypatch):
    d = _write(tmp_path / "ck", layout="per-expert", shard_bytes=60_000)
    read = []
    orig = ShardReader.read
    monkeypatch.setattr(ShardReader, "read", lambda self, info, index=None: read.append(info.name) or orig(self, info, index))
    m, ckpt, report = _load(d, layers=(2, 4), vision=False, embed=False)
    wm = index(d)["weight_map"]
    mine = {k for k in wm if k.startswith((L + "2.", L + "3.", "model.language_model.norm.", "lm_head."))}
    assert sorted(read) == sorted(mine)                               # exactly the stage's tensors, each once
    assert sorted(ckpt.opened) == report.files == sorted({wm[k] for k in mine})
    assert len(set(wm.values())) > len(ckpt.opened) + 2                # and there were other shards to avoid


def test_keys_of_other_stages_are_not_this_stages_business(ckpt_dir):
    key = L + "3.self_attn.q_proj.weight"
    edit_shard(ckpt_dir, key, lambda t: t.pop(key))
    _load(ckpt_dir, layers=(0, 3), head=False)                         # layer 3 belongs to the next stage
    with pytest.raises(E.MissingKeyError):
        _load(ckpt_dir, layers=(3, 4), vision=False, embed=False)


# --------------------------------------------------------------------------------------------------------------------
# Errors: one line, naming file and tensor


def _no_data_read(monkeypatch):
    def fail(self, info, index=None):
        raise AssertionError(f"read {info.name} before validation finished")
    monkeypatch.setattr(ShardReader, "read", fail)


def test_missing_key(ckpt_dir, monkeypatch):
    key = L + "1.self_attn.q_proj.weight"
    edit_shard(ckpt_dir, key, lambda t: t.pop(key))
    _no_data_read(monkeypatch)
    with pytest.raises(E.MissingKeyError) as e:
        _load(ckpt_dir, layers=(0, 3), head=False, stage_name="stage 0 (layers 0-2)")
    assert str(e.value) == f"missing key {key} in {ckpt_dir / INDEX_NAME}: needed by stage 0 (layers 0-2)"


def test_missing_per_expert_key_names_its_parameter(tmp_path):
    d = _write(tmp_path / "pe", layout="per-expert")
    key = L + "2.mlp.experts.5.up_proj.weight"
    edit_shard(d, key, lambda t: t.pop(key))
    with pytest.raises(E.MissingKeyError) as e:
        _load(d, layers=(2, 4), vision=False, embed=False)
    assert str(e.value) == (f"missing key {key} (part of parameter {L}2.mlp.experts.gate_up_proj) in "
                            f"{d / INDEX_NAME}: needed by stage (layers 2-3, head)")


def test_unexpected_key(ckpt_dir, monkeypatch):
    key = L + "1.mlp.shared_expert.weight"
    path = edit_shard(ckpt_dir, L + "1.mlp.gate.weight", lambda t: t.update({key: torch.zeros(4, 4)}))
    _no_data_read(monkeypatch)
    with pytest.raises(E.UnexpectedKeyError) as e:
        _load(ckpt_dir, layers=(0, 3), head=False, stage_name="stage 0")
    assert str(e.value) == (f"unexpected key {key} in {path}: it belongs to stage 0 but no parameter of the stage "
                            f"uses it")


def test_stray_key_is_reported_by_the_embedding_stage_only(ckpt_dir):
    key = "model.rotary_emb.inv_freq"
    edit_shard(ckpt_dir, "lm_head.weight", lambda t: t.update({key: torch.zeros(8)}))
    _load(ckpt_dir, layers=(3, 4), vision=False, embed=False)
    with pytest.raises(E.UnexpectedKeyError, match="unexpected key model.rotary_emb.inv_freq in "):
        _load(ckpt_dir, layers=(0, 3), head=False)


def test_shape_mismatch(ckpt_dir, monkeypatch):
    key = L + "2.self_attn.o_proj.weight"
    path = edit_shard(ckpt_dir, key, lambda t: t.update({key: torch.zeros(64, 65)}))
    _no_data_read(monkeypatch)
    with pytest.raises(E.ShapeMismatchError) as e:
        _load(ckpt_dir)
    assert str(e.value) == f"shape mismatch for {key} in {path}: expected [64, 64], found [64, 65]"


def test_fused_experts_fitting_no_orientation(ckpt_dir):
    key = L + "0.mlp.experts.down_proj"
    path = edit_shard(ckpt_dir, key, lambda t: t.update({key: torch.zeros(8, 64, 30)}))
    with pytest.raises(E.ShapeMismatchError) as e:
        _load(ckpt_dir)
    gate_up = shard_of(ckpt_dir, L + "0.mlp.experts.gate_up_proj")
    assert str(e.value) == (
        f"shape mismatch: fused experts of layer 0 fit no known orientation: found {key} [8, 64, 30] in {path}, "
        f"{L}0.mlp.experts.gate_up_proj [8, 64, 64] in {gate_up}; expected hf: gate_up_proj [8, 64, 64], "
        f"down_proj [8, 64, 32]; released: gate_up_proj [8, 64, 64], down_proj [8, 32, 64]")


def test_mixed_fused_and_per_expert(ckpt_dir):
    key = L + "1.mlp.experts.0.down_proj.weight"
    path = edit_shard(ckpt_dir, L + "1.mlp.experts.down_proj", lambda t: t.update({key: torch.zeros(64, 32)}))
    with pytest.raises(E.LayoutError) as e:
        _load(ckpt_dir)
    fused = shard_of(ckpt_dir, L + "1.mlp.experts.gate_up_proj")
    assert str(e.value) == (f"layer 1 stores experts both fused ({L}1.mlp.experts.gate_up_proj in {fused}) and per "
                            f"expert ({key} in {path})")


def test_integer_tensor(ckpt_dir, monkeypatch):
    key = L + "0.input_layernorm.weight"
    path = edit_shard(ckpt_dir, key, lambda t: t.update({key: torch.ones(64, dtype=torch.int32)}))
    _no_data_read(monkeypatch)
    with pytest.raises(E.DtypeError) as e:
        _load(ckpt_dir)
    assert str(e.value) == f"{key} in {path} has dtype I32, which cannot be converted to a floating-point parameter"


def test_config_num_experts_disagrees(ckpt_dir, monkeypatch):
    cfg_path = edit_config(ckpt_dir, lambda c: c["text_config"].update(num_experts=4))
    _no_data_read(monkeypatch)
    with pytest.raises(E.ConfigMismatchError) as e:
        _load(ckpt_dir, layers=(1, 2), vision=False, embed=False, head=False)
    key = L + "1.mlp.gate.weight"
    assert str(e.value) == (f"config mismatch: {cfg_path} says text_config.num_experts = 4, but {key} in "
                            f"{shard_of(ckpt_dir, key)} has shape [8, 64]")


def test_config_hidden_size_disagrees(ckpt_dir):
    def shrink(c):
        c["text_config"].update(hidden_size=32, head_dim=8)
        c["text_config"]["rope_parameters"]["mrope_section"] = [2, 1, 1]
        c["vision_config"]["out_hidden_size"] = 32
    cfg_path = edit_config(ckpt_dir, shrink)
    with pytest.raises(E.ConfigMismatchError) as e:
        _load(ckpt_dir, layers=(0, 1), vision=False, embed=False, head=False)
    key = L + "0.input_layernorm.weight"
    assert str(e.value) == (f"config mismatch: {cfg_path} says text_config.hidden_size = 32, but {key} in "
                            f"{shard_of(ckpt_dir, key)} has shape [64]")


def test_config_with_fewer_layers_than_checkpoint(ckpt_dir):
    cfg_path = edit_config(ckpt_dir, lambda c: c["text_config"].update(num_hidden_layers=3))
    with pytest.raises(E.ConfigMismatchError) as e:
        _load(ckpt_dir, layers=(0, 3))
    key = max(k for k in index(ckpt_dir)["weight_map"] if k.startswith(L + "3."))
    assert str(e.value) == (f"config mismatch: {cfg_path} says text_config.num_hidden_layers = 3, but the checkpoint "
                            f"has decoder layer 3 ({key} in {shard_of(ckpt_dir, key)})")


def test_index_names_absent_shard(ckpt_dir):
    path = shard_of(ckpt_dir, "lm_head.weight")
    os.remove(path)
    first = next(k for k, v in index(ckpt_dir)["weight_map"].items() if v == os.path.basename(path))
    with pytest.raises(E.CheckpointError) as e:
        open_checkpoint(ckpt_dir)
    assert str(e.value) == (f"{ckpt_dir / INDEX_NAME}: names shard {os.path.basename(path)} (holding {first}), "
                            f"which does not exist in {ckpt_dir}")


def test_not_a_checkpoint(tmp_path, ckpt_dir):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError) as e:
        open_checkpoint(tmp_path / "empty")
    assert str(e.value) == f"{tmp_path / 'empty' / 'config.json'}: no config.json (not a Hugging Face model directory)"
    # architectures naming Qwen3-VL-MoE do not help: transformers would read this config.json as a llama model
    cfg_path = edit_config(ckpt_dir, lambda c: c.update(model_type="llama"))
    with pytest.raises(ConfigError) as e:
        open_checkpoint(ckpt_dir)
    assert str(e.value).startswith(f"{cfg_path}: model_type 'llama' is not a Qwen3-VL-MoE model (expected "
                                   f"'qwen3_vl_moe'")


def test_no_weights(ckpt_dir):
    for f in os.listdir(ckpt_dir):
        if f.endswith((".safetensors", ".json")) and f != "config.json":
            os.remove(ckpt_dir / f)
    with pytest.raises(E.CheckpointError) as e:
        open_checkpoint(ckpt_dir)
    assert str(e.value) == f"{ckpt_dir}: no {INDEX_NAME} and no model.safetensors (no weights in this directory)"


def test_cli_prints_one_line_error(ckpt_dir, capsys):
    from qwen_vl_distributed.cli.main import main

    os.remove(shard_of(ckpt_dir, "lm_head.weight"))
    assert main(["inspect", str(ckpt_dir)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "does not exist" in err
