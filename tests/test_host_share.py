"""The host's share of a decode step: bench-pipeline's section on CPU, its refusals, and the opt-in host timers
(which must not change what the engine computes)."""

from __future__ import annotations

import json
import subprocess

import pytest

from procs import CLI
from qwen_vl_distributed.engine.build import RunOptions, start_engine
from qwen_vl_distributed.engine.engine import Prompt
from qwen_vl_distributed.engine.sampling import SamplingParams
from qwen_vl_distributed.pipeline.host_phases import PHASES, HostPhases


def _bench(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(CLI + ["bench-pipeline", "--preset", "tiny", "--layers", "4", "--device", "cpu",
                                 "--prompt-len", "8", "--new-tokens", "2", "--sequences", "1", *args],
                          capture_output=True, text=True, timeout=600)


def test_bench_pipeline_reports_the_host_share_per_batch_size_on_cpu(tmp_path):
    out = tmp_path / "b.json"
    r = _bench("--stages", "1", "--host-batches", "1,3", "--host-steps", "4", "--json", str(out))
    assert r.returncode == 0, r.stderr
    rows = json.loads(out.read_text())["host_share"]
    assert [row["batch"] for row in rows] == [1, 3]
    for row in rows:
        assert row["step_ms"] > 0 and row["graph_replay_ms"] > 0 and row["sample_ms"] > 0
        assert row["captured"] is False  # no CUDA graph on CPU: the eager step stands in for the replay
        assert row["host_ms"] == pytest.approx(row["step_ms"] - row["graph_replay_ms"] - row["sample_ms"], abs=1e-3)
        assert list(row["phases_ms"]) == list(PHASES)  # every phase of a decode step was timed, in step order
        assert all(v >= 0 for v in row["phases_ms"].values())
        assert row["run_ahead_step_ms"] > 0  # the same steps run one step ahead, timed in the same run


def test_bench_pipeline_run_ahead_gives_the_same_tokens_and_needs_one_stage(tmp_path):
    digests = []
    for extra in ([], ["--run-ahead"]):
        out = tmp_path / f"r{len(extra)}.json"
        r = _bench("--stages", "1", "--host-batches", "0", "--sequences", "3", "--new-tokens", "6",
                   "--json", str(out), *extra)
        assert r.returncode == 0, r.stderr
        result = json.loads(out.read_text())
        assert result["run_ahead"] is bool(extra)
        digests.append(result["throughput"]["outputs_digest"])
    assert digests[0] == digests[1]
    r = _bench("--stages", "2", "--host-batches", "0", "--run-ahead")
    assert r.returncode != 0 and "--run-ahead: needs --stages 1" in r.stderr


def test_the_host_share_section_is_refused_where_it_cannot_run():
    r = _bench("--stages", "2", "--host-batches", "1,4")
    assert r.returncode != 0 and "--host-batches" in r.stderr and "--stages 1" in r.stderr
    r = _bench("--stages", "1", "--host-batches", "1,x")
    assert r.returncode != 0 and "--host-batches '1,x'" in r.stderr
    r = _bench("--stages", "1", "--host-steps", "0")
    assert r.returncode != 0 and "--host-steps 0" in r.stderr


def _generate(engine, seed: int) -> list[list[int]]:
    seqs = [engine.add(Prompt([100 + seed, 200 + i, 300]), SamplingParams(temperature=1.0, seed=seed + i,
                                                                          max_new_tokens=5, stop_token_ids=()))
            for i in range(3)]
    engine.run_until_done()
    return [s.output for s in seqs]


def test_host_timers_count_every_step_and_change_no_token():
    handle = start_engine(RunOptions(model=None, random_preset="tiny", random_layers=4, max_batch=4, max_len=32,
                                     quiet=True))
    try:
        engine, runtime = handle.engine, handle.engine.executor.runtime
        off = _generate(engine, seed=1)
        phases = HostPhases()
        engine.host_phases = runtime.host_phases = phases
        on = _generate(engine, seed=1)
    finally:
        handle.close()
    assert on == off
    assert phases.steps == 5  # one prompt step, four decode steps (one stage: one step per engine.step)
    assert set(phases.per_step_ms()) == set(PHASES)
