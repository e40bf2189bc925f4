"""Who may start, and how the service ends.

``Admission``: a request takes a place before its body is read, so the queue bound (``--max-batch`` running plus
``--max-queue``) also counts requests still arriving or being preprocessed: a full server answers 503 before it
reads or does anything, and no more bodies than places are held in memory at once.
Preprocessing runs in a pool of the process's share of the cores (``engine/threads.py``), so a small request is not
queued behind a large one; a deadline or a shutdown ends the wait for it.

``Service``: uvicorn's server with the service's ending rules.
- SIGTERM / SIGINT drain (``drain``): new requests get 503 ``shutting_down``; requests waiting for a KV slot end at
  once (503, or an error event and ``[DONE]`` in a stream); running ones may finish within ``--shutdown-grace``
  seconds, then end the same way; then the server stops. A second signal ends the running requests at once.
- The engine stopping on a failure (a stage died or stayed silent past ``--stage-timeout``): every open request has
  had its error; the server stops, and ``failure`` says why, for ``serve`` to print and exit non-zero on. A
  pipeline is not restarted in place: a stage's KV cache and the requests in it are gone with it, so the process
  exits and its supervisor (systemd, Kubernetes) starts a fresh one.
"""

from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any, Callable, Iterator

import uvicorn

from ..engine.async_engine import AsyncEngine
from .errors import DEADLINE_EXCEEDED, SHUTTING_DOWN, APIError

log = logging.getLogger(__name__)

TICK_S = 0.05  # how often a drain looks at what is still running


class Place:
    """One request's place in the queue, held until ``release`` (idempotent)."""

    def __init__(self, admission: Admission):
        self.admission = admission
        self.held = True
        admission.preparing += 1

    def release(self) -> None:
        if self.held:
            self.held = False
            self.admission.preparing -= 1


class Admission:
    """Places in the queue for requests being preprocessed, and the pool they are preprocessed in."""

    def __init__(self, engine: AsyncEngine, workers: int, retry_after_s: int):
        self.engine = engine
        self.retry_after_s = retry_after_s
        self.pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="preprocess")
        self.preparing = 0  # requests holding a place that the engine does not count yet
        self.closing = False
        self._closed: asyncio.Event | None = None  # made on the event loop, at the first request

    @contextmanager
    def place(self) -> Iterator[Place]:
        """Hold a place from here until the request is submitted to the engine (which then counts it: release the
        place then) or leaves the block."""
        if self.closing:
            raise shutting_down("the server is shutting down", self.retry_after_s)
        if not self.engine.alive:
            raise APIError(503, "the engine is not running", "server_error", None, "engine_stopped")
        if self.engine.outstanding + self.preparing >= self.engine.capacity:
            raise APIError(503, f"the server is busy ({self.engine.capacity} requests in flight); retry later",
                           "server_error", None, "queue_full", {"Retry-After": str(self.retry_after_s)})
        place = Place(self)
        try:
            yield place
        finally:
            place.release()

    async def run(self, deadline: float | None, fn: Callable, *args: Any) -> Any:
        """``fn(*args)`` in the preprocessing pool; 503 if the server starts shutting down first, 504 if the
        deadline (``time.monotonic()``) passes first. (The thread finishes its work either way; nobody waits.)"""
        if self._closed is None:
            self._closed = asyncio.Event()
        work = asyncio.get_running_loop().run_in_executor(self.pool, fn, *args)
        work.add_done_callback(lambda f: f.cancelled() or f.exception())  # an abandoned failure is not logged
        closed = asyncio.ensure_future(self._closed.wait())
        timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
        try:
            done, _ = await asyncio.wait({work, closed}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        finally:
            closed.cancel()
        if work in done:
            return work.result()
        if closed in done:
            raise shutting_down("the server is shutting down; this request had not started", self.retry_after_s)
        raise APIError(504, "the request's deadline passed while it was being preprocessed", "timeout_error", None,
                       DEADLINE_EXCEEDED)

    def close(self) -> None:
        """No new requests; those being preprocessed end now."""
        self.closing = True
        if self._closed is not None:
            self._closed.set()

    def shutdown(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)


def shutting_down(message: str, retry_after_s: int) -> APIError:
    return APIError(503, message, "server_error", None, SHUTTING_DOWN, {"Retry-After": str(retry_after_s)})


async def drain(admission: Admission, engine: AsyncEngine, grace_s: float, force: asyncio.Event) -> None:
    """Stop admitting, end the waiting requests, give the running ones ``grace_s`` (or until ``force``), end the
    rest."""
    log.warning("shutting down: new requests get 503; running requests have %g s to finish", grace_s)
    admission.close()
    engine.end_waiting(SHUTTING_DOWN, "the server is shutting down; this request had not started")
    end = time.monotonic() + grace_s
    while engine.outstanding and time.monotonic() < end and not force.is_set():
        await asyncio.sleep(TICK_S)
    if engine.outstanding:
        log.warning("shutting down: ending %d request(s) still running", engine.outstanding)
        engine.end_all(SHUTTING_DOWN, "the server is shutting down; the request did not finish within its grace")
    while engine.outstanding and engine.alive:
        await asyncio.sleep(TICK_S)


class Service(uvicorn.Server):
    """uvicorn's server ending by the rules above. ``on_listening(url)`` is called once it accepts connections;
    ``stop_on_engine_failure`` False keeps it answering (503) after the engine failed (tests of that answer)."""

    def __init__(self, config: uvicorn.Config, admission: Admission, engine: AsyncEngine, grace_s: float,
                 on_listening: Callable[[str], None] | None = None, stop_on_engine_failure: bool = True):
        super().__init__(config)
        self.admission, self.engine, self.grace_s = admission, engine, grace_s
        self.on_listening = on_listening
        self.stop_on_engine_failure = stop_on_engine_failure
        self.failure: str | None = None  # why the engine stopped, when it stopped on a failure
        self._signals = 0
        self._drain: asyncio.Task | None = None
        self._force: asyncio.Event | None = None

    @property
    def url(self) -> str:
        host, port = self.servers[0].sockets[0].getsockname()[:2]
        return f"http://{f'[{host}]' if ':' in host else host}:{port}"

    async def startup(self, sockets=None) -> None:
        await super().startup(sockets)
        if self.started and self.on_listening is not None:
            self.on_listening(self.url)

    def handle_exit(self, sig, frame) -> None:
        """SIGINT / SIGTERM (uvicorn installs this handler). Unlike uvicorn's own, it does not raise the signal
        again once the server has stopped: ``serve`` ends its stages and exits itself."""
        self.begin_drain()

    def begin_drain(self) -> None:
        """What a signal does: counted here, acted on by the main loop (``on_tick``). Tests call it directly: a
        server in a thread gets no signals."""
        self._signals += 1

    async def on_tick(self, counter: int) -> bool:
        if await super().on_tick(counter):
            return True
        if self.engine.error is not None and not self.engine.alive:
            self.failure = self.engine.error
            return self.stop_on_engine_failure
        if self._signals and self._drain is None:
            self._force = asyncio.Event()
            self._drain = asyncio.ensure_future(drain(self.admission, self.engine, self.grace_s, self._force))
        if self._signals > 1:
            self._force.set()
        return self._drain is not None and self._drain.done()
