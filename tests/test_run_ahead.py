"""Running one step ahead (``--run-ahead``): the driver submits a decode step before it reads the tokens of the one
in flight, and the stage takes them as input ids on the device. The tokens must be those of the synchronous
order, whatever happens meanwhile: sequences arriving, stopping on a token, reaching their length, being aborted
or preempted, sampling with seeds and penalties, log-probabilities, grammars (which fall back to the synchronous
order). A real one-stage engine on the tiny model, on the CPU."""

from __future__ import annotations

import pytest
import torch

from qwen_vl_distributed.engine.engine import Engine, Prompt
from qwen_vl_distributed.engine.sampler import SequenceSampler
from qwen_vl_distributed.engine.sampling import SamplingParams
from qwen_vl_distributed.errors import UserError
from qwen_vl_distributed.model.config import preset
from qwen_vl_distributed.model.qwen3_vl import Qwen3VLMoe
from qwen_vl_distributed.pipeline.executor import LocalExecutor
from qwen_vl_distributed.pipeline.payload import StepPayload, to_wire
from qwen_vl_distributed.pipeline.stage import StageRuntime
from hf_oracle import randomize

BS = 4


@pytest.fixture(scope="module")
def model():
    cfg = preset("tiny")
    m = Qwen3VLMoe(cfg).eval()
    randomize(m, seed=3, std=0.2)  # (logits spread enough that sampled sequences differ from token to token)
    return cfg, m


class Recording(LocalExecutor):
    """The local executor, keeping every payload it ran and the most steps in flight at once."""

    def __init__(self, runtime):
        super().__init__(runtime)
        self.steps: list[StepPayload] = []
        self.most_in_flight = 0

    def submit(self, p):
        self.steps.append(p)
        super().submit(p)
        self.most_in_flight = max(self.most_in_flight, len(self._done))


def _engine(model, run_ahead: bool, blocks: int = 64, max_batch: int = 4, max_len: int = 96) -> Engine:
    cfg, m = model
    ex = Recording(StageRuntime(m, m.new_cache(blocks, BS, max_len), SequenceSampler(), "cpu"))
    return Engine(cfg, ex, max_batch, max_len, eos_ids=[], num_blocks=blocks, block_size=BS, run_ahead=run_ahead)


def _prompt(i: int, n: int = 9) -> Prompt:
    g = torch.Generator().manual_seed(100 + i)
    return Prompt(torch.randint(10, 1000, (n + i,), generator=g).tolist())


def _drive(eng: Engine, script: dict[int, list], aborts: dict[int, int] | None = None, limit: int = 500):
    """Run ``eng``: before call k of ``step``, add the (prompt, params) of ``script[k]``; abort sequence j (in order
    of adding) before call ``aborts[j]``. The sequences, in order of adding."""
    seqs, k = [], 0
    while k <= max(script) or eng.has_work():
        for prompt, params in script.get(k, []):
            seqs.append(eng.add(prompt, params))
        for j, at in (aborts or {}).items():
            if at == k:
                eng.abort(seqs[j])
        eng.step()
        k += 1
        assert k < limit
    return seqs


def _outputs(seqs):
    return [(s.output, s.finish_reason) for s in seqs]


def _both(model, script, aborts=None, **kw):
    sync, ahead = _engine(model, False, **kw), _engine(model, True, **kw)
    a = _drive(sync, script, aborts)
    b = _drive(ahead, script, aborts)
    for eng in (sync, ahead):
        assert eng.pool.num_used == 0 and not eng.running and not eng.in_flight and not eng.ahead
    return a, b, sync, ahead


def test_greedy_tokens_equal_the_synchronous_order_and_steps_run_ahead(model):
    script = {0: [(_prompt(0), SamplingParams(temperature=0, max_new_tokens=12))]}
    (a,), (b,), sync, ahead = _both(model, script)
    assert b.output == a.output and len(a.output) == 12 and b.finish_reason == "length"
    assert sync.executor.most_in_flight == 1
    assert ahead.executor.most_in_flight == 2  # a step was submitted before the previous one was collected
    ran_ahead = [p for p in ahead.executor.steps if p.ids_from is not None]
    assert len(ran_ahead) >= 9  # every decode step but the first one after the prompt, and the one after the last
    assert all(p.input_ids.tolist() == [0] for p in ran_ahead)  # placeholders: the ids came from the device


