"""The pipeline in separate processes (gloo on CPU) equals one process, token for token."""

from __future__ import annotations

import dataclasses

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


GREEDY = SamplingParams(temperature=0.0, max_new_tokens=12)
SEEDED = SamplingParams(temperature=0.8, top_p=0.9, top_k=50, seed=7, max_new_tokens=12)
PENALIZED = SamplingParams(temperature=0.0, repetition_penalty=2.0, max_new_tokens=12)  # prompt history
PARAMS = [GREEDY, SEEDED, PENALIZED, SEEDED, GREEDY]


def _run(model_dir: str, stages: int, layers=None, prefill_chunk=None, **kv) -> list[list[int]]:
    """The five requests at once; ``kv``: KV-cache options (max_total_tokens, kv_block_size, prefix_cache)."""
    opts = RunOptions(model=model_dir, stages=stages, max_batch=8, max_len=256, quiet=True, layers_per_stage=layers,
                      stage_timeout_s=30, prefill_chunk=prefill_chunk, **kv)
    handle = start_engine(opts)
    try:
        seqs = [handle.engine.add(p, PARAMS[i]) for i, p in enumerate(_requests())]
        peak = _run_recording_peak(handle.engine)
        stats = handle.engine.executor.stage_stats()
        assert [s["stage"] for s in stats] == list(range(stages))
        assert all(s["busy_s"] > 0 for s in stats)
        _run.last = (handle.engine.cache_stats(), peak)
        return [s.output for s in seqs]
    finally:
        handle.close()


def _run_recording_peak(engine) -> int:
    """run_until_done; returns the most sequences that held KV blocks at once."""
    peak = 0
    while engine.has_work():
        engine.step()
        peak = max(peak, len(engine.running))
    return peak


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


@pytest.mark.parametrize("stages", [1, 2])
def test_kv_in_small_blocks_equals_large_blocks(model_dir, single, stages):
    """Blocks of 4 tokens (every sequence spread over many blocks, images across block boundaries) give the
    tokens of the default 16-token blocks."""
    assert _run(model_dir, stages, kv_block_size=4) == single


@pytest.mark.parametrize("stages", [1, 2])
def test_memory_pressure_preempts_and_every_request_ends_with_the_same_tokens(model_dir, single, stages):
    """A KV pool of 80 tokens for five requests that need ~250 together (the largest alone 62): sequences are
    preempted and computed again later, and every one ends with the tokens it has without pressure; at most as
    many run at once as the pool holds."""
    assert _run(model_dir, stages, max_total_tokens=80, kv_block_size=4) == single
    stats, peak = _run.last
    assert stats.blocks == 20 and stats.preemptions > 0 and 1 <= peak < 5
    assert stats.blocks_used == 0  # every block back in the pool


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
    user turn with a second image. ``warm``: the first turn ran in the same engine just before, followed by an
    unrelated request, so the prefix cache holds the shared prefix; else the second prompt runs alone in a fresh
    engine. Returns its tokens and how many prompt tokens came from the cache."""
    handle = start_engine(RunOptions(model=model_dir, stages=stages, max_batch=2, max_len=256, quiet=True,
                                     stage_timeout_s=30, kv_block_size=4))
    try:
        eng = handle.engine
        first = chat([100] + image_tokens(4, 4) + [200])
        answer = [151667, 11, 151668, 13, 14]  # a fixed first answer, so both runs build the same second prompt
        second = first + answer + [151645, 198] + chat([300] + image_tokens(6, 10) + [301])[0:]
        img1, img2 = pixels(16, PATCH, 1), pixels(60, PATCH, 3)
        if warm:
            eng.add(Prompt(first + answer, None, img1, [(1, 4, 4)]), SamplingParams(temperature=0, max_new_tokens=1))
            eng.run_until_done()  # the cache now holds first + answer's whole blocks
            eng.add(Prompt(chat([500 + i for i in range(30)])), SamplingParams(temperature=0, max_new_tokens=3))
            eng.run_until_done()  # unrelated traffic
        s = eng.add(Prompt(second, None, torch.cat([img1, img2]), [(1, 4, 4), (1, 6, 10)]), params)
        eng.run_until_done()
        return s.output, s.cached_tokens
    finally:
        handle.close()


@pytest.mark.parametrize("stages", [1, 2])
@pytest.mark.parametrize("params", [SamplingParams(temperature=0.0, max_new_tokens=10),
                                    SamplingParams(temperature=0.0, repetition_penalty=2.0, max_new_tokens=10)])
def test_a_second_turn_reusing_the_cached_prefix_equals_a_fresh_run(model_dir, stages, params):
    warm, cached = _turn_two(model_dir, stages, params, warm=True)
    cold, none = _turn_two(model_dir, stages, params, warm=False)
    first_len = len(chat([100] + image_tokens(4, 4) + [200])) + 5
    # the first turn's whole blocks, its image included, came from the cache
    assert cached == first_len // 4 * 4 and cached > first_len - 4 and none == 0
    assert warm == cold


@pytest.mark.parametrize("stages", [1, 2])
def test_n_choices_of_one_prompt_share_its_blocks_and_sample_as_alone(model_dir, stages):
    """Three choices of one prompt (one Prompt object, as the server's n adds them), each with its own seed: the
    prompt is computed once but for its last partial block per choice, and each choice's tokens are those of the
    same request alone."""
    prompt = _requests()[1]  # two images
    params = [SamplingParams(temperature=0.8, seed=s, max_new_tokens=8) for s in (1, 2, 3)]
    opts = RunOptions(model=model_dir, stages=stages, max_batch=4, max_len=256, quiet=True, stage_timeout_s=30,
                      kv_block_size=4)
    handle = start_engine(opts)
    try:
        seqs = [handle.engine.add(prompt, p) for p in params]
        handle.engine.run_until_done()
        together = [s.output for s in seqs]
        n = len(prompt.input_ids)
        tail = n - (n - 1) // 4 * 4
        assert handle.engine.cache_stats().computed_tokens == n + 2 * tail
        assert [s.cached_tokens for s in seqs] == [0, n - tail, n - tail]
    finally:
        handle.close()
    handle = start_engine(dataclasses.replace(opts, prefix_cache=False))
    try:
        alone = []
        for p in params:  # one after the other, each computing the prompt whole
            s = handle.engine.add(_requests()[1], p)
            handle.engine.run_until_done()
            alone.append(s.output)
    finally:
        handle.close()
    assert together == alone and len({tuple(t) for t in together}) > 1


def test_stage_threads_share_cpu_cores_and_keep_gpu_stages_to_one():
    from qwen_vl_distributed.engine.threads import stage_threads

    assert stage_threads(torch.device("cpu"), 2, 8) == 4
    assert stage_threads(torch.device("cpu"), 16, 8) == 1
    assert stage_threads(torch.device("cuda", 1), 2, 32) == 1

