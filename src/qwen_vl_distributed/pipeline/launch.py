"""Starting and supervising the S stage processes of one machine.

The process that runs ``qwen-vl generate|serve --stages S`` is rank 0 (the driver and stage 0); it starts ranks
1..S-1 as child processes (``python -m qwen_vl_distributed worker ...``) and watches them. A child that exits with an
error ends the whole group: the others are killed, and the driver reports which stage died. Children die with the
driver (PR_SET_PDEATHSIG), so no orphan survives it. Across machines torchrun starts the processes instead.
"""

from __future__ import annotations

import ctypes
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass

from .transport import StageFailure

def under_torchrun() -> bool:
    """torchrun (or any env:// launcher) sets these for each process it starts."""
    return all(v in os.environ for v in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"))


@dataclass(frozen=True)
class Placement:
    """Where this process sits: global rank and world, and its rank and count among the processes of its machine."""

    rank: int
    world: int
    local_rank: int
    local_world: int
    init_method: str


def torchrun_placement() -> Placement:
    world = int(os.environ["WORLD_SIZE"])
    return Placement(int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0")),
                     int(os.environ.get("LOCAL_WORLD_SIZE", world)), "env://")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _die_with_parent() -> None:
    """In the child, before exec: get SIGKILL when the parent dies (Linux)."""
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        pass


class Supervisor:
    """Owns the worker processes of this machine; any abnormal exit stops them all within ``grace_s``."""

    def __init__(self, argv_for_rank, world: int, grace_s: float = 5.0, name_of=lambda r: f"stage {r} (rank {r}"):
        """``name_of(rank)``: how a rank is named in messages, up to its pid (a grid names stage and tensor rank)."""
        self.grace_s = grace_s
        self.name_of = name_of
        self.procs: dict[int, subprocess.Popen] = {}
        self.failure: str | None = None
        self._stopping = False
        for rank in range(1, world):
            self.procs[rank] = subprocess.Popen([sys.executable, "-m", "qwen_vl_distributed", *argv_for_rank(rank)],
                                                preexec_fn=_die_with_parent)
        self._thread = threading.Thread(target=self._watch, name="stage-supervisor", daemon=True)
        self._thread.start()

    def _watch(self) -> None:
        while not self._stopping:
            for rank, p in self.procs.items():
                rc = p.poll()
                if rc is not None and rc != 0 and not self._stopping:
                    how = f"was killed by signal {-rc}" if rc < 0 else f"exited with code {rc}"
                    self.failure = (f"{self.name_of(rank)}, pid {p.pid} on {socket.gethostname()}) {how}; "
                                    "stopping all stages")
                    print(f"error: {self.failure}", file=sys.stderr, flush=True)
                    self.kill_all()
                    # The driver notices through its transport within its timeout; if it is stuck in a
                    # computation, end it here so that no process outlives the bound.
                    time.sleep(self.grace_s)
                    os._exit(3)
            time.sleep(0.1)

    def check(self) -> None:
        if self.failure:
            raise StageFailure(self.failure)

    def await_failure(self, timeout_s: float) -> str | None:
        """After an error seen elsewhere (a collective that failed): give the watcher up to ``timeout_s`` to report a
        worker that exited (its message names the rank; a dead process's sockets close a moment before it can be
        reaped); the report, or None."""
        deadline = time.monotonic() + timeout_s
        while self.failure is None and time.monotonic() < deadline:
            time.sleep(0.05)
        return self.failure

    def kill_all(self) -> None:
        for p in self.procs.values():
            if p.poll() is None:
                p.kill()

    def stop(self, timeout_s: float = 10.0) -> None:
        """Normal end: workers leave their loop on 'stop'; wait for them, then make sure."""
        self._stopping = True
        deadline = time.monotonic() + timeout_s
        for p in self.procs.values():
            try:
                p.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