def test_sampling_penalties_logprobs_stops_and_arrivals_give_the_same_tokens(model):
    sampled = dict(temperature=0.9, top_p=0.9, seed=7)
    # a stop token that the first sequence draws on its 6th token in the synchronous order
    (probe,), _, _, _ = _both(model, {0: [(_prompt(0), SamplingParams(max_new_tokens=10, **sampled))]})
    stop = probe.output[5]
    assert stop not in probe.output[:5]
    script = {
        0: [(_prompt(0), SamplingParams(max_new_tokens=10, stop_token_ids=(stop,), **sampled)),
            (_prompt(1), SamplingParams(temperature=0, max_new_tokens=7, repetition_penalty=1.3,
                                        presence_penalty=0.5))],
        3: [(_prompt(2), SamplingParams(temperature=0.7, seed=3, max_new_tokens=9, logprobs=2,
                                        frequency_penalty=0.4, min_tokens=4))],
        5: [(_prompt(3), SamplingParams(temperature=0, max_new_tokens=1))],
        8: [(_prompt(4), SamplingParams(temperature=1.1, seed=11, max_new_tokens=14))],
    }
    a, b, _, ahead = _both(model, script)
    assert _outputs(b) == _outputs(a)
    assert a[0].finish_reason == "stop" and a[0].output[-1] == stop and len(a[0].output) == 6
    assert [s.finish_reason for s in a[1:]] == ["length"] * 4
    assert sum(p.ids_from is not None for p in ahead.executor.steps) > 10


def test_logprobs_ride_along(model):
    """The same log-probabilities either way; a step run ahead leaves them unread (like its tokens) until the
    driver collects it, so a row asking for them does not make the draw wait for the device."""
    script = {0: [(_prompt(5), SamplingParams(temperature=0.8, seed=5, max_new_tokens=6, logprobs=3))]}
    sync, ahead = _engine(model, False), _engine(model, True)
    unread = []
    submit = ahead.executor.submit

    def watch(p):
        submit(p)
        unread.append(callable(ahead.executor._done[-1].logprobs))
    ahead.executor.submit = watch
    got = {}
    for name, eng in (("sync", sync), ("ahead", ahead)):
        seq = eng.add(*script[0][0])
        events = []
        while eng.has_work():
            events += eng.step()
        got[name] = [(e.token, e.logprobs[0], [t for t, _ in e.logprobs[1]]) for e in events]
        assert [e.token for e in events] == seq.output
    assert got["ahead"] == got["sync"]
    assert len(unread) == 6 and all(unread)


def test_an_abort_while_a_step_runs_ahead_drops_its_token_and_frees_its_blocks(model):
    script = {0: [(_prompt(0), SamplingParams(temperature=0, max_new_tokens=20)),
                  (_prompt(1), SamplingParams(temperature=0, max_new_tokens=20))]}
    a, b, _, ahead = _both(model, script, aborts={0: 6})
    assert _outputs(b) == _outputs(a)
    assert a[0].finish_reason == "abort" and 0 < len(a[0].output) < 20 and a[1].finish_reason == "length"


def test_preemption_under_a_small_pool_gives_the_same_tokens(model):
    # 14 blocks of 4 tokens: three sequences of 10-12 prompt tokens and 16 new ones cannot all stay
    script = {0: [(_prompt(i), SamplingParams(temperature=0.8, seed=i, max_new_tokens=16)) for i in range(3)]}
    a, b, sync, ahead = _both(model, script, blocks=14)
    assert _outputs(b) == _outputs(a)
    assert all(s.finish_reason == "length" for s in a)
    assert sync.cache_stats().preemptions > 0 and ahead.cache_stats().preemptions > 0


def test_a_grammar_keeps_the_synchronous_order_while_its_sequence_runs(model, tmp_path_factory):
    from qwen_vl_distributed.engine.grammar import GrammarBackend, json_format, structural_tag
    from synth_model import tiny_model_dir

    cfg, _ = model
    backend = GrammarBackend(tiny_model_dir(tmp_path_factory), cfg.text.vocab_size, [151645])
    try:
        runs = []
        for run_ahead in (False, True):
            eng = _engine(model, run_ahead)
            eng.executor.runtime.sampler.grammars = backend
            fmt = structural_tag(json_format({"type": "object", "properties": {"a": {"type": "integer"}}}))
            g = eng.add(_prompt(0), SamplingParams(temperature=0.9, seed=1, max_new_tokens=8, grammar=fmt))
            plain = eng.add(_prompt(1), SamplingParams(temperature=0.9, seed=2, max_new_tokens=16))
            eng.run_until_done()
            runs.append((eng, g, plain))
        (_, g0, p0), (eng, g1, p1) = runs
        assert (g1.output, p1.output) == (g0.output, p0.output)
        ahead = [p for p in eng.executor.steps if p.ids_from is not None]
        assert ahead and all(g1.id not in p.seq_ids for p in ahead)  # only once the grammar's sequence is done
    finally:
        backend.close()


