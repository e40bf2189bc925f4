"""Arrival counters: the last program of a group to finish does the group's closing work, in the same launch.

A decode step ends several kernels with a short second launch that only combines what the first one's programs
wrote (the experts' K-sum, the router's partial logits). At batch 1 such a launch costs more in latency than in
work. Instead each program, once its own stores are done, adds 1 to its group's counter; the one that sees the
count reach the group's size reads the others' results and finishes the group's work, then puts the counter back
to 0 for the next launch. This is the arrive/release pattern of CUDA's threadfence reduction: a barrier orders the
program's stores before its one atomic add (acquire-release, GPU scope), so the last program sees every store of
the programs counted before it; it reads them past L1 (``.cg``).

The counters live in one zeroed int32 buffer per device, made outside any CUDA-graph capture (a step runs eagerly
before it is captured). A launch that uses them must not overlap another launch that uses them: the decode chain
runs its kernels one after another on one stream.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

COUNTERS = 4096  # per device: enough for a counter per column tile of any hidden size the kernels take
_buffers: dict[torch.device, torch.Tensor] = {}


def counters(device: torch.device, n: int) -> torch.Tensor:
    """The device's zeroed counters (at least ``n``)."""
    device = torch.device(device)
    if n > COUNTERS:
        raise ValueError(f"{n} arrival counters asked for; the buffer holds {COUNTERS}")
    buf = _buffers.get(device)
    if buf is None:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            raise RuntimeError("arrival counters are made outside a CUDA-graph capture: run the step once before "
                               "capturing it")
        buf = _buffers[device] = torch.zeros(COUNTERS, dtype=torch.int32, device=device)
    return buf


@triton.jit
def last_arrival(count_ptr, n):
    """After this program's stores: True in the program that is the ``n``-th to arrive at ``count_ptr`` (it then
    sees every counted program's stores, read with ``cache_modifier=".cg"``), which also resets the count to 0."""
    tl.debug_barrier()
    old = tl.atomic_add(count_ptr, 1, sem="acq_rel", scope="gpu")
    last = old == n - 1
    if last:
        tl.atomic_xchg(count_ptr, 0, sem="relaxed", scope="gpu")
    return last
