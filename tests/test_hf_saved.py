"""Checkpoints written by transformers' own save_pretrained load, and give transformers' greedy tokens (fp32, CPU).

Two held-out shapes (tests/hf_saved.py) x both fused orientations transformers reads (its own, as saved; the
release's, transposed after saving), each at S = 1 in this process and at S = 2 or 3 as separate processes. The
reference is transformers loading the same directory; its load report must be clean, or the comparison would prove
nothing.
"""

from __future__ import annotations

import dataclasses
import json
import os

import pytest
import torch

from hf_saved import EOS, SHAPES, hf_saved_dir
from qwen_vl_distributed.checkpoint import errors as E
from qwen_vl_distributed.checkpoint.index import open_checkpoint
from qwen_vl_distributed.engine.build import RunOptions, start_engine
from qwen_vl_distributed.engine.media import MediaOptions, sample_image_path
from qwen_vl_distributed.engine.processor import Processor, ProcessorFilesError
from qwen_vl_distributed.engine.sampling import SamplingParams
from qwen_vl_distributed.engine.session import to_prompt
from qwen_vl_distributed.model.config import load_config

N_NEW = 16
# every (shape, orientation) at S = 1, and at one pipeline length: 2 and 3 both met by both shapes
RUNS = [(shape, orientation, stages) for shape, orientation, multi in (
    ("hd8-gqa2", "hf", 3), ("hd8-gqa2", "released", 2),
    ("hd12-gqa3-tied-bias", "hf", 2), ("hd12-gqa3-tied-bias", "released", 3)) for stages in (1, multi)]

_reference: dict = {}


def _inputs(model_dir: str):
    processor = Processor.from_pretrained(model_dir, load_config(model_dir), MediaOptions())
    return processor.build_from_prompt("What is in this picture?", [sample_image_path()])


def _hf_tokens(model_dir: str) -> list[int]:
    """transformers' greedy tokens on the same directory (once per directory)."""
    if model_dir not in _reference:
        from transformers import Qwen3VLMoeForConditionalGeneration

        model, report = Qwen3VLMoeForConditionalGeneration.from_pretrained(model_dir, dtype=torch.float32,
                                                                           output_loading_info=True)
        assert not any(report[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), report
        inputs = _inputs(model_dir)
        ids = torch.tensor([inputs.input_ids])
        with torch.no_grad():
            out = model.eval().generate(input_ids=ids, mm_token_type_ids=torch.tensor([inputs.mm_token_type_ids]),
                                        pixel_values=inputs.pixel_values, image_grid_thw=inputs.image_grid_thw,
                                        max_new_tokens=N_NEW, do_sample=False, eos_token_id=EOS, pad_token_id=151643)
        _reference[model_dir] = out[0, ids.shape[1]:].tolist()
    return _reference[model_dir]


def _our_tokens(model_dir: str, stages: int) -> list[int]:
    handle = start_engine(RunOptions(model=model_dir, stages=stages, max_batch=2, max_len=1024, quiet=True,
                                     stage_timeout_s=60))
    try:
        seq = handle.engine.add(to_prompt(_inputs(model_dir)), SamplingParams(temperature=0.0, max_new_tokens=N_NEW))
        handle.engine.run_until_done()
        return seq.output
    finally:
        handle.close()


@pytest.mark.parametrize("shape,orientation,stages", RUNS)
def test_greedy_tokens_equal_transformers(tmp_path_factory, shape, orientation, stages):
    model_dir = hf_saved_dir(tmp_path_factory, shape, orientation)
    ours = _our_tokens(model_dir, stages)
    assert ours == _hf_tokens(model_dir)
    assert len(ours) == N_NEW or ours[-1] in EOS


def test_config_in_transformers_spelling_reads_as_written(tmp_path_factory):
    model_dir = hf_saved_dir(tmp_path_factory, "hd8-gqa2", "hf")
    with open(os.path.join(model_dir, "config.json")) as f:
        written = json.load(f)["text_config"]
    assert "num_experts" not in written and written["num_local_experts"] == 12   # transformers' own spelling
    cfg = load_config(model_dir)
    assert (cfg.text.num_experts, cfg.text.num_experts_per_tok, cfg.text.head_dim) == (12, 3, 8)
    assert (cfg.text.rope_theta, cfg.text.mrope_section) == (1e6, (2, 1, 1))
    assert cfg.vision.deepstack_visual_indexes == (0, 2) and cfg.torch_dtype == "float32"
    assert open_checkpoint(model_dir).cfg == cfg


def test_merged_processor_config_is_checked_against_the_config(tmp_path_factory):
    model_dir = hf_saved_dir(tmp_path_factory, "hd8-gqa2", "hf")
    assert not os.path.exists(os.path.join(model_dir, "preprocessor_config.json"))
    cfg = load_config(model_dir)
    bad = dataclasses.replace(cfg, vision=dataclasses.replace(cfg.vision, spatial_merge_size=4))
    with pytest.raises(ProcessorFilesError) as e:
        Processor.from_pretrained(model_dir, bad)
    assert str(e.value) == (f"{model_dir}/processor_config.json (image_processor): merge_size 2 does not match "
                            f"config.json vision_config (4)")


def test_a_wrong_aliased_field_is_named(tmp_path_factory, tmp_path):
    """config.json in transformers' spelling disagreeing with the tensors: the error names our field."""
    src = hf_saved_dir(tmp_path_factory, "hd12-gqa3-tied-bias", "released")
    d = tmp_path / "ckpt"
    d.mkdir()
    for f in os.listdir(src):
        os.symlink(os.path.join(src, f), d / f)
    with open(os.path.join(src, "config.json")) as f:
        c = json.load(f)
    c["text_config"]["num_local_experts"] = 6
    os.remove(d / "config.json")
    (d / "config.json").write_text(json.dumps(c))
    with pytest.raises(E.ConfigMismatchError, match=r"config.json says text_config.num_experts = 6, but "
                                                    r"model.language_model.layers.0.mlp.gate.weight in "):
        _our_tokens(str(d), 1)


@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_experts_are_read_in_the_orientation_stored(tmp_path_factory, shape):
    """The release orientation really is stored transposed, and both orientations load to the same parameters."""
    from qwen_vl_distributed.checkpoint.inspect import inspect_checkpoint
    from qwen_vl_distributed.checkpoint.loader import load_stage
    from qwen_vl_distributed.model.qwen3_vl import Qwen3VLMoe

    params = {}
    for orientation in ("hf", "released"):
        model_dir = hf_saved_dir(tmp_path_factory, shape, orientation)
        layers = SHAPES[shape]["text"]["num_hidden_layers"]
        assert inspect_checkpoint(model_dir)["coverage"]["expert_layouts"] == {orientation: layers}
        ckpt = open_checkpoint(model_dir)
        with torch.device("meta"):
            model = Qwen3VLMoe(ckpt.cfg)
        load_stage(model, ckpt, "cpu", torch.float32, progress=False)
        params[orientation] = dict(model.named_parameters())
    for name, p in params["hf"].items():
        assert torch.equal(p, params["released"][name]), name
