"""The engine's scheduling with a scripted executor: micro-batch groups in flight, continuous batching, aborts."""

from __future__ import annotations

from collections import deque

import torch

from qwen_vl_distributed.engine.engine import Engine, Prompt
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
        self.queue.append(TokenPayload("tokens", p.mb, torch.full((len(p.layout.slots),), 7)))
        self.max_in_flight = max(self.max_in_flight, len(self.queue))

    def collect(self):
        return self.queue.popleft()

    def idle(self):
        pass

    def stage_stats(self):
        return []


def _engine(stages: int, slots: int = 8):
    ex = ScriptedPipeline(stages)
    return Engine(preset("tiny"), ex, slots, 64, eos_ids=[151645]), ex


def test_with_s_stages_and_s_sequences_s_steps_are_in_flight():
    eng, ex = _engine(3)
    seqs = [eng.add(Prompt([1, 2, 3 + i]), SamplingParams(temperature=0, max_new_tokens=5)) for i in range(3)]
    eng.run_until_done()
    assert ex.max_in_flight == 3
    assert {s.group for s in seqs} == {0, 1, 2}
    assert all(s.output == [7] * 5 and s.finish_reason == "length" for s in seqs)


def test_sequences_join_and_leave_between_steps():
    eng, ex = _engine(1, slots=2)
    a = eng.add(Prompt([1, 2, 3]), SamplingParams(temperature=0, max_new_tokens=2))
    b = eng.add(Prompt([4, 5]), SamplingParams(temperature=0, max_new_tokens=6))
    c = eng.add(Prompt([6]), SamplingParams(temperature=0, max_new_tokens=1))  # waits for a free slot
    eng.run_until_done()
    assert [len(s.output) for s in (a, b, c)] == [2, 6, 1]
    # c is prefilled in the same step as one of b's decodes, in a's old slot
    mixed = [p for p in ex.steps if 0 in p.layout.starts and any(st > 0 for st in p.layout.starts)]
    assert mixed and c.slot == a.slot


def test_decode_positions_follow_the_rope_delta():
    eng, ex = _engine(1)
    s = eng.add(Prompt([1, 2, 3]), SamplingParams(temperature=0, max_new_tokens=3))
    s.rope_delta = -1  # as an image prompt would have
    eng.run_until_done()
    decode_steps = ex.steps[1:]
    assert [int(p.positions[0, 0]) for p in decode_steps] == [3 - 1, 4 - 1]
    assert [p.layout.starts for p in decode_steps] == [[3], [4]]


def test_abort_frees_the_slot():
    eng, ex = _engine(1, slots=1)
    a = eng.add(Prompt([1, 2]), SamplingParams(temperature=0, max_new_tokens=50))
    eng.step()
    eng.abort(a)
    b = eng.add(Prompt([3]), SamplingParams(temperature=0, max_new_tokens=2))
    eng.run_until_done()
    assert a.finish_reason == "abort" and b.output == [7, 7]


def test_a_step_carries_at_most_max_step_tokens_prompts_go_in_chunks():
    ex = ScriptedPipeline(1)
    eng = Engine(preset("tiny"), ex, 8, 256, eos_ids=[151645], max_step_tokens=100)
    seqs = [eng.add(Prompt(list(range(1, 41))), SamplingParams(temperature=0, max_new_tokens=3)) for _ in range(4)]
    eng.run_until_done()
    assert all(p.layout.num_tokens <= 100 for p in ex.steps)
    # step 1: two whole prompts and the first 20 tokens of the third; step 2: two decodes, its last 20, the fourth
    assert (ex.steps[0].layout.starts, ex.steps[0].layout.lens) == ([0, 0, 0], [40, 40, 20])
    assert ex.steps[0].open_prompts == [seqs[2].slot] and ex.steps[0].continued == []
    assert (ex.steps[1].layout.starts, ex.steps[1].layout.lens) == ([40, 40, 20, 0], [1, 1, 20, 40])
    assert ex.steps[1].continued == [seqs[2].slot] and ex.steps[1].open_prompts == []
    assert list(ex.steps[1].new_seqs) == [seqs[3].slot]  # sampler state starts with a prompt's first chunk
    assert all(s.output == [7, 7, 7] for s in seqs)  # nothing is taken from a chunk short of the prompt's end
    big = eng.add(Prompt(list(range(1001, 1151))), SamplingParams(temperature=0, max_new_tokens=1))  # no shared prefix
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
    s = eng.add(Prompt(ids, None, pixels(76, patch, 1), imgs, pixels(48, patch, 2), vid),
                SamplingParams(temperature=0, max_new_tokens=2))
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


