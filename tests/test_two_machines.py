"""Two 'machines' (network namespaces joined by a veth pair), one stage each, started by torchrun with the c10d
rendezvous exactly as on real hosts; the output equals the single-process run."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

from procs import CLI
from synth_model import tiny_model_dir

TORCHRUN = os.path.join(os.path.dirname(sys.executable), "torchrun")


def _sh(*args: str) -> None:
    subprocess.run(args, check=True, capture_output=True)


@pytest.fixture
def two_hosts():
    """Namespaces a / b with 10.213.x.1 and .2 on a veth pair; skipped (saying why) where they cannot be made."""
    if os.geteuid() != 0 or shutil.which("ip") is None:
        pytest.skip("needs root and iproute2 to create network namespaces (ip netns)")
    tag = str(os.getpid() % 100000)
    a, b, va, vb = f"qva{tag}", f"qvb{tag}", f"qva{tag}", f"qvb{tag}"
    net = f"10.213.{os.getpid() % 250}"
    try:
        _sh("ip", "netns", "add", a)
    except subprocess.CalledProcessError as e:
        pytest.skip(f"cannot create a network namespace here: {e.stderr.decode().strip()}")
    try:
        _sh("ip", "netns", "add", b)
        _sh("ip", "link", "add", va, "type", "veth", "peer", "name", vb)
        _sh("ip", "link", "set", va, "netns", a)
        _sh("ip", "link", "set", vb, "netns", b)
        for ns, dev, ip in ((a, va, f"{net}.1"), (b, vb, f"{net}.2")):
            _sh("ip", "-n", ns, "addr", "add", f"{ip}/24", "dev", dev)
            _sh("ip", "-n", ns, "link", "set", "lo", "up")
            _sh("ip", "-n", ns, "link", "set", dev, "up")
        yield [(a, va, f"{net}.1"), (b, vb, f"{net}.2")]
    finally:
        subprocess.run(["ip", "netns", "del", a], capture_output=True)
        subprocess.run(["ip", "netns", "del", b], capture_output=True)


def test_two_machines_with_torchrun_equal_one_process(tmp_path_factory, two_hosts):
    model = tiny_model_dir(tmp_path_factory)
    gen = ["generate", "--model", model, "--stages", "2", "--prompt", "hello there", "--max-new-tokens", "10",
           "--temperature", "0", "--json", "--quiet"]
    endpoint = f"{two_hosts[0][2]}:29411"
    procs = []
    for i, (ns, dev, ip) in enumerate(two_hosts):
        cmd = ["ip", "netns", "exec", ns, "env", f"GLOO_SOCKET_IFNAME={dev}", TORCHRUN, "--nnodes", "2",
               "--nproc-per-node", "1", "--rdzv-backend", "c10d", "--rdzv-endpoint", endpoint, "--rdzv-id", "qv",
               "--rdzv-conf", f"is_host={1 if i == 0 else 0}", "--local-addr", ip, "-m", "qwen_vl_distributed", *gen]
        procs.append(subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE))
    outs = []
    for p in procs:
        out, err = p.communicate(timeout=240)
        assert p.returncode == 0, err.decode()[-2000:]
        outs.append(out.decode())
    results = [json.loads(o.strip().splitlines()[-1]) for o in outs if o.strip()]
    assert len(results) == 1  # only rank 0 (the driver) answers
    single = subprocess.run(CLI + gen[:3] + ["--stages", "1"] + gen[5:], capture_output=True, check=True)
    assert results[0]["token_ids"] == json.loads(single.stdout.decode().strip().splitlines()[-1])["token_ids"]
