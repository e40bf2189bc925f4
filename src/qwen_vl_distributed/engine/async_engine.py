"""The engine behind an asyncio server: one background thread owns the (not thread-safe) ``Engine``.

Every touch of the engine happens on that thread. Callers on an event loop talk to it through a thread-safe command
queue (add / abort / finish) and get each request's tokens back on an ``asyncio.Queue`` filled with
``loop.call_soon_threadsafe``, so the loop never blocks on a model step and the engine never waits on the loop.

Admission is bounded: at most ``max_batch + max_queue`` requests are outstanding (running, or waiting for a place
in the batch or for KV blocks); ``submit`` beyond that raises ``QueueFullError`` at once instead of letting a backlog
grow without limit. A request that could never run (``Engine.check``) raises ``PromptError`` at ``submit``.

A server shutting down ends the requests still waiting (``end_waiting``), lets the running ones finish, and ends
whatever is left when its grace is over (``end_all``): each such request's last output carries an error and its code.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from .engine import CacheStats, Engine, Prompt, Sequence, TokenEvent

log = logging.getLogger(__name__)

# How often the engine thread refreshes the executor's per-stage figures (a pipeline may answer them over the wire).
STATS_INTERVAL_S = 0.25
# How long the idle engine thread sleeps on the command queue before looking at its stop flag again.
IDLE_WAIT_S = 0.5


class QueueFullError(RuntimeError):
    """The batch is full and the waiting queue is at its bound: try again later."""


class EngineDeadError(RuntimeError):
    """The engine thread has stopped (shut down, or a step raised): no request can be served."""


ENGINE_FAILURE = "engine_failure"  # Output.code of requests ended by a failed step


@dataclass
class Output:
    """One item of a request's stream: a token, the end of the request, or both.

    token is None for an end that produced no token (abort, or a stop found outside the engine); error is set
    when the request ends without a reason of its own (the engine failed, or ``end_waiting`` / ``end_all`` ended
    it), and code says which."""

    token: int | None
    finish_reason: str | None = None
    error: str | None = None
    code: str = ENGINE_FAILURE
    cached: int | None = None  # with the first token: prompt tokens taken from the prefix cache
    logprobs: list | None = None  # with a token, when asked for: [logprob, [[id, logprob], ...]]

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None or self.error is not None


@dataclass
class RequestHandle:
    """A submitted request as seen from the event loop. ``seq`` is set and read on the engine thread only."""

    id: int
    prompt: Prompt
    params: Any
    loop: asyncio.AbstractEventLoop
    outputs: asyncio.Queue = field(default_factory=asyncio.Queue)
    seq: Sequence | None = None
    closed: bool = False  # engine thread: no more outputs will be pushed

    async def next(self) -> Output:
        return await self.outputs.get()


@dataclass(frozen=True)
class EngineStats:
    """A snapshot published by the engine thread (read lock-free: it is replaced, never mutated)."""

    waiting: int = 0  # sequences queued for a place in the batch or for KV blocks
    running: int = 0  # sequences holding KV blocks
    stages: tuple[dict, ...] = ()  # executor.stage_stats(): per stage busy_s, steps
    alive: bool = True
    cache: CacheStats = CacheStats()

    @property
    def kv_usage(self) -> float:
        """Fraction of the KV cache's blocks held by sequences."""
        return self.cache.usage


