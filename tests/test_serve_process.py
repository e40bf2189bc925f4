"""`qwen-vl serve --stages 2` as real processes: what listens where, SIGTERM, a stage that hangs or dies.

Every process is really started, signalled and stopped; the stages' pids come from /proc."""

from __future__ import annotations

import ipaddress
import json
import os
import re
import signal
import subprocess
import threading
import time

import httpx
import pytest

from procs import CLI, alive, children, cmdline, kill_tree
from synth_model import tiny_model_dir

ENV = {**os.environ, "PYTHONUNBUFFERED": "1"}
START_S = 240  # two stages loading under a loaded test machine
BANNER = re.compile(r"serving 'tiny' \(2 stage\(s\)\) on (http://[\d.]+:\d+)/v1")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tiny_model_dir(tmp_path_factory)


class Serve:
    """A `serve` process with its stderr in a file (read back while it runs, so no pipe can fill up)."""

    def __init__(self, model_dir: str, log_path, *args: str):
        self.log_path = log_path
        self.proc = subprocess.Popen(
            CLI + ["serve", "--model", model_dir, "--stages", "2", "--port", "0", "--quiet", "--log-level",
                   "warning", "--served-model-name", "tiny", *args],
            stdout=subprocess.DEVNULL, stderr=open(log_path, "wb"), env=ENV, start_new_session=True)
        deadline = time.monotonic() + START_S
        while not (m := BANNER.search(self.log())):
            assert self.proc.poll() is None and time.monotonic() < deadline, f"serve did not start: {self.log()}"
            time.sleep(0.2)
        self.url = m.group(1)
        self.pids = [self.proc.pid, *children(self.proc.pid)]

    def log(self) -> str:
        with open(self.log_path, "rb") as f:
            return f.read().decode(errors="replace")

    def worker(self) -> int:
        pids = [p for p in children(self.proc.pid) if "--rank 1 " in cmdline(p)]
        assert pids, f"no stage-1 worker among {children(self.proc.pid)}"
        return pids[0]

    def wait(self, bound_s: float) -> int:
        try:
            return self.proc.wait(timeout=bound_s)
        except subprocess.TimeoutExpired:
            kill_tree(self.proc.pid)
            raise AssertionError(f"serve did not exit within {bound_s} s: {self.log()}")

    def left_alive(self) -> list[int]:
        time.sleep(0.5)
        return [p for p in self.pids if alive(p)]


def stream(url: str, name: str, max_tokens: int, out: dict, started: threading.Event | None = None) -> None:
    """A streamed request; out[name] gets the data of its events (the error object, if any, and '[DONE]')."""
    events = []
    body = {"model": "tiny", "messages": [{"role": "user", "content": name}], "max_tokens": max_tokens,
            "temperature": 0, "stream": True}
    with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=180) as r:
        for line in r.iter_lines():
            if not line.startswith("data: "):
                continue
            events.append(line[6:] if line == "data: [DONE]" else json.loads(line[6:]))
            if started is not None and len(events) >= 3:
                started.set()
    out[name] = events


def listening(pids: list[int]) -> list[str]:
    """The local addresses of the TCP sockets these processes listen on (from /proc/<pid>/fd and /proc/net)."""
    inodes = set()
    for pid in pids:
        for fd in os.listdir(f"/proc/{pid}/fd"):
            try:
                link = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if link.startswith("socket:["):
                inodes.add(link[8:-1])
    found = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as f:
            for line in f.readlines()[1:]:
                fields = line.split()
                if fields[3] == "0A" and fields[9] in inodes:  # state LISTEN
                    found.append(_address(fields[1]))
    return found


def _address(hex_addr: str) -> str:
    """'0100007F:1F90' (IPv4, or IPv6 in 4 little-endian words) -> '127.0.0.1:8080'."""
    host, port = hex_addr.split(":")
    raw = bytes.fromhex(host)
    raw = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))
    return f"{ipaddress.ip_address(raw)}:{int(port, 16)}"


