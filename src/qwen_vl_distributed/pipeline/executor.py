"""How stage 0's driver reaches the pipeline: submit a step, later collect its sampled tokens.

LocalExecutor is the pipeline with S = 1 (the one stage runs in this process). PipelineExecutor (transport.py) runs
stage 0 here and sends the step on; tokens come back from the last stage in submission order (the pipeline is FIFO).
"""

from __future__ import annotations

from collections import deque

from .payload import StepPayload, TokenPayload
from .stage import StageRuntime


class LocalExecutor:
    num_stages = 1

    def __init__(self, runtime: StageRuntime):
        self.runtime = runtime
        self._done: deque[TokenPayload] = deque()

    def submit(self, p: StepPayload) -> None:
        out = self.runtime.run(p)
        assert isinstance(out, TokenPayload), "a single stage must hold the whole model"
        self._done.append(out)

    def collect(self) -> TokenPayload:
        return self._done.popleft()

    def stage_stats(self) -> list[dict]:
        return [{"stage": 0, "busy_s": self.runtime.busy_s, "steps": self.runtime.steps}]

    def idle(self) -> None:
        """Called when the driver has nothing to do (lets a pipeline send heartbeats)."""

    def shutdown(self) -> None:
        pass
