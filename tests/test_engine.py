"""The engine's scheduling with a scripted executor: micro-batch groups in flight, continuous batching, aborts, KV
blocks (admission, growth, preemption), the prefix cache and the n choices of one prompt."""

from __future__ import annotations

from collections import deque

import pytest
import torch

from qwen_vl_distributed.engine.engine import Engine, Prompt, PromptError
from qwen_vl_distributed.engine.sampling import SamplingParams
from qwen_vl_distributed.model.config import preset
from qwen_vl_distributed.pipeline.payload import TokenPayload


class ScriptedPipeline:
    """Answers every sequence with token 7; tokens come back only after ``depth`` more steps were submitted (as in
    an S-stage pipeline), so the engine must keep several steps in flight."""

    def __init__(self, stages: int):
        self.num_stages = stages
        self.queue: deque = deque()
        self.max_in_flight = 0
        self.steps = []

    def submit(self, p):
        self.steps.append(p)
        self.queue.append(TokenPayload("tokens", p.mb, torch.full((len(p.seq_ids),), 7)))
        self.max_in_flight = max(self.max_in_flight, len(self.queue))

    def collect(self):
        return self.queue.popleft()

    def idle(self):
        pass

    def stage_stats(self):
        return []


def _engine(stages: int = 1, max_batch: int = 8, max_len: int = 64, **kw):
    ex = ScriptedPipeline(stages)
    return Engine(preset("tiny"), ex, max_batch, max_len, eos_ids=[151645], **kw), ex


def greedy(n: int, **kw) -> SamplingParams:
    return SamplingParams(temperature=0, max_new_tokens=n, **kw)


def test_with_s_stages_and_s_sequences_s_steps_are_in_flight():
    eng, ex = _engine(3)
    seqs = [eng.add(Prompt([1, 2, 3 + i]), greedy(5)) for i in range(3)]
    eng.run_until_done()
    assert ex.max_in_flight == 3
    assert {s.group for s in seqs} == {0, 1, 2}
    assert all(s.output == [7] * 5 and s.finish_reason == "length" for s in seqs)


def test_sequences_join_and_leave_between_steps():
    eng, ex = _engine(max_batch=2)
    a = eng.add(Prompt([1, 2, 3]), greedy(2))
    b = eng.add(Prompt([4, 5]), greedy(6))
    c = eng.add(Prompt([6]), greedy(1))  # waits for a place in the batch
    eng.run_until_done()
    assert [len(s.output) for s in (a, b, c)] == [2, 6, 1]
    assert max(len(p.seq_ids) for p in ex.steps) == 2
    # c is prefilled in the same step as one of b's decodes, after a has left
    mixed = [i for i, p in enumerate(ex.steps) if c.id in p.seq_ids]
    assert mixed and ex.steps[mixed[0]].layout.starts == [3, 0]
    assert all(a.id not in p.seq_ids for p in ex.steps[mixed[0]:])
    assert eng.pool.num_used == 0  # every block back in the pool


def test_decode_positions_follow_the_rope_delta():
    eng, ex = _engine()
    s = eng.add(Prompt([1, 2, 3]), greedy(3))
    s.rope_delta = -1  # as an image prompt would have
    eng.run_until_done()
    decode_steps = ex.steps[1:]
    assert [int(p.positions[0, 0]) for p in decode_steps] == [3 - 1, 4 - 1]
    assert [p.layout.starts for p in decode_steps] == [[3], [4]]


def test_abort_frees_the_blocks_and_the_sampler_state_goes_with_the_next_step():
    eng, ex = _engine(max_batch=1)
    a = eng.add(Prompt([1, 2]), greedy(50))
    eng.step()
    assert eng.pool.num_used == 1
    eng.abort(a)
    assert eng.pool.num_used == 0
    b = eng.add(Prompt([3]), greedy(2))
    eng.run_until_done()
    assert a.finish_reason == "abort" and b.output == [7, 7]
    assert ex.steps[-2].released == [a.id] and ex.steps[-1].released == []


