"""How stage 0's driver reaches the pipeline: submit a step, later collect its sampled tokens.

LocalExecutor is the pipeline with S = 1 (the one stage runs in this process). PipelineExecutor (transport.py) runs
stage 0 here and sends the step on; tokens come back from the last stage in submission order (the pipeline is FIFO).
"""

from __future__ import annotations

import time
from collections import deque

from .payload import StepPayload, TokenPayload
from .stage import StageRuntime


class LocalExecutor:
    """The one stage runs here (with tensor ranks, this process leads them: ``heartbeat_s`` keeps their waits
    bounded while the driver is idle)."""

    num_stages = 1

    def __init__(self, runtime: StageRuntime, heartbeat_s: float | None = None):
        self.runtime = runtime
        self.can_run_ahead = runtime.can_run_ahead
        self.heartbeat_s = heartbeat_s
        self._last_traffic = time.monotonic()
        self._done: deque[TokenPayload] = deque()

    def submit(self, p: StepPayload) -> None:
        out = self.runtime.run(p)
        assert isinstance(out, TokenPayload), "a single stage must hold the whole model"
        out.stats = [self.runtime.stats()]
        self._done.append(out)
        self._last_traffic = time.monotonic()

    def run_ahead(self, on: bool = True) -> None:
        """Let the driver submit a step before it collects the one before (``StepPayload.ids_from``): the stage
        keeps its sampled tokens on the device and copies them back behind the step (off: read back at once)."""
        if on and not self.can_run_ahead:
            raise ValueError("running ahead needs the one stage of one rank in this process")
        self.runtime.defer_tokens = on

    def collect(self) -> TokenPayload:
        return self._done.popleft().settle()  # the tokens' copy to the host, queued behind their step

    def stage_stats(self) -> list[dict]:
        return [self.runtime.stats()]

    def idle(self) -> None:
        """Called when the driver has nothing to do: heartbeats to the stage's other tensor ranks, if any."""
        if self.heartbeat_s is not None and time.monotonic() - self._last_traffic >= self.heartbeat_s:
            self.runtime.signal("heartbeat")
            self._last_traffic = time.monotonic()

    def shutdown(self) -> None:
        self.runtime.signal("stop")


class PipelineExecutor:
    """Stage 0 of an S-stage pipeline, driven by the engine in this process."""

    can_run_ahead = False  # the micro-batch groups keep the stages busy while the driver works

    def __init__(self, runtime: StageRuntime, transport, heartbeat_s: float):
        self.runtime = runtime
        self.transport = transport
        self.num_stages = transport.world
        self.heartbeat_s = heartbeat_s
        self._last_traffic = time.monotonic()
        self._stats: list[dict] = []

    def submit(self, p: StepPayload) -> None:
        out = self.runtime.run(p)
        out.stats = [self.runtime.stats()]
        self.transport.send_step(out)
        self._last_traffic = time.monotonic()

    def collect(self) -> TokenPayload:
        out = self.transport.recv_tokens()
        self._stats = out.stats
        self._last_traffic = time.monotonic()
        return out

    def stage_stats(self) -> list[dict]:
        return self._stats or [self.runtime.stats()]

    def idle(self) -> None:
        """With nothing in flight, prove every stage alive every ``heartbeat_s`` (and keep their waits bounded)."""
        if time.monotonic() - self._last_traffic < self.heartbeat_s:
            return
        self.runtime.signal("heartbeat")
        self.transport.send_step(StepPayload(kind="heartbeat"))
        back = self.transport.recv_tokens()
        if back.kind != "heartbeat":
            raise RuntimeError(f"pipeline out of order: expected a heartbeat, got {back.kind}")
        self._last_traffic = time.monotonic()

    def shutdown(self) -> None:
        """Send 'stop' round the ring and wait for it to come back, so every stage has left its loop."""
        self.runtime.signal("stop")
        self.transport.send_step(StepPayload(kind="stop"))
        while self.transport.recv_tokens().kind != "stop":
            pass
        self.transport.flush()
