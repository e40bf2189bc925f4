"""Process-group set-up, the start-up agreement, and the ready check.

``DistContext`` is the one object that carries parallel state (rank, grid, backend, device, peers); it is created
once at start-up and passed in -- nothing reaches for globals.

The rendezvous store (torch's TCPStore: any key can be read, set or deleted by whoever connects, without a password)
listens only where the ``tcp://HOST:PORT`` init method says: rank 0 binds HOST itself rather than letting torch bind
every interface. On one machine that is 127.0.0.1 (``loopback_listener``), and gloo's connections between the
stages use the loopback interface too (``pin_to_loopback``). Across machines torchrun's rendezvous holds the store;
its port, and the ports of the stages' connections, must be reachable only from inside the cluster (docs).
"""

from __future__ import annotations

import faulthandler
import os
import signal
import socket
import urllib.parse
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from ..parallel.grid import Grid
from .transport import PeerInfo, StageFailure


@dataclass
class DistContext:
    rank: int
    world: int
    backend: str
    device: torch.device
    peers: list[PeerInfo]
    control: Any  # process group for control messages (gloo); None means the default group
    grid: Grid | None = None  # None: one process per stage (rank = stage)

    @property
    def stage(self) -> int:
        return self.rank if self.grid is None else self.grid.coords(self.rank)[0]

    @property
    def is_last(self) -> bool:
        stages = self.world if self.grid is None else self.grid.stages
        return self.stage == stages - 1


def choose_backend(device: str, local_world: int) -> str:
    """NCCL when every local stage has a GPU of its own; gloo on CPU or when stages share a GPU."""
    if device == "cuda" and torch.cuda.is_available() and torch.cuda.device_count() >= local_world:
        return "nccl"
    return "gloo"


def stage_device(device: str, local_rank: int) -> torch.device:
    if device == "cuda":
        return torch.device("cuda", local_rank % max(torch.cuda.device_count(), 1))
    return torch.device("cpu")


def loopback_listener() -> socket.socket:
    """A listening socket on 127.0.0.1 at a port the kernel picks, for rank 0's store: made before the other ranks
    start, so they can connect to its port at once and no other process can take it in between."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    sock.listen(128)
    return sock


def pin_to_loopback() -> None:
    """All ranks on this machine: gloo's connections between them, and NCCL's bootstrap sockets, on the loopback
    interface too (both bind the address the host name resolves to otherwise, often a network one; NCCL's data
    between GPUs of one machine does not use sockets). Both read their interface from the environment only; set
    here, before any process group, it reaches the ranks started after it as well. A user's own setting wins."""
    if "lo" in {name for _, name in socket.if_nameindex()}:
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
        os.environ.setdefault("NCCL_SOCKET_IFNAME", "lo")


def _store(init_method: str, rank: int, world: int, timeout: timedelta, listener: socket.socket | None):
    """The rendezvous store of a ``tcp://HOST:PORT`` init method, served by rank 0 on HOST only (or on
    ``listener``, already bound there); None for other init methods (torchrun's ``env://``)."""
    url = urllib.parse.urlsplit(init_method)
    if url.scheme != "tcp":
        return None
    host, port = url.hostname, url.port
    if rank != 0:
        return dist.TCPStore(host, port, world, is_master=False, timeout=timeout)
    if listener is None:
        listener = socket.create_server((host, port), backlog=128)
    # the store takes the socket's descriptor over (detach: the socket object must not close it when collected)
    return dist.TCPStore(host, port, world, is_master=True, timeout=timeout, wait_for_workers=False,
                         master_listen_fd=listener.detach())


def init_distributed(rank: int, world: int, init_method: str, backend: str, device: torch.device,
                     connect_timeout_s: float, startup_timeout_s: float,
                     listener: socket.socket | None = None, grid: Grid | None = None) -> DistContext:
    """The main group (data plane) with a short timeout, so a rank whose peers never come gives up within
    ``connect_timeout_s``; the gloo control group with the long one, since loading a big stage takes minutes.
    ``listener``: rank 0's socket for the store of a ``tcp://`` init method (``loopback_listener``). ``grid``:
    stages x tensor ranks (None: one rank per stage)."""
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if hasattr(signal, "SIGUSR1"):  # `kill -USR1 <pid>` prints every thread's stack of this stage (a hang's where)
        faulthandler.register(signal.SIGUSR1, all_threads=True)
    kw = {"device_id": device} if backend == "nccl" else {}
    timeout = timedelta(seconds=connect_timeout_s)
    store = _store(init_method, rank, world, timeout, listener)
    where = {"store": store} if store is not None else {"init_method": init_method}
    dist.init_process_group(backend, rank=rank, world_size=world, timeout=timeout, **where, **kw)
    control = dist.new_group(backend="gloo", timeout=timedelta(seconds=startup_timeout_s))
    stage, tp_rank = grid.coords(rank) if grid is not None else (rank, 0)
    me = PeerInfo(rank, socket.gethostname(), os.getpid(), stage, tp_rank if grid is not None and grid.tp > 1 else None)
    peers: list[Any] = [None] * world
    dist.all_gather_object(peers, me, group=control)
    return DistContext(rank, world, backend, device, peers, control, grid)


def agree(ctx: DistContext, fingerprint: dict[str, str]) -> None:
    """Every rank must hold the same config, checkpoint, plan and code; otherwise all ranks refuse to start."""
    everyone: list[Any] = [None] * ctx.world
    dist.all_gather_object(everyone, fingerprint, group=ctx.control)
    for key in sorted(fingerprint):
        values = {r: fp.get(key) for r, fp in enumerate(everyone)}
        if len(set(values.values())) > 1:
            detail = "; ".join(f"{ctx.peers[r].describe()}: {v}" for r, v in values.items())
            raise StageFailure(f"start-up agreement failed: the ranks disagree on {key} ({detail})")


def report_ready(ctx: DistContext, error: str | None) -> None:
    """After loading: all ranks learn whether every stage is ready; any stage's error stops all of them."""
    everyone: list[Any] = [None] * ctx.world
    dist.all_gather_object(everyone, error, group=ctx.control)
    for r, err in enumerate(everyone):
        if err is not None:
            raise StageFailure(f"{ctx.peers[r].describe()} failed to start: {err}")


def shutdown() -> None:
    if dist.is_initialized():
        try:
            dist.destroy_process_group()
        except Exception:  # best effort at exit
            pass
