"""Programmatic dependent launch (PDL, Hopper and later) for the decode chain's kernels.

A decode layer at batch 1 is a chain of ~13 short kernels, each reading what the one before wrote. Under CUDA-graph
replay each boundary still costs the last wave's tail, the next grid's launch and its first wave's ramp. With PDL a
kernel is launched with the ``launch_pdl`` attribute and may start while its predecessor finishes: each program
first waits for the predecessor grid to complete and flush its memory (``griddepcontrol.wait``), then lets its
own successor launch (``griddepcontrol.launch_dependents``). Because every kernel of the chain waits before it reads
anything, the chain stays ordered as a plain stream is -- a kernel's predecessor completed only after its own wait,
so everything earlier completed too -- and what overlaps is only the launch and scheduling of the next grid.
A kernel launched without the attribute (cuBLAS, torch ops) orders as usual, and the wait is a no-op there.

``KernelChoices.pdl`` turns it on; ``pdl_runs_on`` says where it can (a CUDA GPU of compute capability 9+ and a
Triton with the grid-dependency intrinsics). Every kernel takes ``PDL`` as a constexpr, so the CPU interpreter and
older GPUs compile the kernels without the intrinsics.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def grid_dependency(PDL: tl.constexpr):
    """First statement of a chain kernel: wait for the grid before it, then let the grid after it launch."""
    if PDL:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()


def launch_options(pdl: bool) -> dict:
    """A chain kernel's launch keywords: its ``PDL`` constexpr, and with it on the launch attribute that asks for
    PDL (absent when off, so any Triton takes the call). One place, so a kernel is never launched with PDL without
    compiling its wait."""
    return {"PDL": True, "launch_pdl": True} if pdl else {"PDL": False}


def pdl_runs_on(device) -> bool:
    """Whether PDL can run on ``device``: CUDA, compute capability 9.0+, and this Triton has the intrinsics."""
    device = torch.device(device)
    if device.type != "cuda" or torch.cuda.get_device_capability(device) < (9, 0):
        return False
    try:
        from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait  # noqa: F401
    except ImportError:
        return False
    return True
