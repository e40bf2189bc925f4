"""FP8 block-wise checkpoints: dequantisation (partial edge blocks), loading, and fp8-specific errors."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from checkpoint_testlib import L, edit_config, edit_shard, index, odd_cfg, shard_of, stage_model
from qwen_vl_distributed.checkpoint import errors as E
from qwen_vl_distributed.model.quant import dequantize_blockwise, quantize_blockwise
from qwen_vl_distributed.checkpoint.index import open_checkpoint
from qwen_vl_distributed.checkpoint.loader import load_stage
from qwen_vl_distributed.checkpoint.synth_weights import synthetic_param, write_synthetic_weights

BLOCK = (16, 16)


def _naive_dequant(w: torch.Tensor, s: torch.Tensor, block) -> torch.Tensor:
    """Independent reference: gather each element's scale by integer block index."""
    r = torch.arange(w.shape[0]) // block[0]
    c = torch.arange(w.shape[1]) // block[1]
    return w.float() * s[r[:, None], c[None, :]]


def test_dequantize_partial_edge_blocks():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(300, 200, generator=g).to(torch.float8_e4m3fn)       # 300 = 2*128 + 44, 200 = 128 + 72
    s = torch.rand(3, 2, generator=g) + 0.5
    got = dequantize_blockwise(w, s, (128, 128), torch.float32)
    assert torch.equal(got, _naive_dequant(w, s, (128, 128)))
    assert got[299, 199] == w[299, 199].float() * s[2, 1]                  # the corner of the partial block


def test_quantize_roundtrip_error_bound():
    w = torch.randn(70, 45, generator=torch.Generator().manual_seed(1)) * 0.02
    q, s = quantize_blockwise(w, BLOCK)
    assert q.dtype == torch.float8_e4m3fn and s.shape == (5, 3)
    back = dequantize_blockwise(q, s, BLOCK, torch.float32)
    # e4m3: 3 mantissa bits -> relative error <= 2^-4 for normals; subnormal spacing 2^-9 in units of the scale
    per_elem_scale = _naive_dequant(torch.ones_like(w), s, BLOCK)
    assert torch.all((back - w).abs() <= w.abs() * 2**-4 + per_elem_scale * 2**-9)
    assert not torch.equal(back, w)


@pytest.fixture(scope="module")
def fp8_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("fp8")
    write_synthetic_weights(d, odd_cfg(BLOCK), seed=5, layout="per-expert", fp8=True, shard_bytes=100_000)
    return d


def _stored(d, key: str) -> torch.Tensor:
    with safe_open(str(shard_of(d, key)), framework="pt") as f:
        return f.get_tensor(key)


def test_fp8_checkpoint_format(fp8_dir):
    with open(fp8_dir / "config.json") as f:
        q = json.load(f)["quantization_config"]
    assert q["quant_method"] == "fp8" and q["weight_block_size"] == [16, 16]
    assert {"lm_head", "model.visual", f"{L}0.mlp.gate"} <= set(q["modules_to_not_convert"])
    ckpt = open_checkpoint(fp8_dir)
    w, s = ckpt.info(L + "1.mlp.experts.3.gate_proj.weight"), ckpt.info(L + "1.mlp.experts.3.gate_proj.weight_scale_inv")
    assert (w.dtype, w.shape, s.dtype, s.shape) == ("F8_E4M3", (24, 64), "F32", (2, 4))
    for kept in ("lm_head.weight", L + "1.mlp.gate.weight", L + "1.input_layernorm.weight", "model.visual.pos_embed.weight"):
        assert ckpt.info(kept).dtype == "F32" and kept + "_scale_inv" not in ckpt.weight_map


def test_fp8_loads_to_dequantised_reference(fp8_dir):
    ckpt = open_checkpoint(fp8_dir)
    m = stage_model(ckpt.cfg, layers=(1, 3), vision=False, embed=False, head=False)
    load_stage(m, ckpt, progress=False)
    p = dict(m.named_parameters())
    I = 24
    for e in (0, 7):
        for proj, rows in (("gate_proj", slice(0, I)), ("up_proj", slice(I, 2 * I))):
            key = f"{L}2.mlp.experts.{e}.{proj}.weight"
            ref = _naive_dequant(_stored(fp8_dir, key), _stored(fp8_dir, key + "_scale_inv"), BLOCK)
            assert torch.equal(p[L + "2.mlp.experts.gate_up_proj"][e, rows], ref)
        key = f"{L}2.mlp.experts.{e}.down_proj.weight"
        ref = _naive_dequant(_stored(fp8_dir, key), _stored(fp8_dir, key + "_scale_inv"), BLOCK)
        assert torch.equal(p[L + "2.mlp.experts.down_proj"][e], ref)
    key = L + "1.self_attn.k_proj.weight"
    assert torch.equal(p[key], _naive_dequant(_stored(fp8_dir, key), _stored(fp8_dir, key + "_scale_inv"), BLOCK))


