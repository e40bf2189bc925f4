"""The tensor ranks of one pipeline stage as torch.distributed groups: the all-reduce that completes sharded blocks,
and the broadcast that gives every rank of the stage the step its leader received.

Two groups per stage, as in the pipeline's transport: ``data`` on the main backend (NCCL between GPUs, gloo on CPU)
for the all-reduces and the step's tensors, and ``control`` on gloo for the small header (a pickled dict that names
the tensors that follow) and the step's block tables, so a follower's wait for the next step is bounded by the group's timeout and never holds a
GPU stream. Every rank creates every stage's groups, in stage order (``torch.distributed.new_group`` must be called
by all ranks alike), and keeps its own.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from ..pipeline.payload import on_host_plane
from .grid import Grid


class StageGroup:
    """This rank's stage: its ranks, whether this rank leads it, and its collectives."""

    def __init__(self, grid: Grid, rank: int, data, control, device: torch.device):
        self.grid = grid
        self.stage, self.tp_rank = grid.coords(rank)
        self.ranks = grid.stage_ranks(self.stage)
        self.leader = self.ranks[0]
        self.data, self.control = data, control
        self.device = device  # where the data group's tensors live (the GPU with NCCL, else the host)

    @property
    def is_leader(self) -> bool:
        return self.tp_rank == 0

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum ``x`` over the stage's ranks, in place (every rank gets the same sum); returns it."""
        dist.all_reduce(x, group=self.data)
        return x

    def _plane(self, dtype: torch.dtype):
        """(group, device) a shared tensor travels on (pipeline.payload.on_host_plane: the step's block tables with
        the header on the host; everything else on the data group)."""
        return (self.control, torch.device("cpu")) if on_host_plane(dtype) else (self.data, self.device)

    def share(self, header: dict[str, Any], tensors: list[torch.Tensor]) -> None:
        """Leader: send a header and its tensors to the stage's other ranks."""
        manifest = [(tuple(t.shape), t.dtype) for t in tensors]
        dist.broadcast_object_list([(header, manifest)], src=self.leader, group=self.control)
        for t in tensors:
            group, device = self._plane(t.dtype)
            dist.broadcast(t.to(device).contiguous(), src=self.leader, group=group)

    def receive(self) -> tuple[dict[str, Any], list[torch.Tensor]]:
        """Follower: the next header and tensors the leader shares (waits at most the group's timeout)."""
        box: list[Any] = [None]
        dist.broadcast_object_list(box, src=self.leader, group=self.control)
        header, manifest = box[0]
        tensors = []
        for shape, dtype in manifest:
            group, device = self._plane(dtype)
            t = torch.empty(shape, dtype=dtype, device=device)
            dist.broadcast(t, src=self.leader, group=group)
            tensors.append(t)
        return header, tensors


def stage_groups(grid: Grid, rank: int, backend: str, device: torch.device, timeout_s: float) -> StageGroup | None:
    """Create every stage's groups (all ranks must call this alike); this rank's stage group, or None with one
    tensor rank per stage."""
    if grid.tp == 1:
        return None
    timeout = timedelta(seconds=timeout_s)
    data_device = device if backend == "nccl" else torch.device("cpu")
    mine = None
    for s in range(grid.stages):
        ranks = grid.stage_ranks(s)
        data = dist.new_group(ranks, backend=backend, timeout=timeout)
        control = dist.new_group(ranks, backend="gloo", timeout=timeout)
        if rank in ranks:
            mine = StageGroup(grid, rank, data, control, data_device)
    return mine
