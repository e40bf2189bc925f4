"""Faults: a stage that dies or hangs ends every process with a named error; Ctrl-C stops all workers; ranks with
different checkpoints refuse to start."""

from __future__ import annotations

import os
import signal
import subprocess
import time

import pytest

from procs import CLI, alive, children, cmdline, kill_tree, wait_for_output
from synth_model import tiny_model_dir

ENV = {**os.environ, "PYTHONUNBUFFERED": "1"}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tiny_model_dir(tmp_path_factory)


def _long_generation(model_dir: str, stages: int, timeout: float) -> subprocess.Popen:
    """A streamed generation that runs for minutes unless something stops it."""
    return subprocess.Popen(
        CLI + ["generate", "--model", model_dir, "--stages", str(stages), "--prompt", "hello", "--max-new-tokens",
               "4000", "--max-len", "4096", "--temperature", "0", "--quiet", "--stage-timeout", str(timeout)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=ENV, start_new_session=True)


def _worker(proc: subprocess.Popen, rank: int) -> int:
    pids = [p for p in children(proc.pid) if f"--rank {rank} " in cmdline(p)]
    assert pids, f"no worker of rank {rank} among {children(proc.pid)}"
    return pids[0]


def _finish(proc: subprocess.Popen, bound_s: float) -> tuple[int, str, list[int]]:
    kids = children(proc.pid)
    try:
        _, err = proc.communicate(timeout=bound_s)
    except subprocess.TimeoutExpired:
        kill_tree(proc.pid)
        raise AssertionError(f"the driver did not exit within {bound_s} s")
    time.sleep(0.5)
    return proc.returncode, err.decode(errors="replace"), [p for p in kids if alive(p)]


def test_killed_stage_ends_every_process_with_named_error(model_dir):
    proc = _long_generation(model_dir, 3, timeout=20)
    try:
        wait_for_output(proc, "[thinking]", 120)
        time.sleep(1.0)
        victim = _worker(proc, 2)
        os.kill(victim, signal.SIGKILL)
        rc, err, left = _finish(proc, bound_s=60)
    finally:
        kill_tree(proc.pid)
    assert rc != 0
    assert "stage 2 (rank 2" in err, err
    assert left == []


def test_hung_stage_is_detected_within_the_timeout(model_dir):
    proc = _long_generation(model_dir, 3, timeout=4)
    try:
        # streamed text, not just the header: every stage has left start-up (the header is printed once stage 0
        # is through the ready check, while the last stage may still be finishing it; stopping stage 1 then
        # stalls the last stage's start-up, and stage 0 rightly names the last stage)
        wait_for_output(proc, "[thinking] ", 120, then_bytes=8)
        victim = _worker(proc, 1)
        os.kill(victim, signal.SIGSTOP)  # alive but silent
        rc, err, left = _finish(proc, bound_s=60)
    finally:
        kill_tree(proc.pid)
    assert rc != 0
    assert "stage 1 (rank 1" in err and "sent nothing for 4 s" in err, err
    assert left == []


def test_ctrl_c_stops_all_workers(model_dir):
    proc = _long_generation(model_dir, 2, timeout=20)
    try:
        wait_for_output(proc, "[thinking]", 120)
        kids = children(proc.pid)
        os.killpg(proc.pid, signal.SIGINT)  # what a terminal does: the whole foreground group
        proc.communicate(timeout=30)
        time.sleep(0.5)
    finally:
        kill_tree(proc.pid)
    assert proc.returncode != 0
    assert [p for p in kids if alive(p)] == []


def test_ranks_with_different_checkpoints_refuse_to_start(tmp_path_factory, model_dir):
    other = tiny_model_dir(tmp_path_factory, name="tiny-seed1", seed=1)
    from qwen_vl_distributed.pipeline.launch import free_port

    port = free_port()
    procs = []
    for rank, d in enumerate([model_dir, other]):
        env = {**ENV, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2",
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
        procs.append(subprocess.Popen(CLI + ["generate", "--model", d, "--stages", "2", "--prompt", "hi", "--quiet",
                                             "--max-new-tokens", "4"], env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE))
    errs = []
    for p in procs:
        _, err = p.communicate(timeout=120)
        errs.append(err.decode())
        assert p.returncode == 3, err.decode()
    for err in errs:
        assert "start-up agreement failed: the ranks disagree on checkpoint" in err
        assert "stage 0 (rank 0" in err and "stage 1 (rank 1" in err


def test_a_stage_that_cannot_load_stops_every_rank_before_serving(tmp_path_factory):
    """Only the last stage's layer has a bad tensor: every rank must stop at the ready check, naming that stage."""
    import shutil

    import torch

    from checkpoint_testlib import edit_shard

    src = tiny_model_dir(tmp_path_factory)
    bad = str(tmp_path_factory.mktemp("bad") / "m")
    shutil.copytree(src, bad)
    key = "model.language_model.layers.5.self_attn.q_norm.weight"
    edit_shard(bad, key, lambda t: t.__setitem__(key, torch.ones(3)))
    proc = subprocess.Popen(CLI + ["generate", "--model", bad, "--stages", "2", "--prompt", "hi", "--quiet",
                                   "--max-new-tokens", "3"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=ENV,
                            start_new_session=True)
    rc, err, left = _finish(proc, bound_s=120)
    assert rc == 3, err
    assert "stage 1 (rank 1" in err and "failed to start" in err and f"{key} in " in err and "has shape [3]" in err
    assert "Traceback" not in err
    assert left == []


def test_sigusr1_prints_a_stages_stacks_and_it_keeps_running():
    """Every stage registers faulthandler on SIGUSR1 when it joins the process group: `kill -USR1 <pid>` shows
    where a hung stage is without stopping it."""
    import socket
    import sys

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    code = (
        "import os, signal, time, torch\n"
        "from qwen_vl_distributed.pipeline.distributed import init_distributed, shutdown\n"
        f"init_distributed(0, 1, 'tcp://127.0.0.1:{port}', 'gloo', torch.device('cpu'), 30, 30)\n"
        "def waiting_for_a_peer():\n"
        "    os.kill(os.getpid(), signal.SIGUSR1)\n"
        "    time.sleep(0.5)\n"
        "waiting_for_a_peer()\n"
        "shutdown()\n"
        "print('still running')\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "still running" in r.stdout, r.stderr
    assert "waiting_for_a_peer" in r.stderr  # the stack, with the function the stage was in
