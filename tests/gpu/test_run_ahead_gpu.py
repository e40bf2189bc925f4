"""Running one step ahead on a GPU: decode steps replay the captured graphs with input ids gathered on the device
from the previous step's tokens, whose copy to the host is queued behind the step; the tokens must equal the
synchronous order's (greedy and seeded sampling, penalties, sequences leaving at their lengths). Every sequence
starts in the first step and ends by length, so both orders run the same batches: a GPU step's numerics may
depend on its batch (graph buckets, kernel choices), and a prompt arriving mid-run joins one step later when
running ahead (tests/test_run_ahead.py covers arrivals, stops and aborts on the CPU)."""

from __future__ import annotations

import pytest
import torch

from qwen_vl_distributed.engine.build import RunOptions, start_engine
from qwen_vl_distributed.engine.engine import Prompt
from qwen_vl_distributed.engine.sampling import SamplingParams

pytestmark = pytest.mark.gpu


def _outputs(run_ahead: bool, dtype: str) -> tuple[list, int, dict]:
    """(each sequence's tokens, steps run ahead, the log-probabilities of the sequences that asked for them)."""
    h = start_engine(RunOptions(model=None, random_preset="tiny", random_layers=4, device="cuda", dtype=dtype,
                                max_batch=8, max_len=128, max_total_tokens=8192, quiet=True, run_ahead=run_ahead))
    try:
        engine = h.engine
        ahead = 0
        submit = engine.executor.submit

        def counting(p):
            nonlocal ahead
            ahead += p.ids_from is not None
            submit(p)
        engine.executor.submit = counting
        seqs, k, logprobs = [], 0, {}
        plan = {0: [(0, 1.0, 24), (1, 0.0, 30), (2, 0.8, 20), (3, 1.0, 12), (4, 0.0, 9)]}
        while k <= max(plan) or engine.has_work():
            for i, temp, n in plan.get(k, []):
                g = torch.Generator().manual_seed(i)
                params = SamplingParams(temperature=temp, seed=10 + i, max_new_tokens=n, stop_token_ids=(),
                                        repetition_penalty=1.2 if i == 2 else 1.0,
                                        logprobs={0: 3, 4: 0}.get(i))
                seqs.append(engine.add(Prompt(torch.randint(1000, 100000, (9 + 3 * i,), generator=g).tolist()),
                                       params))
            for ev in engine.step():
                if ev.logprobs is not None:
                    logprobs.setdefault(ev.seq.id, []).append(ev.logprobs)
            k += 1
        return [s.output for s in seqs], ahead, logprobs
    finally:
        h.close()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_run_ahead_gives_the_tokens_of_the_synchronous_order_on_cuda(dtype):
    """Tokens, and the log-probabilities read back behind their step (pinned copies, read after the step's event),
    equal the synchronous order's."""
    sync, none, sync_lp = _outputs(False, dtype)
    ahead, n, ahead_lp = _outputs(True, dtype)
    assert none == 0 and n > 20
    assert ahead == sync
    assert sorted(len(v) for v in sync_lp.values()) == [9, 24]
    assert ahead_lp == sync_lp


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_a_step_run_ahead_never_waits_for_the_gpu():
    """Submitting a step run ahead queues its work without one synchronising call (torch's sync debug mode makes
    any such call raise): the sampler's small host lists go over pinned, the tokens come back behind the step. With
    temperature, top-k / top-p / min-p, penalties, min_tokens, logit_bias, log-probabilities and greedy rows in one
    batch."""
    h = start_engine(RunOptions(model=None, random_preset="tiny", random_layers=4, device="cuda", dtype="bfloat16",
                                max_batch=8, max_len=128, max_total_tokens=8192, quiet=True, run_ahead=True))
    try:
        engine = h.engine
        submit, checked = engine.executor.submit, []

        def strict(p):
            if p.ids_from is None:
                return submit(p)
            torch.cuda.set_sync_debug_mode("error")
            try:
                submit(p)
            finally:
                torch.cuda.set_sync_debug_mode("default")
            checked.append(p.step)
        engine.executor.submit = strict
        kinds = [dict(temperature=1.0, top_p=0.9, top_k=50, seed=1), dict(temperature=0.0),
                 dict(temperature=0.7, min_p=0.05, seed=2, repetition_penalty=1.2, presence_penalty=0.3),
                 dict(temperature=0.9, seed=3, min_tokens=6, stop_token_ids=(7,), logit_bias={5: 2.0}),
                 dict(temperature=0.6, seed=4, logprobs=3), dict(temperature=0.0, logprobs=0)]
        for i, kw in enumerate(kinds):
            engine.add(Prompt([1000 + i, 2000, 3000 + i, 4000]),
                       SamplingParams(max_new_tokens=16, **{"stop_token_ids": (), **kw}))
        engine.run_until_done()
        assert len(checked) >= 10
    finally:
        h.close()