def test_a_step_carries_at_most_max_step_tokens_prompts_go_in_chunks():
    ex = ScriptedPipeline(1)
    eng = Engine(preset("tiny"), ex, 8, 256, eos_ids=[151645], max_step_tokens=100, prefix_cache=False)
    seqs = [eng.add(Prompt(list(range(1, 41))), greedy(3)) for _ in range(4)]
    eng.run_until_done()
    assert all(p.layout.num_tokens <= 100 for p in ex.steps)
    # step 1: two whole prompts and the first 20 tokens of the third; step 2: two decodes, its last 20, the fourth
    assert (ex.steps[0].layout.starts, ex.steps[0].layout.lens) == ([0, 0, 0], [40, 40, 20])
    assert ex.steps[0].open_prompts == [seqs[2].id] and ex.steps[0].continued == []
    assert (ex.steps[1].layout.starts, ex.steps[1].layout.lens) == ([40, 40, 20, 0], [1, 1, 20, 40])
    assert ex.steps[1].continued == [seqs[2].id] and ex.steps[1].open_prompts == []
    assert list(ex.steps[1].new_seqs) == [seqs[3].id]  # sampler state starts with a prompt's first chunk
    assert all(s.output == [7, 7, 7] for s in seqs)  # nothing is taken from a chunk short of the prompt's end
    big = eng.add(Prompt(list(range(1001, 1151))), greedy(1))
    eng.run_until_done()
    assert [p.layout.lens for p in ex.steps[-2:]] == [[100], [50]] and big.output == [7]