def test_a_freed_slot_s_cached_prefix_is_reused():
    eng, ex = _engine(1, slots=2)
    first = list(range(1, 11))
    a = eng.add(Prompt(first), SamplingParams(temperature=0, max_new_tokens=3))
    eng.run_until_done()
    assert a.output == [7, 7, 7]  # its slot now caches first + [7, 7] (the last token's KV was never written)
    n = len(ex.steps)
    b = eng.add(Prompt(first + [7, 7, 7, 50, 51]), SamplingParams(temperature=0, max_new_tokens=1))
    eng.run_until_done()
    step = ex.steps[n]
    assert b.slot == a.slot and b.reused == 12
    assert (step.layout.starts, step.layout.lens) == ([12], [3]) and list(step.new_seqs) == [b.slot]
    assert step.input_ids.tolist() == [7, 50, 51] and step.positions[0].tolist() == [12, 13, 14]
    # the same prompt again: all but its last token come from the cache
    c = eng.add(Prompt(first + [7, 7, 7, 50, 51]), SamplingParams(temperature=0, max_new_tokens=1))
    eng.run_until_done()
    assert c.reused == 14 and ex.steps[-1].layout.lens == [1]
    # penalties count the reused prefix too: it travels to the sampler with the request's first step
    e = eng.add(Prompt(first + [8]), SamplingParams(temperature=0, max_new_tokens=1, repetition_penalty=1.5))
    eng.run_until_done()
    assert e.reused == 10 and ex.steps[-1].new_seqs[e.slot]["history_prefix"] == first
    # a prompt sharing nothing takes the least recently freed slot and starts from 0
    d = eng.add(Prompt([99, 98]), SamplingParams(temperature=0, max_new_tokens=1))
    eng.run_until_done()
    assert d.reused == 0 and ex.steps[-1].layout.starts == [0]


def test_prefix_reuse_stops_at_an_image_with_other_pixels():
    from mm_inputs import chat, image_tokens, pixels

    cfg = preset("tiny")
    eng, ex = _engine(1, slots=1)
    ids = chat([5] + image_tokens(4, 4) + [6])
    start = ids.index(151655)  # the image's first placeholder
    a = eng.add(Prompt(ids, None, pixels(16, cfg.vision.patch_dim, 1), [(1, 4, 4)]),
                SamplingParams(temperature=0, max_new_tokens=1))
    eng.run_until_done()
    same = eng.add(Prompt(ids, None, pixels(16, cfg.vision.patch_dim, 1), [(1, 4, 4)]),
                   SamplingParams(temperature=0, max_new_tokens=1))
    eng.run_until_done()
    other = eng.add(Prompt(ids, None, pixels(16, cfg.vision.patch_dim, 2), [(1, 4, 4)]),
                    SamplingParams(temperature=0, max_new_tokens=1))
    eng.run_until_done()
    assert a.reused == 0 and same.reused == len(ids) - 1 and other.reused == start
    assert ex.steps[-1].visual is not None and ex.steps[-1].visual.image_grid_thw == [(1, 4, 4)]


def test_a_short_shared_prefix_takes_an_empty_slot_not_a_long_cache():
    eng, ex = _engine(1, slots=2)
    system = [1, 2, 3]
    long_chat = eng.add(Prompt(system + list(range(100, 140))), SamplingParams(temperature=0, max_new_tokens=2))
    eng.run_until_done()
    new_chat = eng.add(Prompt(system + [9, 9]), SamplingParams(temperature=0, max_new_tokens=1))
    eng.run_until_done()
    assert new_chat.slot != long_chat.slot and new_chat.reused == 0  # the 41-token cache survives
    follow_up = eng.add(Prompt(system + list(range(100, 140)) + [7, 5]),
                        SamplingParams(temperature=0, max_new_tokens=1))
    eng.run_until_done()
    assert follow_up.slot == long_chat.slot and follow_up.reused == 44


def test_prompts_admitted_together_let_the_matching_one_choose_first():
    eng, ex = _engine(1, slots=2)
    a = eng.add(Prompt(list(range(10, 30))), SamplingParams(temperature=0, max_new_tokens=1))
    b = eng.add(Prompt(list(range(40, 60))), SamplingParams(temperature=0, max_new_tokens=3))
    eng.run_until_done()  # a's slot was freed first: the least recently freed one
    stranger = eng.add(Prompt([99, 98, 97]), SamplingParams(temperature=0, max_new_tokens=1))
    a2 = eng.add(Prompt(list(range(10, 30)) + [7, 5]), SamplingParams(temperature=0, max_new_tokens=1))
    eng.run_until_done()
    assert a2.slot == a.slot and a2.reused == 20 and stranger.slot == b.slot
    assert ex.steps[-1].layout.slots == [stranger.slot, a2.slot]  # still scheduled in arrival order
