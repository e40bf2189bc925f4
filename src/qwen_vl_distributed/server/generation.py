"""One request's output on the server side: engine tokens -> text -> stop strings -> (reasoning, content) pieces.

Streaming and non-streaming responses both consume ``Generation.pieces()``, so they cannot disagree. Stop strings
are matched on the whole generated text (reasoning included, as vLLM does); the stop string itself is never
returned, and the engine is told to free the sequence at once.
"""

from __future__ import annotations

import time
from typing import AsyncIterator

from ..engine.async_engine import AsyncEngine, RequestHandle
from ..engine.session import TextStream
from .metrics import Metrics


class EngineFailure(RuntimeError):
    """The engine stopped while this request was running."""


class Generation:
    def __init__(self, engine: AsyncEngine, handle: RequestHandle, text: TextStream, prompt_tokens: int,
                 t_arrival: float, metrics: Metrics):
        self.engine = engine
        self.handle = handle
        self.text = text
        self.prompt_tokens = prompt_tokens
        self.completion_tokens = 0
        self.cached_tokens = 0  # prompt tokens served from the KV cache (prefix reuse)
        self.finish_reason: str | None = None
        self.t_arrival = t_arrival
        self.metrics = metrics
        self._closed = False

    async def pieces(self) -> AsyncIterator[tuple[str, str]]:
        """(reasoning delta, content delta) pairs until the request ends; sets ``finish_reason``.

        Leaving early (client gone: cancellation or ``aclose``) aborts the request in the engine."""
        try:
            while self.finish_reason is None:
                out = await self.handle.next()
                if out.error is not None:
                    self.finish_reason = "error"
                    raise EngineFailure(out.error)
                r = c = ""
                if out.cached is not None:
                    self.cached_tokens = out.cached
                if out.token is not None:
                    r, c, stopped = self._token(out.token)
                    if stopped:
                        self.finish_reason = "stop"
                        self.engine.finish(self.handle, "stop")
                if out.finish_reason is not None and self.finish_reason is None:
                    r2, c2, stopped = self.text.finish()
                    self.finish_reason = "stop" if stopped else out.finish_reason
                    r, c = r + r2, c + c2
                if r or c:
                    yield r, c
        finally:
            self.close()

    def _token(self, token: int) -> tuple[str, str, bool]:
        if self.completion_tokens == 0:
            self.metrics.ttft.observe(time.perf_counter() - self.t_arrival)
        self.completion_tokens += 1
        return self.text.add(token)

    async def collect(self) -> tuple[str, str]:
        """The whole output as (reasoning, content)."""
        rs, cs = [], []
        async for r, c in self.pieces():
            rs.append(r)
            cs.append(c)
        return "".join(rs), "".join(cs)

    def close(self) -> None:
        """Idempotent: abort in the engine if still running, and count the request once."""
        if self._closed:
            return
        self._closed = True
        if self.finish_reason is None:
            self.engine.abort(self.handle)
            self.finish_reason = "abort"
        self.metrics.generation_done(self.finish_reason, self.prompt_tokens, self.completion_tokens,
                                     self.cached_tokens)
