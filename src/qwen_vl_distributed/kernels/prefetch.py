"""Weights pulled into L2 while the decode chain's small kernels run, so that HBM is busy in their windows too.

At batch 1 a decode layer alternates weight streams that keep HBM busy (the q/k/v GEMV, the o GEMV, the experts)
with short latency-bound kernels that barely touch it (q/k norm + rotary + cache write, attention, the router and
top-k, the experts' block layout: ~20 us of a ~185 us layer on an H100). What is read right after such a window is
known inside it: the o projection's weight after attention, and, once top-k has run, the chosen experts' gate/up
weights. So a kernel of the window asks L2 to fetch the head of the next weight's rows with Hopper's bulk prefetch
(``cp.async.bulk.prefetch.L2``: fire and forget, no registers, no wait), and the GEMV that follows finds that part
in L2 and streams only the rest from HBM.

A prefetch changes no value anywhere (it is a cache hint), so a kernel computes the same bits with it on or off.
The head of each row, not the first rows: every program of the GEMVs streams its rows from column 0 on, so a head
of every row gives all of them the same start, rather than a few programs a finished job and the rest none.

``KernelChoices.l2_prefetch`` (``L2Prefetch``) says how many bytes per window; ``prefetch_runs_on`` where it can
run (a CUDA GPU of compute capability 9.0+; the CPU interpreter has no inline PTX, so there the kernels compile
without it).
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

ALIGN = 16  # bytes: a bulk prefetch's address and size are multiples of 16


@triton.jit
def bulk_prefetch_l2(addr, nbytes):
    """Ask L2 to fetch ``nbytes`` (int32 tensor) from each address (int64 tensor) of a tensor; returns zeros (a
    value only so the asm has an output; the instruction is kept as a side effect)."""
    return tl.inline_asm_elementwise("cp.async.bulk.prefetch.L2.global [$1], $2;\n\tmov.u32 $0, 0;", "=r,l,r",
                                     [addr, nbytes], dtype=tl.int32, is_pure=False, pack=1)


@triton.jit
def row_head_addresses(base_ptr, rows, row_bytes, part, parts, RB: tl.constexpr):
    """The start addresses (int64 [RB]) of program ``part``'s share of the ``rows`` rows of a matrix at
    ``base_ptr`` whose rows start ``row_bytes`` apart: rows part*per .. part*per + per - 1 with per = cdiv(rows,
    parts) <= RB, a power of two. Lanes past the share, and shares past the last row, repeat the last row they
    may (a second prefetch of a line is a no-op)."""
    per = tl.cdiv(rows, parts)
    i = tl.minimum(tl.arange(0, RB), per - 1)
    r = tl.minimum(part * per + i, rows - 1).to(tl.int64)
    return base_ptr.to(tl.int64) + r * row_bytes


@triton.jit
def prefetch_row_heads(base_ptr, rows, row_bytes, head_bytes, part, parts, RB: tl.constexpr):
    """Program ``part`` of ``parts`` prefetches the first ``head_bytes`` of its share of the rows
    (``row_head_addresses``)."""
    addr = row_head_addresses(base_ptr, rows, row_bytes, part, parts, RB)
    bulk_prefetch_l2(addr, tl.full((RB,), 0, tl.int32) + head_bytes)


def row_heads(weight: torch.Tensor, budget_bytes: int) -> tuple[int, int, int]:
    """(rows, row_bytes, head_bytes) for prefetching about ``budget_bytes`` of ``weight`` [.., rows, cols] as the
    same head of every row of its last two dims, 16-byte aligned; head_bytes 0 where nothing can be (a row stride
    or base that is not 16-byte aligned, or a budget under 16 bytes per row)."""
    rows = weight.shape[-2]
    row_bytes = weight.stride(-2) * weight.element_size()
    width = weight.shape[-1] * weight.element_size()
    if weight.stride(-1) != 1 or row_bytes % ALIGN or weight.data_ptr() % ALIGN:
        return rows, row_bytes, 0
    head = min(width, budget_bytes // max(rows, 1)) // ALIGN * ALIGN
    return rows, row_bytes, head


def prefetch_runs_on(device) -> bool:
    """Whether the bulk L2 prefetch can run on ``device``: CUDA, compute capability 9.0+."""
    device = torch.device(device)
    return device.type == "cuda" and _capability(device.index) >= (9, 0)


@functools.lru_cache(maxsize=None)
def _capability(index: int | None) -> tuple[int, int]:
    return torch.cuda.get_device_capability(index)
