"""Run an app with uvicorn in a background thread on loopback (tests, benchmarks, demos).

    with ServerThread(app) as server:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="x")

Port 0 by default: the OS picks a free port, read back once the server is listening. The server is ``serve``'s
(``lifecycle.Service``): ``server.server.begin_drain()`` does what SIGTERM does to ``serve`` (no signal reaches a
thread).
"""

from __future__ import annotations

import threading
import time

import uvicorn

from .lifecycle import Service

START_TIMEOUT_S = 30.0


class ServerThread:
    def __init__(self, app, host: str = "127.0.0.1", port: int = 0, graceful_shutdown_s: float = 2.0,
                 drain_grace_s: float = 20.0, stop_on_engine_failure: bool = True):
        config = uvicorn.Config(app, host=host, port=port, log_level="warning", lifespan="on",
                                timeout_graceful_shutdown=graceful_shutdown_s)
        state = app.state.server
        self.server = Service(config, state.admission, state.engine, drain_grace_s,
                              stop_on_engine_failure=stop_on_engine_failure)
        self.host = host
        self.port: int | None = None
        self._thread = threading.Thread(target=self.server.run, name="uvicorn", daemon=True)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self) -> ServerThread:
        self._thread.start()
        ok = wait_until(lambda: self.server.started or not self._thread.is_alive(), START_TIMEOUT_S)
        if not ok or not self.server.started:
            raise RuntimeError("the server did not start (see the log above)")
        self.port = self.server.servers[0].sockets[0].getsockname()[1]
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self._thread.join(START_TIMEOUT_S)

    @property
    def stopped(self) -> bool:
        return not self._thread.is_alive()

    def __enter__(self) -> ServerThread:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def wait_until(cond, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True