def test_chunks_never_split_an_image_or_a_video_frame():
    from mm_inputs import chat, image_tokens, pixels, video_tokens

    cfg = preset("tiny")
    ex = ScriptedPipeline(1)
    eng = Engine(cfg, ex, 4, 256, eos_ids=[151645], max_step_tokens=8)
    imgs, vid = [(1, 4, 4), (1, 6, 10)], [(2, 4, 6)]
    ids = chat([100] + image_tokens(4, 4) + [200] + image_tokens(6, 10) + video_tokens(2, 4, 6) + [300])
    patch = cfg.vision.patch_dim
    s = eng.add(Prompt(ids, None, pixels(76, patch, 1), imgs, pixels(48, patch, 2), vid), greedy(2))
    eng.run_until_done()
    prompt_steps = [p for p in ex.steps if p.layout.starts[0] < len(ids)]
    assert sum(p.layout.num_tokens for p in prompt_steps) == len(ids) and s.output == [7, 7]
    seen = {"img": [], "vid": []}
    for p in prompt_steps:
        v = p.visual
        if v is None:
            assert p.layout.num_tokens <= 8
            continue
        # every image / video frame whose placeholders are in the step comes whole: pixels, grid, all its tokens
        for pix, grids, mask, key in ((v.pixel_values, v.image_grid_thw, v.image_mask, "img"),
                                      (v.pixel_values_videos, v.video_grid_thw, v.video_mask, "vid")):
            if pix is None:
                assert mask is None or not mask.any()
                continue
            assert pix.shape[0] == sum(t * h * w for t, h, w in grids)
            assert int(mask.sum()) == sum(t * h * w // 4 for t, h, w in grids)
            seen[key] += grids
    assert seen == {"img": imgs, "vid": [(1, 4, 6), (1, 4, 6)]}  # the video's two frames, each whole
    assert len(prompt_steps) > 4  # the prompt did go in chunks


def test_each_step_carries_the_block_tables_of_its_tokens():
    eng, ex = _engine(block_size=4)
    a = eng.add(Prompt(list(range(1, 11))), greedy(4))  # 10 tokens: 3 blocks, then one more at token 12
    eng.run_until_done()
    tables = [p.layout.block_tables[0] for p in ex.steps]
    assert [len(t) for t in tables] == [3, 3, 3, 4]  # decodes at positions 10, 11, 12
    assert all(t == tables[-1][:len(t)] for t in tables) and len(set(tables[-1])) == 4
    assert a.blocks == [] and eng.pool.num_used == 0


# -- the prefix cache -----------------------------------------------------------------------------------------


def test_a_prefix_shared_across_requests_separated_by_unrelated_traffic_is_reused():
    eng, ex = _engine(max_batch=2, block_size=4)
    first = list(range(1, 11))
    a = eng.add(Prompt(first), greedy(3))
    eng.run_until_done()  # the cache names a's full blocks: first + [7, 7] (its last token's KV is never written)
    for i in range(3):  # unrelated requests in between
        eng.add(Prompt(list(range(100 + 20 * i, 115 + 20 * i))), greedy(2))
    eng.run_until_done()
    n = len(ex.steps)
    b = eng.add(Prompt(first + [7, 7, 7, 50, 51]), greedy(1))
    eng.run_until_done()
    step = ex.steps[n]
    assert a.cached_tokens == 0 and b.cached_tokens == 12  # three whole blocks
    assert (step.layout.starts, step.layout.lens) == ([12], [3]) and list(step.new_seqs) == [b.id]
    assert step.input_ids.tolist() == [7, 50, 51] and step.positions[0].tolist() == [12, 13, 14]
    # the same prompt again: its whole blocks come from the cache, never its last token
    c = eng.add(Prompt(first + [7, 7, 7, 50, 51]), greedy(1))
    eng.run_until_done()
    assert c.cached_tokens == 12 and ex.steps[-1].layout.lens == [3]
    # penalties count the cached prefix too: it travels to the sampler with the request's first step
    e = eng.add(Prompt(first + [8]), greedy(1, repetition_penalty=1.5))
    eng.run_until_done()
    assert e.cached_tokens == 8 and ex.steps[-1].new_seqs[e.id]["history_prefix"] == first[:8]
    d = eng.add(Prompt([99, 98]), greedy(1))  # sharing nothing
    eng.run_until_done()
    assert d.cached_tokens == 0 and ex.steps[-1].layout.starts == [0]
    stats = eng.cache_stats()
    assert stats.cached_tokens == 12 + 12 + 8 and stats.prompt_tokens == 10 + 45 + 15 + 15 + 11 + 2


def test_prefix_cache_off_computes_every_prompt():
    eng, ex = _engine(block_size=4, prefix_cache=False)
    for _ in range(2):
        s = eng.add(Prompt(list(range(1, 11))), greedy(1))
        eng.run_until_done()
        assert s.cached_tokens == 0 and ex.steps[-1].layout.lens == [10]


def test_the_least_recently_used_cached_blocks_are_evicted_first():
    eng, ex = _engine(max_batch=1, block_size=4, num_blocks=6)
    old, new = list(range(1, 9)), list(range(21, 29))  # two full blocks each
    for ids in (old, new):
        eng.add(Prompt(ids), greedy(1))
        eng.run_until_done()
    # 4 blocks: the 2 never-named free ones, then the 2 least recently used named ones (old's, tail first)
    eng.add(Prompt(list(range(41, 57))), greedy(1))
    eng.run_until_done()
    again_new = eng.add(Prompt(new + [1]), greedy(1))
    again_old = eng.add(Prompt(old + [1]), greedy(1))
    eng.run_until_done()
    assert again_new.cached_tokens == 8 and again_old.cached_tokens == 0


def test_a_prefix_s_tail_is_evicted_before_its_head():
    eng, ex = _engine(max_batch=1, block_size=4, num_blocks=4)
    old = list(range(1, 9))
    eng.add(Prompt(old), greedy(1))
    eng.run_until_done()
    eng.add(Prompt(list(range(41, 53))), greedy(1))  # 3 blocks: 2 never-named, then old's tail block
    eng.run_until_done()
    again = eng.add(Prompt(old + [1]), greedy(1))
    eng.run_until_done()
    assert again.cached_tokens == 4  # its head block is still there


def test_the_same_image_hits_the_cache_a_different_one_with_as_many_tokens_does_not():
    from mm_inputs import IMG, chat, image_tokens, pixels

    cfg = preset("tiny")
    eng, ex = _engine(max_batch=1, block_size=4)
    ids = chat([5] + image_tokens(4, 4) + [6])  # 18 tokens; the image's placeholders are tokens 5-8
    start = ids.index(IMG)

    def run(seed: int):
        s = eng.add(Prompt(ids, None, pixels(16, cfg.vision.patch_dim, seed), [(1, 4, 4)]), greedy(1))
        eng.run_until_done()
        return s, ex.steps[-1]

    a, _ = run(1)
    same, step = run(1)
    assert a.cached_tokens == 0 and same.cached_tokens == 16 and step.visual is None  # no vision tower run
    other, step = run(2)
    assert other.cached_tokens == 4 <= start and step.visual.image_grid_thw == [(1, 4, 4)]


def test_a_cached_prefix_never_ends_inside_an_image():
    from mm_inputs import IM_START, NL, USER, image_tokens, pixels

    cfg = preset("tiny")
    eng, ex = _engine(max_batch=1, block_size=4)
    img = pixels(32, cfg.vision.patch_dim, 1)
    head = [IM_START, USER, NL, 5] + image_tokens(4, 8)  # the image's placeholders: tokens 5-12
    for tail in ([6, 7, 8, 9], [60, 70, 80, 90]):
        s = eng.add(Prompt(head + tail, None, img, [(1, 4, 8)]), greedy(1))
        eng.run_until_done()
    # blocks 0-2 (tokens 0-11) match, but they end inside the image: the prefix is cut back to whole blocks
    # before the image, whose features are computed again whole
    assert s.cached_tokens == 4 and ex.steps[-1].visual.image_grid_thw == [(1, 4, 8)]
    assert ex.steps[-1].layout.starts == [4]


# -- KV blocks: admission, growth, preemption -----------------------------------------------------------------


def test_a_request_that_can_never_fit_is_refused_at_add():
    eng, _ = _engine(block_size=4, num_blocks=4)  # 16 tokens of KV
    with pytest.raises(PromptError, match="KV cache holds 16"):
        eng.add(Prompt(list(range(1, 11))), greedy(8))  # 10 + 8 - 1 = 17 tokens of KV
    eng.add(Prompt(list(range(1, 11))), greedy(7))  # 16: fits
    with pytest.raises(PromptError, match="raise --max-len"):
        eng.add(Prompt(list(range(1, 65))), greedy(1))


def test_concurrency_is_bounded_by_the_kv_pool_not_by_max_batch_times_max_len():
    """8 x 4096 tokens of context would be 32k tokens of slots; a pool of 96 tokens runs what fits in it."""
    def peak(num_blocks: int) -> int:
        eng, ex = _engine(max_batch=8, max_len=4096, block_size=4, num_blocks=num_blocks)
        seqs = [eng.add(Prompt([10 + i] * 6), greedy(4)) for i in range(8)]  # 9 tokens of KV: 3 blocks each
        eng.run_until_done()
        assert all(s.output == [7] * 4 for s in seqs) and eng.pool.num_used == 0
        return max(len(p.seq_ids) for p in ex.steps)

    assert peak(24) == 8  # 96 tokens hold all eight
    assert peak(9) <= 3  # 36 tokens: at most three at once


def test_preemption_frees_the_latest_and_recomputes_its_tokens_later():
    eng, ex = _engine(max_batch=4, block_size=4, num_blocks=7, prefix_cache=False)
    a = eng.add(Prompt([1, 2, 3, 4, 5, 6]), greedy(12))  # 17 tokens of KV each: 5 blocks
    b = eng.add(Prompt([8, 9, 10, 11, 12, 13]), greedy(12))
    eng.run_until_done()
    assert a.output == b.output == [7] * 12
    assert a.preemptions == 0 and b.preemptions >= 1 and eng.cache_stats().preemptions == b.preemptions
    assert eng.pool.num_used == 0
    # b comes back as one prefill of its prompt and all but its last output token, nothing sampled from it
    back = next(p for i, p in enumerate(ex.steps) if b.id in p.seq_ids and i > 0
                and p.layout.starts[p.seq_ids.index(b.id)] == 0 and p.layout.lens[p.seq_ids.index(b.id)] > 1
                and b.id in p.open_prompts)
    i = back.seq_ids.index(b.id)
    n = back.layout.lens[i]
    assert b.id not in back.new_seqs and b.id not in back.continued and n > 6
    off = back.layout.offsets()[i]
    assert back.input_ids[off:off + n].tolist() == [8, 9, 10, 11, 12, 13] + [7] * (n - 6)
    assert back.positions[0, off:off + n].tolist() == list(range(n))
    nxt = next(p for p in ex.steps[ex.steps.index(back) + 1:] if b.id in p.seq_ids)
    assert nxt.layout.starts[nxt.seq_ids.index(b.id)] == n  # then it decodes its last token at position n


def test_preempted_before_its_first_token_it_starts_its_sampler_again():
    eng, ex = _engine(max_batch=2, block_size=4, num_blocks=6, prefix_cache=False, max_step_tokens=2)
    a = eng.add(Prompt([1, 2, 3]), greedy(12))  # 14 tokens of KV: 4 blocks
    b = eng.add(Prompt([6] * 16), greedy(2))  # 4 blocks; one token per step beside a's decodes
    eng.run_until_done()
    assert a.output == [7] * 12 and b.output == [7] * 2
    starts = [p for p in ex.steps if b.id in p.new_seqs]
    assert b.preemptions == 1 and len(starts) == 2  # its prefill began twice, from token 0
    assert all(p.layout.starts[p.seq_ids.index(b.id)] == 0 for p in starts)


def test_n_choices_of_one_prompt_share_its_blocks():
    eng, ex = _engine(max_batch=4, block_size=4)
    prompt = Prompt(list(range(1, 11)))
    seqs = [eng.add(prompt, greedy(2)) for _ in range(3)]
    eng.run_until_done()
    first = [(p.seq_ids, p.layout.starts, p.layout.lens) for p in ex.steps[:2]]
    assert first[0] == ([seqs[0].id], [0], [10])  # the first choice computes the prompt alone
    assert first[1] == ([seqs[0].id, seqs[1].id, seqs[2].id], [10, 8, 8], [1, 2, 2])  # the others its tail only
    assert [s.cached_tokens for s in seqs] == [0, 8, 8]
    assert eng.cache_stats().computed_tokens == 10 + 2 + 2
    assert all(s.output == [7, 7] for s in seqs) and eng.pool.num_used == 0
    shared = set(seqs[1].names[:2])
    assert shared == set(seqs[0].names[:2]) == set(seqs[2].names[:2])


def test_each_choice_starts_its_sampler_with_its_stop_ids_and_the_prompt_head_it_took_from_the_cache():
    """What the sampler is told at a sequence's first step: the stop tokens min_tokens bans (the checkpoint's eos
    unless ignore_eos), and, for a choice whose prompt head came from the prefix cache, that head as
    history_prefix (its penalties count the whole prompt)."""
    eng, ex = _engine(max_batch=4, block_size=4)
    prompt = Prompt(list(range(1, 11)))
    params = greedy(2, min_tokens=2, stop_token_ids=(99,), repetition_penalty=1.5)
    seqs = [eng.add(prompt, params) for _ in range(2)] + [eng.add(Prompt([5, 6]), greedy(2, min_tokens=1,
                                                                                         ignore_eos=True))]
    eng.run_until_done()
    starts = [next(p.new_seqs[s.id] for p in ex.steps if s.id in p.new_seqs) for s in seqs]
    assert [st.get("stop_ids") for st in starts] == [[99, 151645], [99, 151645], []]
    assert "history_prefix" not in starts[0] and starts[1]["history_prefix"] == list(range(1, 9))
    assert seqs[1].cached_tokens == 8 and all(s.output == [7, 7] for s in seqs)
