"""The host-share section on a GPU: steady decode steps replay the captured graph of their batch, and the engine
with the host timers on (a synchronize before sampling) gives the same tokens as with them off."""

from __future__ import annotations

import pytest
import torch

from qwen_vl_distributed.bench.host_share import host_share
from qwen_vl_distributed.engine.build import RunOptions, start_engine
from qwen_vl_distributed.engine.engine import Prompt
from qwen_vl_distributed.engine.sampling import SamplingParams
from qwen_vl_distributed.pipeline.host_phases import PHASES, HostPhases

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def handle():
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    h = start_engine(RunOptions(model=None, random_preset="tiny", random_layers=4, device="cuda", dtype="float32",
                                max_batch=8, max_len=96, max_total_tokens=8192, quiet=True))
    yield h
    h.close()


def _generate(engine) -> list[list[int]]:
    seqs = [engine.add(Prompt([100 + i, 200, 300 + i]), SamplingParams(temperature=1.0, seed=i, max_new_tokens=6,
                                                                      stop_token_ids=()))
            for i in range(4)]
    engine.run_until_done()
    return [s.output for s in seqs]


def test_host_timers_change_no_token_on_cuda(handle):
    engine, runtime = handle.engine, handle.engine.executor.runtime
    off = _generate(engine)
    engine.host_phases = runtime.host_phases = HostPhases()
    try:
        on = _generate(engine)
    finally:
        engine.host_phases = runtime.host_phases = None
    assert on == off


def test_host_share_replays_the_captured_graph_of_each_batch(handle):
    rows = host_share(handle.engine, (1, 4, 8), prompt_len=8, steps=8, temperature=1.0, seed=4)
    assert [r["batch"] for r in rows] == [1, 4, 8]
    for r in rows:
        assert r["captured"] is True and r["graph_replay_ms"] > 0 and r["sample_ms"] > 0
        assert list(r["phases_ms"]) == list(PHASES)