def test_fp8_error_bound_vs_original_weights(fp8_dir):
    ckpt = open_checkpoint(fp8_dir)
    m = stage_model(ckpt.cfg, layers=(0, 1), vision=False, embed=False, head=False)
    load_stage(m, ckpt, progress=False)
    for name, p in m.named_parameters():
        orig = synthetic_param(name, tuple(p.shape), 5, torch.float32)
        if name.endswith(("proj.weight", "gate_up_proj", "down_proj")):        # quantised: close, not equal
            amax = orig.abs().max()
            assert (p - orig).abs().max() <= amax * 2**-4 and not torch.equal(p, orig), name
        else:                                                                  # norms, router: untouched
            assert torch.equal(p, orig), name


@pytest.fixture
def fp8_copy(fp8_dir, tmp_path):
    """A private copy of the FP8 checkpoint that a test may break."""
    import shutil

    d = tmp_path / "ck"
    shutil.copytree(fp8_dir, d)
    return d


def test_fp8_without_scale(fp8_copy):
    d = fp8_copy
    key = L + "0.self_attn.q_proj.weight"
    edit_shard(d, key + "_scale_inv", lambda t: t.pop(key + "_scale_inv"))
    ckpt = open_checkpoint(d)
    with pytest.raises(E.DtypeError) as e:
        load_stage(stage_model(ckpt.cfg, layers=(0, 1), vision=False, embed=False, head=False), ckpt, progress=False)
    assert str(e.value) == (f"{key} in {shard_of(d, key)} is F8_E4M3 but its scale {key}_scale_inv is not in the "
                            f"checkpoint, so it cannot be dequantised")


def test_fp8_scale_of_wrong_shape(fp8_copy):
    d = fp8_copy
    key = L + "0.mlp.experts.2.down_proj.weight_scale_inv"
    path = edit_shard(d, key, lambda t: t.update({key: torch.ones(4, 1)}))
    ckpt = open_checkpoint(d)
    with pytest.raises(E.ShapeMismatchError) as e:
        load_stage(stage_model(ckpt.cfg, layers=(0, 1), vision=False, embed=False, head=False), ckpt, progress=False)
    assert str(e.value) == (f"shape mismatch for {key} in {path}: expected [4, 2] (16x16 blocks of [64, 24]), "
                            f"found [4, 1]")


def test_fp8_tensors_without_quantization_config(fp8_copy):
    d = fp8_copy
    cfg_path = edit_config(d, lambda c: c.pop("quantization_config"))
    ckpt = open_checkpoint(d)
    key = L + "3.self_attn.q_proj.weight"
    with pytest.raises(E.ConfigMismatchError) as e:
        load_stage(stage_model(ckpt.cfg, layers=(3, 4), vision=False, embed=False, head=False), ckpt, progress=False)
    assert str(e.value) == (f"config mismatch: {key} in {shard_of(d, key)} is F8_E4M3, but {cfg_path} has no "
                            f"quantization_config with quant_method 'fp8'")


def test_fp8_needs_per_expert_layout(tmp_path):
    with pytest.raises(E.CheckpointError, match="use layout 'per-expert', not 'hf'"):
        write_synthetic_weights(tmp_path, odd_cfg(), layout="hf", fp8=True)


def test_scale_count_matches_quantised_weights(fp8_dir):
    wm = index(fp8_dir)["weight_map"]
    scales = [k for k in wm if k.endswith("_scale_inv")]
    cfg = odd_cfg()
    assert len(scales) == cfg.text.num_hidden_layers * (4 + 3 * cfg.text.num_experts)
    assert all(k[: -len("_scale_inv")] in wm for k in scales)  # q/k/v/o + gate/up/down of every expert
