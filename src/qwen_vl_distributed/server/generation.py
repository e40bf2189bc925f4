"""One request's output on the server side: engine tokens -> text -> stop strings -> (reasoning, content) pieces.

Streaming and non-streaming responses both consume ``Generation.pieces()``, so they cannot disagree. Stop strings
are matched on the whole generated text (reasoning included, as vLLM does); the stop string itself is never
returned, and the engine is told to free the sequence at once.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any, AsyncIterator

from ..engine.async_engine import ENGINE_FAILURE, AsyncEngine, Output, RequestHandle
from ..engine.reasoning import ReasoningStreamParser
from ..engine.sampling import StopStringMatcher
from .errors import DEADLINE_EXCEEDED
from .metrics import Metrics


class EngineFailure(RuntimeError):
    """The request ended without finishing: the engine stopped, the server is shutting down, or its deadline
    passed. ``code`` says which (``Output.code``, or DEADLINE_EXCEEDED)."""

    def __init__(self, message: str, code: str = ENGINE_FAILURE):
        super().__init__(message)
        self.code = code


class TextStream:
    """Token ids in; (reasoning delta, content delta, stopped) out."""

    def __init__(self, processor: Any, stops: tuple[str, ...]):
        self.detok = processor.detokenizer()
        self.stops = StopStringMatcher(stops)
        self.reasoning = ReasoningStreamParser()

    def add(self, token: int) -> tuple[str, str, bool]:
        text, stopped = self.stops.feed(self.detok.add(token))
        r, c = self.reasoning.feed(text)
        if stopped:
            r2, c2 = self.reasoning.finish()
            r, c = r + r2, c + c2
        return r, c, stopped

    def finish(self) -> tuple[str, str, bool]:
        """The end of the output: release held-back text (a partial stop string, an unfinished tag).

        The last bytes may still complete a stop string (then stopped is True)."""
        text, stopped = self.stops.feed(self.detok.finish())
        r, c = self.reasoning.feed(text + ("" if stopped else self.stops.flush()))
        r2, c2 = self.reasoning.finish()
        return r + r2, c + c2, stopped


class Generation:
    def __init__(self, engine: AsyncEngine, handle: RequestHandle, text: TextStream, prompt_tokens: int,
                 t_arrival: float, metrics: Metrics, deadline: float | None = None):
        self.engine = engine
        self.handle = handle
        self.text = text
        self.prompt_tokens = prompt_tokens
        self.completion_tokens = 0
        self.cached_tokens = 0  # prompt tokens served from the KV cache (prefix reuse)
        self.finish_reason: str | None = None
        self.t_arrival = t_arrival
        self.metrics = metrics
        self.deadline = deadline  # time.monotonic() by which the request must have ended, or None
        self._closed = False

    async def pieces(self) -> AsyncIterator[tuple[str, str]]:
        """(reasoning delta, content delta) pairs until the request ends; sets ``finish_reason``.

        Leaving early (client gone: cancellation or ``aclose``) aborts the request in the engine."""
        try:
            while self.finish_reason is None:
                out = await self._next()
                if out.error is not None:
                    self.finish_reason = "error"
                    raise EngineFailure(out.error, out.code)
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

    async def _next(self) -> Output:
        if self.deadline is None:
            return await self.handle.next()
        try:
            return await asyncio.wait_for(self.handle.next(), self.deadline - time.monotonic())
        except asyncio.TimeoutError:
            self.engine.abort(self.handle)  # its slot is free for the next step
            self.finish_reason = DEADLINE_EXCEEDED
            raise EngineFailure("the request's deadline passed before it finished", DEADLINE_EXCEEDED) from None

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
