"""Parity with HF transformers' Qwen3VLMoeForConditionalGeneration on the same tiny random weights (fp32).

Logits: max abs diff <= 1e-4 at every position. Greedy generation: >= 24 tokens identical to HF generate.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from hf_oracle import hf_model
from mm_inputs import IMG, VID, chat, image_tokens, pixels, video_tokens
from qwen_vl_distributed.engine.engine import Engine, Prompt
from qwen_vl_distributed.engine.sampler import SlotSampler
from qwen_vl_distributed.engine.sampling import SamplingParams
from qwen_vl_distributed.model.batch import SeqLayout
from qwen_vl_distributed.model.config import preset
from qwen_vl_distributed.model.positions import rope_positions, token_types
from qwen_vl_distributed.model.qwen3_vl import Qwen3VLMoe, VisualInputs
from qwen_vl_distributed.pipeline.executor import LocalExecutor
from qwen_vl_distributed.pipeline.stage import StageRuntime

EOS = [151645, 151643]
N_NEW = 24


def odd_config():
    """Odd layer and head counts, and a DeepStack list of 2 taps (not 3)."""
    base = preset("tiny")
    return dataclasses.replace(
        base,
        text=dataclasses.replace(base.text, num_hidden_layers=5, num_attention_heads=3, num_key_value_heads=1),
        vision=dataclasses.replace(base.vision, depth=5, num_heads=1, deepstack_visual_indexes=(3, 1)))


@pytest.fixture(scope="module", params=["tiny", "odd"])
def models(request):
    cfg = preset("tiny") if request.param == "tiny" else odd_config()
    hf = hf_model(cfg, seed=1)
    ours = Qwen3VLMoe(cfg).eval()
    ours.load_state_dict(hf.state_dict(), strict=True)
    return cfg, hf, ours


def _case(name: str):
    """(ids, prompt media) for each parity case."""
    if name == "text":
        return chat([100, 2000, 30000, 400, 5]), {}
    if name == "image":
        return chat(image_tokens(8, 12) + [100, 200]), {"images": [(1, 8, 12)]}
    if name == "images":
        toks = [100] + image_tokens(4, 4) + [200, 300] + image_tokens(6, 10) + [400] + image_tokens(12, 4) + [5]
        return chat(toks), {"images": [(1, 4, 4), (1, 6, 10), (1, 12, 4)]}
    if name == "video":
        return chat(video_tokens(3, 4, 6) + [100]), {"videos": [(3, 4, 6)]}
    raise KeyError(name)


def _inputs(cfg, name: str):
    ids, media = _case(name)
    grids_i, grids_v = media.get("images"), media.get("videos")
    pd = cfg.vision.patch_dim
    pv = pixels(sum(t * h * w for t, h, w in grids_i), pd, 1) if grids_i else None
    pvv = pixels(sum(t * h * w for t, h, w in grids_v), pd, 2) if grids_v else None
    return ids, grids_i, pv, grids_v, pvv


def _hf_kwargs(ids, grids_i, pv, grids_v, pvv):
    t = torch.tensor([ids])
    kw = {"input_ids": t}
    if pv is not None:
        kw.update(pixel_values=pv, image_grid_thw=torch.tensor(grids_i))
    if pvv is not None:
        kw.update(pixel_values_videos=pvv, video_grid_thw=torch.tensor(grids_v))
    if pv is not None or pvv is not None:
        kw["mm_token_type_ids"] = ((t == IMG).int() + 2 * (t == VID).int())
    return kw


def _our_logits(cfg, ours, ids, grids_i, pv, grids_v, pvv):
    types = token_types(ids, cfg.image_token_id, cfg.video_token_id)
    pos, _ = rope_positions(types, grids_i, grids_v, cfg.vision.spatial_merge_size)
    tt = torch.tensor(types)
    vis = None
    if pv is not None or pvv is not None:
        vis = VisualInputs(pv, grids_i, pvv, grids_v, tt == 1, tt == 2)
    cache = ours.new_cache(1, len(ids) + 8)
    with torch.no_grad():
        return ours(positions=pos, layout=SeqLayout([0], [0], [len(ids)]), cache=cache,
                    input_ids=torch.tensor(ids), visual=vis, logits_rows=list(range(len(ids))))


def _engine(cfg, ours, slots=4, max_len=512):
    rt = StageRuntime(ours, ours.new_cache(slots, max_len), SlotSampler(), "cpu")
    return Engine(cfg, LocalExecutor(rt), slots, max_len, EOS)


def _prompt(ids, grids_i, pv, grids_v, pvv):
    return Prompt(list(ids), None, pv, grids_i, pvv, grids_v)


GREEDY = SamplingParams(max_new_tokens=N_NEW, temperature=0.0)


@pytest.mark.parametrize("case", ["text", "image", "images", "video"])
def test_logits_and_greedy_match_hf(models, case):
    cfg, hf, ours = models
    inputs = _inputs(cfg, case)
    with torch.no_grad():
        ref = hf(**_hf_kwargs(*inputs)).logits[0]
    got = _our_logits(cfg, ours, *inputs)
    assert (got - ref).abs().max().item() <= 1e-4

    eng = _engine(cfg, ours)
    seq = eng.add(_prompt(*inputs), GREEDY)
    eng.run_until_done()
    with torch.no_grad():
        ref_tokens = hf.generate(**_hf_kwargs(*inputs), max_new_tokens=N_NEW, do_sample=False, eos_token_id=EOS,
                                 pad_token_id=151643)[0, len(inputs[0]):].tolist()
    assert seq.output == ref_tokens
    assert len(seq.output) == N_NEW or seq.output[-1] in EOS


def test_batch_of_two_prompts_matches_hf_left_padded(models):
    cfg, hf, ours = models
    a = _inputs(cfg, "image")
    b = _inputs(cfg, "text")
    pad = len(a[0]) - len(b[0])
    ids = torch.tensor([a[0], [151643] * pad + b[0]])
    mask = torch.tensor([[1] * len(a[0]), [0] * pad + [1] * len(b[0])])
    mm = (ids == IMG).int()
    with torch.no_grad():
        ref = hf.generate(input_ids=ids, attention_mask=mask, pixel_values=a[2], image_grid_thw=torch.tensor(a[1]),
                          mm_token_type_ids=mm, max_new_tokens=N_NEW, do_sample=False, eos_token_id=EOS,
                          pad_token_id=151643)[:, ids.shape[1]:].tolist()
    eng = _engine(cfg, ours)
    sa = eng.add(_prompt(*a), GREEDY)
    sb = eng.add(_prompt(*b), GREEDY)
    eng.run_until_done()
    for seq, r in ((sa, ref[0]), (sb, ref[1])):
        r = r[:len(seq.output)]  # HF pads a row that stopped early
        assert seq.output == r
