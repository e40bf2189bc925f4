"""Programmatic dependent launch (PDL, Hopper and later) for the decode chain's kernels.

A decode layer at batch 1 is a chain of ~13 short kernels, each reading what the one before wrote. Under CUDA-graph
replay each boundary still costs the last wave's tail, the next grid's launch and its first wave's ramp. With PDL a
kernel is launched with the ``launch_pdl`` attribute and may start while its predecessor finishes: each program
first waits for the predecessor grid to complete and flush its memory (``griddepcontrol.wait``), then lets its
own successor launch (``griddepcontrol.launch_dependents``). Because every kernel of the chain waits before it reads
anything, the chain stays ordered as a plain stream is -- a kernel's predecessor completed only after its own wait,
so everything earlier completed too -- and what overlaps is only the launch and scheduling of the next grid.
A kernel launched without the attribute (cuBLAS, torch ops) orders as usual, and the wait is a no-op there.

Early trigger (``KernelChoices.pdl`` = 2, ``EARLY``): each program lets its successor launch first and then waits.
The chain stays ordered all the same -- a grid completes only after every program's wait, so a grid's wait still
returns only once every earlier grid has completed -- but the successors' programs can be resident sooner, and what
they do before their wait (loading weights, ``KernelChoices.pre_wait``) starts sooner. It forbids one thing: reading,
before the wait, what the grid two back wrote (that grid may still run), which ``pre_wait`` does in the experts'
down kernel only with the plain order.

``KernelChoices.pdl`` turns it on; ``pdl_runs_on`` says where it can (a CUDA GPU of compute capability 9+ and a
Triton with the grid-dependency intrinsics). Every kernel takes ``PDL`` as a constexpr, so the CPU interpreter and
older GPUs compile the kernels without the intrinsics.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


EARLY = 2  # the ``pdl`` mode that lets the successor launch before the wait


@triton.jit
def grid_dependency(PDL: tl.constexpr):
    """First statement of a chain kernel (after loads of what the chain never writes): wait for the grid before it,
    then let the grid after it launch; PDL = EARLY (2): the other way round."""
    if PDL == 2:
        tl.extra.cuda.gdc_launch_dependents()
        tl.extra.cuda.gdc_wait()
    elif PDL:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()


def launch_options(pdl: bool | int) -> dict:
    """A chain kernel's launch keywords: its ``PDL`` constexpr (0 off, 1 wait first, ``EARLY``), and with it on the
    launch attribute that asks for PDL (absent when off, so any Triton takes the call). One place, so a kernel is
    never launched with PDL without compiling its wait."""
    mode = int(pdl)
    if mode not in (0, 1, EARLY):
        raise ValueError(f"pdl mode {pdl!r}: 0 (off), 1 (wait, then let the next grid launch) or {EARLY} (early)")
    return {"PDL": mode, "launch_pdl": True} if mode else {"PDL": 0}


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
