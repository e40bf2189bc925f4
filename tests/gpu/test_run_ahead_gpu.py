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


def _outputs(run_ahead: bool, dtype: str) -> tuple[list, int]:
    h = start_engine(RunOptions(model=None, random_preset="tiny", random_layers=4, device="cuda", dtype=dtype,
                                max_batch=8, max_len=128, quiet=True, run_ahead=run_ahead))
    try:
        engine = h.engine
        ahead = 0
        submit = engine.executor.submit

        def counting(p):
            nonlocal ahead
            ahead += p.ids_from is not None
            submit(p)
        engine.executor.submit = counting
        seqs, k = [], 0
        plan = {0: [(0, 1.0, 24), (1, 0.0, 30), (2, 0.8, 20), (3, 1.0, 12), (4, 0.0, 9)]}
        while k <= max(plan) or engine.has_work():
            for i, temp, n in plan.get(k, []):
                g = torch.Generator().manual_seed(i)
                params = SamplingParams(temperature=temp, seed=10 + i, max_new_tokens=n, stop_token_ids=(),
                                        repetition_penalty=1.2 if i == 2 else 1.0)
                seqs.append(engine.add(Prompt(torch.randint(1000, 100000, (9 + 3 * i,), generator=g).tolist()),
                                       params))
            engine.step()
            k += 1
        return [s.output for s in seqs], ahead
    finally:
        h.close()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_run_ahead_gives_the_tokens_of_the_synchronous_order_on_cuda(dtype):
    sync, none = _outputs(False, dtype)
    ahead, n = _outputs(True, dtype)
    assert none == 0 and n > 20
    assert ahead == sync