def _is_loopback(addr: str) -> bool:
    ip = ipaddress.ip_address(addr.rsplit(":", 1)[0])
    return ip.is_loopback or getattr(ip, "ipv4_mapped", None) is not None and ip.ipv4_mapped.is_loopback


def test_every_listening_socket_is_on_loopback(model_dir, tmp_path):
    """On one machine the rendezvous store, the stages' connections and the HTTP server all listen on loopback."""
    s = Serve(model_dir, tmp_path / "serve.log")
    try:
        addrs = listening(s.pids)
        assert httpx.get(s.url + "/health").status_code == 200
    finally:
        s.proc.send_signal(signal.SIGTERM)
        s.wait(120)
    port = s.url.rsplit(":", 1)[1]
    assert f"127.0.0.1:{port}" in addrs and len(addrs) >= 2, addrs  # the HTTP server and the store, at least
    assert [a for a in addrs if not _is_loopback(a)] == [], addrs


def test_sigterm_drains_then_every_process_exits(model_dir, tmp_path):
    """A running stream and a queued one; SIGTERM to every process of the service (as systemd sends it): the queued
    one ends at once with an error event and [DONE], a new request gets 503, the running one is ended when the grace
    is over; then every process exits, status 0."""
    s = Serve(model_dir, tmp_path / "serve.log", "--max-batch", "1", "--max-len", "32768", "--shutdown-grace", "3")
    out, started = {}, threading.Event()
    try:
        running = threading.Thread(target=stream, args=(s.url, "running", 30000, out, started))
        running.start()
        assert started.wait(120)
        queued = threading.Thread(target=stream, args=(s.url, "queued", 10, out))
        queued.start()
        time.sleep(1.0)  # (the queued request's place is taken before the signal; only its answer is awaited)
        os.killpg(s.proc.pid, signal.SIGTERM)
        queued.join(60)
        late = httpx.post(s.url + "/v1/chat/completions", json={"model": "tiny", "messages": [
            {"role": "user", "content": "late"}], "max_tokens": 2}, timeout=60)
        running.join(120)
        rc = s.wait(120)
    finally:
        kill_tree(s.proc.pid)
    assert out["queued"][-1] == "[DONE]" and out["queued"][-2]["error"]["code"] == "shutting_down", out["queued"]
    assert late.status_code == 503 and late.json()["error"]["code"] == "shutting_down"
    assert out["running"][-1] == "[DONE]" and out["running"][-2]["error"]["code"] == "shutting_down"
    assert len(out["running"]) > 3  # it ran until the grace was over
    assert rc == 0, s.log()
    assert s.left_alive() == []


@pytest.mark.parametrize("how", ["hung", "killed"])
def test_a_stage_that_hangs_or_dies_ends_serve_with_the_stage_named(model_dir, tmp_path, how):
    """SIGSTOP (alive but silent past --stage-timeout) or SIGKILL of stage 1 while a stream runs: the stream ends
    with an error event and [DONE], `serve` exits with status 3 naming the stage, and no process is left."""
    s = Serve(model_dir, tmp_path / "serve.log", "--max-len", "32768", "--stage-timeout", "4")
    out, started = {}, threading.Event()
    try:
        running = threading.Thread(target=stream, args=(s.url, "running", 30000, out, started))
        running.start()
        assert started.wait(120)
        os.kill(s.worker(), signal.SIGSTOP if how == "hung" else signal.SIGKILL)
        running.join(120)
        rc = s.wait(120)
    finally:
        kill_tree(s.proc.pid)
    err = out["running"][-2]["error"]
    assert out["running"][-1] == "[DONE]" and err["code"] == "engine_failure", out["running"][-3:]
    assert rc == 3, s.log()
    assert "stage 1 (rank 1" in s.log() and ("sent nothing for 4 s" in s.log() or how == "killed"), s.log()
    assert "Traceback" not in s.log().split("error: ")[-1]
    assert s.left_alive() == []
