"""``inspect`` on a header-only full-size 235B checkpoint and on small ones; the key-map docs and spec stay true."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from checkpoint_testlib import L, edit_shard, odd_cfg, small_cfg, stage_model
from qwen_vl_distributed.checkpoint.index import open_checkpoint
from qwen_vl_distributed.checkpoint.inspect import inspect_checkpoint
from qwen_vl_distributed.checkpoint.keymap import markdown_table, params_table
from qwen_vl_distributed.checkpoint.matching import plan_load
from qwen_vl_distributed.checkpoint.spec import StageParts, param_shapes
from qwen_vl_distributed.checkpoint.synth_weights import write_header_only_checkpoint, write_synthetic_weights
from qwen_vl_distributed.cli.main import main
from qwen_vl_distributed.model.config import preset
from qwen_vl_distributed.pipeline.plan import plan_stages

PARAMS_235B = 235_670_022_896


@pytest.fixture(scope="module")
def big(tmp_path_factory):
    """The 235B-A22B checkpoint as released (fused experts input-major): real headers, sparse data, ~100 shards."""
    d = tmp_path_factory.mktemp("big")
    write_header_only_checkpoint(d, preset("235b-a22b"), layout="released", shard_bytes=5 << 30)
    return d


def test_preset_param_count():
    shapes = param_shapes(preset("235b-a22b"))
    assert len(shapes) == 1388 and sum(torch.Size(s).numel() for s in shapes.values()) == PARAMS_235B


def test_inspect_full_size_headers(big):
    plan = plan_stages(preset("235b-a22b"), 4, require_fit=False)
    r = inspect_checkpoint(big, [StageParts((s.start, s.stop), s.holds_vision, s.holds_embed, s.holds_head)
                                 for s in plan.stages])
    assert r["architecture"] == "Qwen3VLMoeForConditionalGeneration"
    assert (r["tensors"], r["params"], r["coverage"]["expected_params"]) == (1388, PARAMS_235B, PARAMS_235B)
    assert 90 <= r["shards"] <= 110
    assert r["bytes_by_dtype"] == {"BF16": 2 * PARAMS_235B} and r["fp8"] is False
    cov = r["coverage"]
    assert (cov["missing"], cov["unexpected"], cov["problems"]) == (0, 0, 0)
    assert cov["expert_layouts"] == {"released": 94}
    stages = r["stages"]
    assert [s["holds"] for s in (stages[0], stages[-1])] == ["layers 0-23, vision, embed", "layers 72-93, head"]
    assert sum(s["bytes"] for s in stages) == r["bytes"] and sum(s["tensors"] for s in stages) == 1388


def test_last_stage_plan_opens_only_its_shards(big):
    ckpt = open_checkpoint(big)
    cfg = ckpt.cfg
    parts = StageParts((47, 94), vision=False, embed=False, head=True)
    plan = plan_load(ckpt, param_shapes(cfg, (47, 94), vision=False, embed=False), parts, "stage 1")
    plan.check()
    mine = {f for k, f in ckpt.weight_map.items() if parts.owns(k)}
    assert set(ckpt.opened) == mine == set(plan.files)
    assert len(mine) < len(ckpt.files()) - 40
    assert plan.nbytes == 47 * 2 * 2_487_755_008 + 2 * (4096 + 151936 * 4096)


def test_inspect_reports_missing_and_unexpected(tmp_path):
    d = tmp_path / "ck"
    write_synthetic_weights(d, small_cfg(), seed=0, layout="per-expert", shard_bytes=200_000)
    gone = L + "2.mlp.experts.6.down_proj.weight"
    extra = L + "0.mlp.experts.8.down_proj.weight"   # expert 8 of 8: one too many
    edit_shard(d, gone, lambda t: t.pop(gone))
    edit_shard(d, L + "0.mlp.gate.weight", lambda t: t.update({extra: torch.zeros(64, 32)}))
    cov = inspect_checkpoint(d)["coverage"]
    assert (cov["missing"], cov["missing_first"], cov["unexpected"], cov["unexpected_first"]) == (1, [gone], 1, [extra])
    assert cov["expert_layouts"] == {"per-expert": 4}


def test_cli_inspect_text_and_json(tmp_path, capsys):
    d = tmp_path / "ck"
    write_synthetic_weights(d, small_cfg(), seed=0, fp8=True, layout="per-expert")
    assert main(["inspect", str(d), "--stages", "2", "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["fp8"] is True and r["quantization"] == "fp8" and len(r["stages"]) == 2
    assert set(r["bytes_by_dtype"]) == {"F32", "F8_E4M3"}
    assert r["params"] == r["coverage"]["expected_params"]    # fp8 scales are not counted as parameters
    assert main(["inspect", str(d)]) == 0
    out = capsys.readouterr().out
    assert "fp8          yes" in out and "per-expert (4 layers)" in out and "missing      0" in out


def test_docs_embed_the_generated_tables():
    doc = (Path(__file__).parents[1] / "docs" / "weight_mapping.md").read_text()
    assert markdown_table() in doc and params_table() in doc


@pytest.mark.parametrize("stage", [dict(), dict(layers=(0, 3), head=False),
                                   dict(layers=(2, 4), vision=False, embed=False)])
def test_spec_equals_model_parameters(stage):
    for cfg in (small_cfg(), odd_cfg()):
        m = stage_model(cfg, **stage)
        assert {n: tuple(p.shape) for n, p in m.named_parameters()} == param_shapes(cfg, **stage)


def test_spec_equals_model_parameters_235b():
    cfg = preset("235b-a22b")
    m = stage_model(cfg)
    assert {n: tuple(p.shape) for n, p in m.named_parameters()} == param_shapes(cfg)