class AsyncEngine:
    def __init__(self, engine: Engine, max_queue: int = 64):
        if max_queue < 0:
            raise ValueError(f"max_queue must be >= 0, got {max_queue}")
        self.engine = engine
        self.capacity = engine.max_batch + max_queue
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._handles: dict[int, RequestHandle] = {}  # engine thread: seq.id -> handle
        self._outstanding = 0  # accepted, not yet closed; guarded by _lock
        self._closed = False  # no more adds (the engine thread has stopped); guarded by _lock
        self._lock = threading.Lock()
        self._ids = itertools.count()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._stats = EngineStats()
        self._stats_at = 0.0
        self.error: str | None = None

    # -- lifecycle ------------------------------------------------------------------------------------------------
    def start(self) -> None:
        if self._thread is not None:
            raise RuntimeError("AsyncEngine already started")
        self._thread = threading.Thread(target=self._run, name="engine", daemon=True)
        self._thread.start()

    def shutdown(self, timeout: float = 10.0) -> None:
        """Stop the engine thread; requests still outstanding end with finish_reason 'abort'."""
        self._stop.set()
        self._commands.put(("wake", None))
        if self._thread is not None:
            self._thread.join(timeout)

    @property
    def thread_running(self) -> bool:
        """The engine thread has not returned (it may still be inside a step after shutdown's join timed out)."""
        return self._thread is not None and self._thread.is_alive()

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and not self._stop.is_set()

    # -- called on the event loop ----------------------------------------------------------------------------------
    def submit(self, prompt: Prompt, params: Any) -> RequestHandle:
        """Queue a request; its outputs arrive on ``handle.next()``. Must be called from a running event loop.
        PromptError: the request could never run (checked here, against settings fixed at start-up)."""
        return self.submit_group(prompt, [params])[0]

    def submit_group(self, prompt: Prompt, params: list[Any]) -> list[RequestHandle]:
        """Queue one sequence per ``params`` over the same prompt (a request's n choices), all or none; the engine
        computes the prompt once and the choices share its KV blocks."""
        for p in params:
            self.engine.check(len(prompt.input_ids), p.max_new_tokens)
        loop = asyncio.get_running_loop()
        handles = [RequestHandle(next(self._ids), prompt, p, loop) for p in params]
        # Under the lock, so an add is either queued before the engine thread's last drain or refused here.
        with self._lock:
            if self._thread is None or self._closed:
                raise EngineDeadError(self.error or "the engine is not running")
            if self._outstanding + len(handles) > self.capacity:
                raise QueueFullError(f"{self._outstanding} requests in flight; the limit is {self.capacity}")
            self._outstanding += len(handles)
            for handle in handles:
                self._commands.put(("add", handle))
        return handles

    def abort(self, handle: RequestHandle) -> None:
        """The client is gone: free the request's KV blocks (a no-op once it has finished)."""
        self._commands.put(("abort", handle))

    def finish(self, handle: RequestHandle, reason: str) -> None:
        """End a request for a reason found outside the engine (a stop string in its text)."""
        self._commands.put(("finish", handle, reason))

    def end_waiting(self, code: str, message: str) -> None:
        """End every request that holds no KV slot yet with this error (it frees nothing; nothing ran)."""
        self._commands.put(("end", None, code, message, True))

    def end_all(self, code: str, message: str) -> None:
        """End every open request with this error and free its slot."""
        self._commands.put(("end", None, code, message, False))

    def stats(self) -> EngineStats:
        return self._stats

    @property
    def outstanding(self) -> int:
        return self._outstanding

    # -- the engine thread -----------------------------------------------------------------------------------------
    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                self._drain_commands(block=not self.engine.has_work())
                busy = self.engine.has_work()
                # with no work a step only lets the executor idle (a pipeline sends its heartbeats)
                self._dispatch(self.engine.step())
                # Fresh figures whenever the engine falls idle, so a scrape after a burst sees all of it.
                self._publish_stats(force=busy and not self.engine.has_work())
        except Exception as e:  # a failed step leaves the engine in an unknown state: stop serving
            log.exception("engine step failed; the engine is stopping")
            self.error = f"engine failure: {type(e).__name__}: {e}"
        finally:
            self._stop.set()
            with self._lock:
                self._closed = True
            self._close_all()
            self._publish_stats(force=True)

    def _drain_commands(self, block: bool) -> None:
        try:
            cmd = self._commands.get(timeout=IDLE_WAIT_S) if block else self._commands.get_nowait()
            while True:
                self._apply(cmd)
                cmd = self._commands.get_nowait()
        except queue.Empty:
            pass

    def _apply(self, cmd: tuple) -> None:
        kind, handle = cmd[0], cmd[1]
        if kind == "add":
            self._add(handle)
        elif kind == "abort" and not handle.closed:
            if handle.seq is not None:
                self.engine.abort(handle.seq)
            self._close(handle, Output(None, "abort"))
        elif kind == "finish" and not handle.closed:
            if handle.seq is not None:
                self.engine.finish(handle.seq, cmd[2])
            self._close(handle, Output(None, cmd[2]))
        elif kind == "end":
            self._end(*cmd[2:])

    def _end(self, code: str, message: str, waiting_only: bool) -> None:
        waiting = {id(s) for s in self.engine.waiting}
        for handle in list(self._handles.values()):
            if not waiting_only or id(handle.seq) in waiting:
                self.engine.abort(handle.seq)
                self._close(handle, Output(None, error=message, code=code))

    def _add(self, handle: RequestHandle) -> None:
        try:
            handle.seq = self.engine.add(handle.prompt, handle.params)
        except ValueError as e:  # the server checks lengths first; this is the engine's own guard
            self._close(handle, Output(None, error=str(e)))
            return
        self._handles[handle.seq.id] = handle

    def _dispatch(self, events: list[TokenEvent]) -> None:
        for ev in events:
            handle = self._handles.get(ev.seq.id)
            if handle is None or handle.closed:
                continue
            out = Output(ev.token, ev.seq.finish_reason if ev.finished else None,
                         cached=ev.seq.cached_tokens if len(ev.seq.output) == 1 else None, logprobs=ev.logprobs)
            if ev.finished:
                self._close(handle, out)
            else:
                self._push(handle, out)

    def _close(self, handle: RequestHandle, last: Output) -> None:
        handle.closed = True
        if handle.seq is not None:
            self._handles.pop(handle.seq.id, None)
        with self._lock:
            self._outstanding -= 1
        self._push(handle, last)

    def _close_all(self) -> None:
        """On the way out: every request still open ends (abort on shutdown, error on failure)."""
        for cmd in self._pending_commands():
            if cmd[0] == "add" and not cmd[1].closed:
                self._close(cmd[1], Output(None, "abort" if self.error is None else None, self.error))
        for handle in list(self._handles.values()):
            self._close(handle, Output(None, "abort" if self.error is None else None, self.error))

    def _pending_commands(self) -> list[tuple]:
        out = []
        try:
            while True:
                out.append(self._commands.get_nowait())
        except queue.Empty:
            return out

    @staticmethod
    def _push(handle: RequestHandle, out: Output) -> None:
        try:
            handle.loop.call_soon_threadsafe(handle.outputs.put_nowait, out)
        except RuntimeError:  # the request's event loop has closed: nobody is listening
            pass

    def _publish_stats(self, force: bool = False) -> None:
        now = time.monotonic()
        stages = self._stats.stages
        if force or now - self._stats_at >= STATS_INTERVAL_S:
            try:
                stages = tuple(self.engine.executor.stage_stats())
            except Exception:  # a broken pipeline must not hide the engine's own figures
                log.debug("stage_stats failed", exc_info=True)
            self._stats_at = now
        self._stats = EngineStats(len(self.engine.waiting), len(self.engine.running), stages, not self._stop.is_set(),
                                  self.engine.cache_stats())
