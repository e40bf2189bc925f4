"""The pipeline in separate processes (gloo on CPU) equals one process, token for token."""

from __future__ import annotations

import pytest
import torch

from mm_inputs import chat, image_tokens, pixels, video_tokens
from qwen_vl_distributed.engine.build import RunOptions, start_engine
from qwen_vl_distributed.engine.engine import Prompt
from qwen_vl_distributed.engine.sampling import SamplingParams
from synth_model import tiny_model_dir

PATCH = 1536


def _requests():
    """Text, several images, a video, and prompts of different lengths, all sent at once."""
    imgs = [(1, 4, 4), (1, 6, 10)]
    toks = [100] + image_tokens(4, 4) + [200] + image_tokens(6, 10) + [300]
    vid = [(2, 4, 6)]
    return [
        Prompt(chat([100, 2000, 30000, 400, 5])),
        Prompt(chat(toks), None, pixels(16 + 60, PATCH, 1), imgs),
        Prompt(chat(video_tokens(2, 4, 6) + [7]), None, None, None, pixels(48, PATCH, 2), vid),
        Prompt(chat([9] * 40)),
        Prompt(chat([11, 12])),
    ]


def _run(model_dir: str, stages: int, layers=None, prefill_chunk=None) -> list[list[int]]:
    opts = RunOptions(model=model_dir, stages=stages, max_batch=8, max_len=256, quiet=True, layers_per_stage=layers,
                      stage_timeout_s=30, prefill_chunk=prefill_chunk)
    handle = start_engine(opts)
    try:
        greedy = SamplingParams(temperature=0.0, max_new_tokens=12)
        seeded = SamplingParams(temperature=0.8, top_p=0.9, top_k=50, seed=7, max_new_tokens=12)
        penalized = SamplingParams(temperature=0.0, repetition_penalty=2.0, max_new_tokens=12)  # prompt history
        params = [greedy, seeded, penalized, seeded, greedy]
        seqs = [handle.engine.add(p, params[i]) for i, p in enumerate(_requests())]
        handle.engine.run_until_done()
        stats = handle.engine.executor.stage_stats()
        assert [s["stage"] for s in stats] == list(range(stages))
        assert all(s["busy_s"] > 0 for s in stats)
        return [s.output for s in seqs]
    finally:
        handle.close()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tiny_model_dir(tmp_path_factory)


@pytest.fixture(scope="module")
def single(model_dir):
    return _run(model_dir, 1)


@pytest.mark.parametrize("stages,layers", [(2, None), (3, None), (4, None), (2, [5, 1])])
def test_pipeline_equals_single_process(model_dir, single, stages, layers):
    assert _run(model_dir, stages, layers) == single


@pytest.mark.parametrize("stages,chunk", [(1, 16), (2, 16), (1, 5)])
def test_chunked_prefill_equals_whole_prompts(model_dir, single, stages, chunk):
    """Prompts prefilled over several steps (chunks of a few tokens; images and the video whole, never split) give
    the tokens of whole-prompt steps: greedy, seeded and with a repetition penalty over the prompt."""
    assert _run(model_dir, stages, prefill_chunk=chunk) == single


def test_idle_pipeline_stays_up_past_the_stage_timeout(model_dir):
    """Heartbeats keep idle stages' waits bounded without declaring anyone dead."""
    import time

    handle = start_engine(RunOptions(model=model_dir, stages=2, max_batch=2, max_len=64, quiet=True,
                                     stage_timeout_s=2))
    try:
        t_end = time.monotonic() + 6
        while time.monotonic() < t_end:
            handle.engine.step()  # nothing to do: the executor sends heartbeats
            time.sleep(0.05)
        seq = handle.engine.add(Prompt(chat([5, 6])), SamplingParams(temperature=0.0, max_new_tokens=3))
        handle.engine.run_until_done()
        assert len(seq.output) == 3
    finally:
        handle.close()


def _turn_two(model_dir: str, stages: int, params: SamplingParams, warm: bool) -> tuple[list[int], int]:
    """A two-turn chat with an image: the second prompt re-sends the first turn and its answer, then adds a new
    user turn with a second image. ``warm``: the first turn ran in the same engine just before, so its slot's cache
    holds the shared prefix; else the second prompt runs alone in a fresh engine. Returns its tokens and how many
    prompt tokens came from the cache."""
    handle = start_engine(RunOptions(model=model_dir, stages=stages, max_batch=2, max_len=256, quiet=True,
                                     stage_timeout_s=30))
    try:
        eng = handle.engine
        first = chat([100] + image_tokens(4, 4) + [200])
        answer = [151667, 11, 151668, 13, 14]  # a fixed first answer, so both runs build the same second prompt
        second = first + answer + [151645, 198] + chat([300] + image_tokens(6, 10) + [301])[0:]
        img1, img2 = pixels(16, PATCH, 1), pixels(60, PATCH, 3)
        if warm:
            eng.add(Prompt(first + answer, None, img1, [(1, 4, 4)]), SamplingParams(temperature=0, max_new_tokens=1))
            eng.run_until_done()  # the slot now caches first + answer (its sampled token's KV is never written)
        s = eng.add(Prompt(second, None, torch.cat([img1, img2]), [(1, 4, 4), (1, 6, 10)]), params)
        eng.run_until_done()
        return s.output, s.reused
    finally:
        handle.close()


@pytest.mark.parametrize("stages", [1, 2])
@pytest.mark.parametrize("params", [SamplingParams(temperature=0.0, max_new_tokens=10),
                                    SamplingParams(temperature=0.0, repetition_penalty=2.0, max_new_tokens=10)])
def test_a_second_turn_reusing_the_cached_prefix_equals_a_fresh_run(model_dir, stages, params):
    warm, reused = _turn_two(model_dir, stages, params, warm=True)
    cold, none = _turn_two(model_dir, stages, params, warm=False)
    first_len = len(chat([100] + image_tokens(4, 4) + [200])) + 5
    assert reused == first_len and none == 0  # the whole first turn, its image included, came from the cache
    assert warm == cold


def test_stage_threads_share_cpu_cores_and_keep_gpu_stages_to_one():
    from qwen_vl_distributed.engine.threads import stage_threads

    assert stage_threads(torch.device("cpu"), 2, 8) == 4
    assert stage_threads(torch.device("cpu"), 16, 8) == 1
    assert stage_threads(torch.device("cuda", 1), 2, 32) == 1

