"""Opt-in host timers of the driver's steps: where the host's share of a decode step goes (bench-pipeline).

A lap timer: ``begin()`` at the start of a step, then ``lap(name)`` at the end of each phase adds the time since
the previous mark to that phase. The engine and the stage runtime hold one as ``host_phases`` (None by default:
every call site is a single ``if`` on it, nothing more). ``wait`` is the one phase that is not host work: with the
timer on, the stage synchronises with the GPU before sampling so that the time it waits for the forward is
counted apart from the sampler's own (off, the same wait happens inside the sampler's copy of the tokens back).
"""

from __future__ import annotations

import time
from collections import defaultdict

import torch

# the phases of one decode step, in the order they happen (bench-pipeline's table lists them so)
PHASES = ("schedule", "payload", "launch", "wait", "sample", "tokens", "bookkeeping")


class HostPhases:
    def __init__(self):
        self.seconds: dict[str, float] = defaultdict(float)
        self.steps = 0
        self._t = 0.0

    def begin(self) -> None:
        self.steps += 1
        self._t = time.perf_counter()

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        self.seconds[name] += now - self._t
        self._t = now

    def wait(self, device: torch.device) -> None:
        """Time until the GPU has run what was queued so far (the 'wait' phase)."""
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        self.lap("wait")

    def per_step_ms(self) -> dict[str, float]:
        """Mean milliseconds per step of each phase, in step order."""
        n = max(self.steps, 1)
        return {k: round(self.seconds[k] * 1e3 / n, 4) for k in PHASES if k in self.seconds}
