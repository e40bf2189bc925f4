"""One choice's output on the server side: engine tokens -> ``OutputStream`` text (reasoning split, stop strings)
-> tool calls -> ``Update`` items; and the merge of a request's n choices.

Streaming and non-streaming responses both consume ``Generation.updates()``, so they cannot disagree. A stop string
found in the text ends the sequence in the engine at once (its KV blocks are freed).
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import AsyncIterator

from ..engine.async_engine import ENGINE_FAILURE, AsyncEngine, Output, RequestHandle
from ..engine.output import OutputStream, Piece
from .errors import DEADLINE_EXCEEDED
from .metrics import Metrics
from .protocol import ToolCall
from .tools import ToolCallParser

NEG_INF_LOGPROB = -9999.0  # what a banned token's log-probability (-inf) is sent as: JSON has no infinity


class EngineFailure(RuntimeError):
    """The request ended without finishing: the engine stopped, the server is shutting down, or its deadline
    passed. ``code`` says which (``Output.code``, or DEADLINE_EXCEEDED)."""

    def __init__(self, message: str, code: str = ENGINE_FAILURE):
        super().__init__(message)
        self.code = code


@dataclass
class TokenLogprobs:
    token: int
    logprob: float
    top: list[tuple[int, float]]


@dataclass
class Update:
    """What one choice produced since its last update."""

    index: int
    reasoning: str = ""
    content: str = ""
    calls: list[ToolCall] = field(default_factory=list)
    logprobs: list[TokenLogprobs] = field(default_factory=list)
    finish_reason: str | None = None

    def __bool__(self) -> bool:
        return bool(self.reasoning or self.content or self.calls or self.logprobs or self.finish_reason)


@dataclass
class Result:
    """A choice's whole output (the non-streaming response)."""

    reasoning: str = ""
    content: str = ""
    calls: list[ToolCall] = field(default_factory=list)
    logprobs: list[TokenLogprobs] = field(default_factory=list)
    finish_reason: str | None = None

    def add(self, u: Update) -> None:
        self.reasoning += u.reasoning
        self.content += u.content
        self.calls += u.calls
        self.logprobs += u.logprobs
        self.finish_reason = u.finish_reason or self.finish_reason


def _finite(x: float) -> float:
    return x if x > NEG_INF_LOGPROB else NEG_INF_LOGPROB


class Generation:
    """One sequence of a request (choice ``index``), ending by ``deadline`` (``time.monotonic()``) if it has one."""

    def __init__(self, engine: AsyncEngine, handle: RequestHandle, text: OutputStream, tools: ToolCallParser | None,
                 index: int, prompt_tokens: int, t_arrival: float, metrics: Metrics, count_prompt: bool = True,
                 deadline: float | None = None):
        self.engine = engine
        self.handle = handle
        self.text = text
        self.tools = tools
        self.index = index
        self.prompt_tokens = prompt_tokens
        self.count_prompt = count_prompt  # a request's prompt counts once, with its first choice
        self.completion_tokens = 0
        self.cached_tokens = 0  # prompt tokens served from the KV cache (prefix reuse)
        self.finish_reason: str | None = None
        self.t_arrival = t_arrival
        self.t_last: float | None = None
        self.metrics = metrics
        self.any_call = False
        self.deadline = deadline
        self._closed = False

    async def updates(self) -> AsyncIterator[Update]:
        """Updates until the sequence ends (the last one has ``finish_reason``). Leaving early (client gone:
        cancellation or ``aclose``) aborts the sequence in the engine."""
        try:
            while self.finish_reason is None:
                out = await self._next()
                if out.error is not None:
                    self.finish_reason = "error"
                    raise EngineFailure(out.error, out.code)
                if out.cached is not None:
                    self.cached_tokens = out.cached
                u = Update(self.index)
                piece = Piece()
                if out.token is not None:
                    piece = self._token(out.token, out.logprobs, u)
                    if piece.stopped:
                        self.finish_reason = "stop"
                        self.engine.finish(self.handle, "stop")
                if out.finish_reason is not None and self.finish_reason is None:
                    last = self.text.finish()
                    self.finish_reason = "stop" if last.stopped else out.finish_reason
                    piece.reasoning, piece.content = piece.reasoning + last.reasoning, piece.content + last.content
                self._parse(piece, u)
                if self.finish_reason is not None:
                    u.finish_reason = ("tool_calls" if self.any_call and self.finish_reason == "stop"
                                       else self.finish_reason)
                if u:
                    yield u
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

    def _token(self, token: int, logprobs: list | None, u: Update) -> Piece:
        now = time.perf_counter()
        if self.completion_tokens == 0:
            self.metrics.first_token(now - self.t_arrival)
        elif self.t_last is not None:
            self.metrics.inter_token(now - self.t_last)
        self.t_last = now
        self.completion_tokens += 1
        if logprobs is not None:
            lp, top = logprobs
            u.logprobs.append(TokenLogprobs(token, _finite(lp), [(t, _finite(x)) for t, x in top]))
        return self.text.add(token)

    def _parse(self, piece: Piece, u: Update) -> None:
        u.reasoning = piece.reasoning
        if self.tools is None:
            u.content = piece.content
            return
        parsed = self.tools.feed(piece.content)
        if self.finish_reason is not None:
            rest = self.tools.finish()
            parsed.content += rest.content
            parsed.calls += rest.calls
        u.content, u.calls = parsed.content, parsed.calls
        self.any_call = self.any_call or bool(parsed.calls)

    async def collect(self) -> Result:
        r = Result()
        async for u in self.updates():
            r.add(u)
        return r

    def close(self) -> None:
        """Idempotent: abort in the engine if still running, and count the sequence once."""
        if self._closed:
            return
        self._closed = True
        if self.finish_reason is None:
            self.engine.abort(self.handle)
            self.finish_reason = "abort"
        self.metrics.generation_done(self.finish_reason, self.prompt_tokens if self.count_prompt else 0,
                                     self.completion_tokens, time.perf_counter() - self.t_arrival)


async def merged(gens: list[Generation]) -> AsyncIterator[Update]:
    """The updates of all choices, in the order they come. Leaving early closes every choice."""
    if len(gens) == 1:
        async for u in gens[0].updates():
            yield u
        return
    queue: asyncio.Queue = asyncio.Queue()
    done = object()

    async def pump(g: Generation) -> None:
        try:
            async for u in g.updates():
                await queue.put(u)
            await queue.put(done)
        except BaseException as e:  # an engine failure (or cancellation) ends the merge
            await queue.put(e)

    tasks = [asyncio.ensure_future(pump(g)) for g in gens]
    try:
        left = len(gens)
        while left:
            item = await queue.get()
            if item is done:
                left -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield item
    finally:
        for t in tasks:
            t.cancel()
        for g in gens:
            g.close()


async def collect_all(gens: list[Generation]) -> list[Result]:
    results = [Result() for _ in gens]
    async for u in merged(gens):
        results[u.index].add(u)
    return results
