"""The host's share of a decode step (bench-pipeline's ``host_share`` section), for a one-stage engine.

For each batch size B: the engine's decode step wall time in steady state (B sequences decoding, many steps,
timers off), against the device time of the same step alone -- the stage's captured decode graph for B replayed
back to back (it holds the embedding, the layers, the final norm and lm_head) and the sampler's draw on its
logits, both timed with CUDA events -- and a per-phase breakdown of the host's part from ``HostPhases`` (a second
run of as many steps with the timers on), both in the synchronous order, whatever the engine's setting: nothing
overlaps the host's work with the GPU's, and what the step takes beyond replay and draw is the host's share. A
third run of as many steps (after WARM_STEPS untimed) runs one step ahead (``Engine.set_run_ahead``: each step submitted
before the previous one's tokens are read), so the host's work overlaps the GPU's: ``run_ahead_step_ms`` against
``step_ms`` is what that buys, in the same run. On CPU the "replay" is the same decode step run eagerly
on the graph's buffers, timed by the clock, so that the section runs (and is tested) without a GPU.
"""

from __future__ import annotations

import time

import torch

from ..engine.engine import Engine, Prompt
from ..engine.sampling import SamplingParams, draw, make_generator
from ..pipeline.host_phases import HostPhases
from ..runtime.cuda_graph import DecodeGraphs
from .timing import cuda_time

BATCHES = (1, 4, 8)
WARM_STEPS = 3
TAIL_STEPS = 2  # tokens left after the timed run-ahead steps, so that the last of them also has a step behind it


def tokens_needed(steps: int) -> int:
    """New tokens each sequence of a row makes: its first, the warm-up, the two synchronous runs, the run ahead
    (its warm-up, its timed steps, the tail)."""
    return 1 + WARM_STEPS + 2 * steps + WARM_STEPS + steps + TAIL_STEPS


def host_share(engine: Engine, batches: tuple[int, ...], prompt_len: int, steps: int, temperature: float,
               seed: int) -> list[dict]:
    """One row per batch size (see the module's docstring); ``engine`` must run its one stage in this process."""
    runtime = engine.executor.runtime
    was = engine.run_ahead
    engine.set_run_ahead(False)
    try:
        return [_batch_row(engine, runtime, b, prompt_len, steps, temperature, seed + b) for b in batches]
    finally:
        engine.set_run_ahead(was)


def _batch_row(engine: Engine, runtime, b: int, prompt_len: int, steps: int, temperature: float,
               seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    seqs = [engine.add(Prompt(torch.randint(1000, 100000, (prompt_len,), generator=g).tolist()),
                       SamplingParams(temperature=temperature, seed=seed * 1000 + i, stop_token_ids=(),
                                      max_new_tokens=tokens_needed(steps)))
            for i in range(b)]
    while any(s.t_first_token is None for s in seqs):  # the prompts' steps
        engine.step()
    for _ in range(WARM_STEPS):
        engine.step()
    t0 = time.perf_counter()
    for _ in range(steps):
        engine.step()
    step_s = (time.perf_counter() - t0) / steps
    phases = HostPhases()
    engine.host_phases = runtime.host_phases = phases
    try:
        for _ in range(steps):
            engine.step()
    finally:
        engine.host_phases = runtime.host_phases = None
    ahead_s = _run_ahead_s(engine, steps)
    if any(len(s.output) != tokens_needed(steps) for s in seqs) or engine.has_work():
        raise RuntimeError(f"host share, batch {b}: the measured steps were not all {b}-row decode steps")
    replay_ms, captured, logits = _replay_ms(runtime, b, steps)
    sample_ms = _sample_ms(logits, temperature, steps)
    step_ms = step_s * 1e3
    host_ms = step_ms - replay_ms - sample_ms
    return {"batch": b, "step_ms": round(step_ms, 4), "graph_replay_ms": round(replay_ms, 4), "captured": captured,
            "sample_ms": round(sample_ms, 4), "host_ms": round(host_ms, 4),
            "host_share": round(host_ms / step_ms, 4), "phases_ms": phases.per_step_ms(),
            "run_ahead_step_ms": None if ahead_s is None else round(ahead_s * 1e3, 4)}


def _run_ahead_s(engine: Engine, steps: int) -> float | None:
    """Seconds per step of ``steps`` decode steps run one step ahead, after WARM_STEPS untimed ones, then the tail
    in the synchronous order; None where the executor cannot run ahead (those steps then run synchronously). On
    the CPU the step itself waits for its tokens, so nothing overlaps there."""
    ahead = getattr(engine.executor, "can_run_ahead", False)
    if ahead:
        engine.set_run_ahead(True)
    try:
        for _ in range(WARM_STEPS):
            engine.step()
        t0 = time.perf_counter()
        for _ in range(steps):
            engine.step()
        return (time.perf_counter() - t0) / steps if ahead else None
    finally:
        engine.set_run_ahead(False)  # a step still ahead is collected by the next step() as usual
        while engine.has_work():
            engine.step()


def _replay_ms(runtime, b: int, n: int) -> tuple[float, bool, torch.Tensor]:
    """Device time of the stage's decode step for b rows alone (the graph's buffers hold the engine's last step),
    whether it is a captured graph, and the step's logits [b, V]."""
    graphs = getattr(runtime.model, "graphs", None)
    if graphs is None:  # no GraphedStage (CPU): the same step, eager, on b rows in the cache's scratch block
        graphs = DecodeGraphs(runtime.model, runtime.cache, buckets=(b,))
        zeros = torch.zeros(b, dtype=torch.long)
        graphs.load([[graphs.scratch]] * b, [0] * b, zeros.expand(3, -1), zeros,
                    torch.zeros(b, runtime.model.cfg.text.hidden_size, dtype=graphs.dtype))
    bucket = graphs.bucket(b)
    ms = _timed_ms(lambda: graphs.replay(bucket), n, graphs.device)
    return ms, bucket in graphs.graphs, graphs.replay(bucket)[:b].float()


def _sample_ms(logits: torch.Tensor, temperature: float, n: int) -> float:
    """The sampler's draw on logits [B, V] as a step makes it: each row with its own seeded generator."""
    b = logits.shape[0]
    params = [SamplingParams(temperature=temperature, seed=i) for i in range(b)]
    gens = [make_generator(i, logits.device) for i in range(b)]
    return _timed_ms(lambda: draw(logits, params, gens), n, logits.device)


def _timed_ms(fn, n: int, device: torch.device) -> float:
    """Mean milliseconds of ``fn`` run n times back to back after one warm-up run: CUDA events on a GPU (device
    time, plus any gaps the host leaves between launches), the clock on CPU."""
    with torch.inference_mode():
        if device.type == "cuda":
            return cuda_time(fn, iters=n, reps=1, warmup=1)
        fn()
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        return (time.perf_counter() - t0) * 1e3 / n
