"""How many torch intra-op threads a process uses, for its stage's steps and for the driver's preprocessing.

The stages of one machine share its cores. A CPU stage takes its share. A GPU stage's host work per step is small
tensor ops (a step's row tables, its layout), so it takes one thread: left at torch's default, one thread per core
in every process, each op's pool woke and spun on every core, and the stages took turns delaying each other's kernel
launches (8 sequences through two H200 stages: 581-647 tokens/s, 787 with one thread; docs/benchmarks.md).

The driver's preprocessing (a server's requests: chat template, tokenising, decoding images and videos, the image
and video processors) runs in a pool of ``preprocess_workers()`` threads, the process's share of the cores, so that
one large request does not hold up a small one: tokenising and decoding run in parallel (the tokenizer, PIL and
PyAV release the GIL). Where a GPU stage set one intra-op thread for its steps, the image and video processors'
bulk tensor work takes the process's share back, one request at a time (``preprocess_threads``): torch's thread
setting is the process's, and requests restoring it out of order would leave the steps with the wrong one.
"""

from __future__ import annotations

import contextlib
import os
import threading
from typing import Iterator

import torch

_preprocess_threads: int | None = None  # None: leave torch's setting as it is
_share_of_cores: int | None = None  # this process's share of its machine's cores, once a stage has set it
_lock = threading.Lock()


def _share(local_world: int, cores: int) -> int:
    """One of ``local_world`` processes' share of a machine of ``cores`` cores."""
    return max(1, cores // local_world)


def stage_threads(device: torch.device, local_world: int, cores: int) -> int:
    """Intra-op threads for the steps of one of ``local_world`` stage processes on a machine of ``cores`` cores."""
    return _share(local_world, cores) if device.type == "cpu" else 1


def set_stage_threads(device: torch.device, local_world: int, cores: int) -> None:
    """Set this process's threads for its stage's steps; where that is fewer than its share of the cores, keep
    the share for preprocessing."""
    global _preprocess_threads, _share_of_cores
    steps, share = stage_threads(device, local_world, cores), _share(local_world, cores)
    torch.set_num_threads(steps)
    _preprocess_threads = share if steps < share else None
    _share_of_cores = share


def preprocess_workers() -> int:
    """Threads of the driver's preprocessing pool: the process's share of the cores (the whole machine's when no
    stage has set one), and at least 2, so that one request's preprocessing never holds up every other's."""
    return max(2, _share_of_cores or os.cpu_count() or 1)


@contextlib.contextmanager
def preprocess_threads() -> Iterator[None]:
    """Inside: the process's share of the cores (where a stage set fewer threads for its steps). One block at a
    time, so that concurrent requests restore the setting in order."""
    if _preprocess_threads is None:
        yield
        return
    with _lock:
        before = torch.get_num_threads()
        torch.set_num_threads(_preprocess_threads)
        try:
            yield
        finally:
            torch.set_num_threads(before)
