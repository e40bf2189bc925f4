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


def test_a_step_carries_at_most_max_step_tokens_of_prompts():
    ex = ScriptedPipeline(1)
    eng = Engine(preset("tiny"), ex, 8, 256, eos_ids=[151645], max_step_tokens=100)
    seqs = [eng.add(Prompt(list(range(1, 41))), SamplingParams(temperature=0, max_new_tokens=3)) for _ in range(4)]
    eng.run_until_done()
    assert all(p.layout.num_tokens <= 100 for p in ex.steps)
    assert [sum(1 for n in p.layout.lens if n == 40) for p in ex.steps[:2]] == [2, 2]
    assert all(s.output == [7, 7, 7] for s in seqs)
    big = eng.add(Prompt(list(range(1, 151))), SamplingParams(temperature=0, max_new_tokens=1))
    eng.run_until_done()  # a prompt over the budget still goes, alone
    assert big.output == [7]
