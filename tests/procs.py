"""Helpers for tests that start the CLI in separate processes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

CLI = [sys.executable, "-m", "qwen_vl_distributed"]


def children(pid: int) -> list[int]:
    """All descendants of ``pid`` (from /proc)."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        for task in os.listdir(f"/proc/{p}/task") if os.path.exists(f"/proc/{p}/task") else []:
            path = f"/proc/{p}/task/{task}/children"
            if os.path.exists(path):
                with open(path) as f:
                    kids = [int(x) for x in f.read().split()]
                out += kids
                todo += kids
    return out


def cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] != "Z"
    except OSError:
        return False


def wait_for_output(proc: subprocess.Popen, marker: str, timeout_s: float, then_bytes: int = 0) -> str:
    """Read stdout until ``marker`` appears, and ``then_bytes`` more bytes after it (bytes-level, unbuffered)."""
    seen = b""
    deadline = time.monotonic() + timeout_s
    m = marker.encode()
    while m not in seen or len(seen) - seen.index(m) - len(m) < then_bytes:
        if time.monotonic() > deadline or proc.poll() is not None:
            raise AssertionError(f"{marker!r} not seen; output so far: {seen[-500:]!r}")
        chunk = os.read(proc.stdout.fileno(), 4096)
        seen += chunk
    return seen.decode(errors="replace")


def kill_tree(pid: int) -> None:
    for p in children(pid) + [pid]:
        try:
            os.kill(p, signal.SIGKILL)
        except OSError:
            pass