def test_the_step_behind_names_its_blocks_for_the_prefix_cache(model):
    # the first request's generated tokens fill blocks while steps run ahead; a second request whose prompt is
    # the first's prompt and output finds them in the cache
    p0 = _prompt(0, n=8)
    eng = _engine(model, True)
    first = eng.add(p0, SamplingParams(temperature=0, max_new_tokens=13))
    eng.run_until_done()
    again = Prompt(p0.input_ids + first.output[:12])
    second = eng.add(again, SamplingParams(temperature=0, max_new_tokens=3))
    eng.run_until_done()
    assert second.cached_tokens == 16  # 20 tokens computed for the first: its 5 full blocks less the last token's
    ref = _engine(model, False)
    alone = ref.add(Prompt(list(again.input_ids)), SamplingParams(temperature=0, max_new_tokens=3))
    ref.run_until_done()
    assert second.output == alone.output


def test_a_step_run_ahead_never_crosses_a_process():
    with pytest.raises(ValueError, match="cannot cross a process"):
        to_wire(StepPayload("step", ids_from=(0, [0])))


def test_run_ahead_needs_one_stage_of_one_rank():
    import argparse

    from qwen_vl_distributed.cli.options import add_run_args, run_options
    p = argparse.ArgumentParser()
    add_run_args(p, model=False)
    assert run_options(p.parse_args(["--run-ahead"]), None).run_ahead is True
    assert run_options(p.parse_args(["--no-run-ahead"]), None).run_ahead is False
    assert run_options(p.parse_args(["--stages", "2"]), None).run_ahead is None  # auto: off where it cannot be
    with pytest.raises(SystemExit):
        p.parse_args(["--run-ahead", "--no-run-ahead"])
    for extra in (["--stages", "2"], ["--tp", "2"]):
        with pytest.raises(UserError, match="--run-ahead: needs one stage of one rank"):
            run_options(p.parse_args(["--run-ahead", *extra]), None)


def test_by_default_a_one_stage_engine_runs_ahead_on_cuda_only():
    from qwen_vl_distributed.engine.build import RunOptions, new_engine

    class Executor:
        num_stages = 1
        can_run_ahead = True

        def __init__(self):
            self.calls = []

        def run_ahead(self, on=True):
            self.calls.append(on)

    cfg = preset("tiny")

    class Plan:
        kv_blocks, kv_block_size, prefill_chunk = 16, BS, 64
    for device, given, expect in (("cuda", None, True), ("cpu", None, False), ("cuda", False, False),
                                  ("cpu", True, True)):
        ex = Executor()
        opts = RunOptions(model=None, device=device, max_batch=2, max_len=32, run_ahead=given)
        assert new_engine(cfg, ex, Plan, opts, []).run_ahead is expect and ex.calls == ([True] if expect else [])
    ex = Executor()
    ex.can_run_ahead = False  # (a stage of several tensor ranks, or the first of several stages)
    assert new_engine(cfg, ex, Plan, RunOptions(model=None, device="cuda", max_batch=2, max_len=32), []).run_ahead \
        is False


def test_running_ahead_is_refused_where_the_stage_cannot_gather_the_ids(model):
    cfg, m = model
    rt = StageRuntime(m, m.new_cache(16, BS, 64), SequenceSampler(), "cpu")
    with pytest.raises(ValueError, match="one group"):
        Engine(cfg, LocalExecutor(rt), 4, 64, eos_ids=[], num_blocks=16, block_size=BS, num_groups=2,
               run_ahead=True)
    from qwen_vl_distributed.engine.build import RunOptions, start_engine
    for grid in (dict(stages=2), dict(tensor_parallel=2)):  # refused before any process starts
        with pytest.raises(UserError, match="--run-ahead: needs one stage of one rank"):
            start_engine(RunOptions(model=None, random_preset="tiny", random_layers=2, quiet=True, run_ahead=True,
                                    **grid))


@pytest.mark.parametrize("run_ahead", [False, True])
def test_the_host_share_section_times_both_orders_and_leaves_the_engine_as_it_was(run_ahead):
    from qwen_vl_distributed.bench.host_share import host_share
    from qwen_vl_distributed.engine.build import RunOptions, start_engine
    handle = start_engine(RunOptions(model=None, random_preset="tiny", random_layers=4, max_batch=4, max_len=64,
                                     quiet=True, run_ahead=run_ahead))
    try:
        engine = handle.engine
        steps = []
        submit = engine.executor.submit
        engine.executor.submit = lambda p: (steps.append(p), submit(p))
        rows = host_share(engine, (1, 2), prompt_len=6, steps=4, temperature=1.0, seed=1)
        assert all(r["run_ahead_step_ms"] > 0 for r in rows)
        assert sum(p.ids_from is not None for p in steps) >= 2 * 4  # each row's timed steps ran ahead
        assert engine.run_ahead is run_ahead and engine.executor.runtime.defer_tokens is run_ahead
    finally:
        handle.close()
