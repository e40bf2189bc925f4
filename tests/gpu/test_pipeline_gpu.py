"""The pipeline on a GPU (CUDA graphs, fused layers, stages sharing the GPU over gloo where there is one GPU, NCCL
where each stage has its own): in float32, S = 2 with prompts prefilled in 16-token chunks and a second turn that
takes the first turn's blocks from the prefix cache give the tokens of S = 1 on whole prompts; and an fp8
checkpoint's experts kept in fp8 give the tokens of the same experts dequantised at load.

Only in float32: in bfloat16 a chunk or a suffix runs other kernel shapes than the whole prompt (attention over the
cache, other expert tiles), whose roundings can flip a near-tie of a random model's logits (docs/parity.md). The
bfloat16 pipeline against S = 1 (same chunking) is in test_hf_parity_gpu.py.
"""

from __future__ import annotations

import pytest
import torch

from mm_inputs import chat, image_tokens, pixels, video_tokens
from qwen_vl_distributed.cli.synth import synthesize
from qwen_vl_distributed.engine.build import RunOptions, start_engine
from qwen_vl_distributed.engine.engine import Prompt
from qwen_vl_distributed.engine.sampling import SamplingParams

pytestmark = pytest.mark.gpu
PATCH = 1536  # the tiny preset's patch row: 3 channels x 2 frames x 16 x 16
GREEDY = SamplingParams(temperature=0.0, max_new_tokens=16)
SEEDED = SamplingParams(temperature=0.8, top_p=0.9, top_k=50, seed=7, max_new_tokens=16)


def requests() -> list[Prompt]:
    toks = [100] + image_tokens(4, 4) + [200] + image_tokens(6, 10) + [300]
    return [Prompt(chat([100, 2000, 30000, 400, 5])), Prompt(chat(toks), None, pixels(76, PATCH, 1),
                                                              [(1, 4, 4), (1, 6, 10)]),
            Prompt(chat(video_tokens(2, 4, 6) + [7]), None, None, None, pixels(48, PATCH, 2), [(2, 4, 6)]),
            Prompt(chat([9] * 40)), Prompt(chat([11, 12]))]


FIRST = chat([100] + image_tokens(4, 4) + [200]) + [151667, 11, 151668, 13, 14]  # a turn and its answer
FIRST_PIXELS = pixels(16, PATCH, 1)


def second_turn() -> Prompt:
    """The first turn again, then a new user turn with a new image."""
    ids = FIRST + [151645, 198] + chat([300] + image_tokens(6, 10) + [301])
    return Prompt(ids, None, torch.cat([FIRST_PIXELS, pixels(60, PATCH, 3)]), [(1, 4, 4), (1, 6, 10)])


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return synthesize(str(tmp_path_factory.mktemp("tiny")))


def start(model: str, stages: int, chunk: int | None = None, fp8: str = "auto"):
    return start_engine(RunOptions(model=model, stages=stages, device="cuda", dtype="float32", max_batch=4,
                                   max_len=256, max_total_tokens=1024, prefill_chunk=chunk, fp8_experts=fp8,
                                   quiet=True))


def run(handle, prompts: list[Prompt]) -> list[list[int]]:
    seqs = [handle.engine.add(p, GREEDY if i % 2 == 0 else SEEDED) for i, p in enumerate(prompts)]
    handle.engine.run_until_done()
    return [s.output for s in seqs]


def test_chunked_pipeline_and_prefix_cache_equal_single_stage_whole_prompts(tiny):
    one = start(tiny, 1)
    try:
        cold = run(one, [second_turn()])[0]  # the second turn alone: nothing cached to reuse
        whole = run(one, requests())
    finally:
        one.close()
    two = start(tiny, 2, chunk=16)
    try:
        run(two, [Prompt(FIRST, None, FIRST_PIXELS, [(1, 4, 4)])])
        seq = two.engine.add(second_turn(), GREEDY)
        two.engine.run_until_done()
        chunked = run(two, requests())
    finally:
        two.close()
    assert seq.cached_tokens > 0, "the second turn took nothing of the first turn's from the prefix cache"
    assert seq.output == cold
    assert chunked == whole


def test_fp8_experts_kept_give_the_tokens_of_dequantized_ones(tmp_path_factory):
    model = synthesize(str(tmp_path_factory.mktemp("tiny-fp8")), layout="per-expert", fp8=True)
    out = {}
    for mode in ("keep", "dequantize"):
        handle = start(model, 2, fp8=mode)
        try:
            out[mode] = run(handle, requests())
        finally:
            handle.close()
    assert out["keep"] == out["dequantize"]
