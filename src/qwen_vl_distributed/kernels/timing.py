"""GPU timing and the machine's two ceilings (copy bandwidth, bf16 matmul rate), for ``qwen-vl bench``.

All times come from CUDA events after warm-up; a sample times ``iters`` back-to-back calls (so the host can run
ahead of the GPU), and the median of ``reps`` samples is reported, in milliseconds per call.
"""

from __future__ import annotations

import statistics
from typing import Callable

import torch


def cuda_time(fn: Callable[[], object], iters: int = 10, reps: int = 5, warmup: int = 2) -> float:
    """Median milliseconds per call of ``fn`` on the current stream."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    samples = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(iters):
            fn()
        end.record()
        end.synchronize()
        samples.append(start.elapsed_time(end) / iters)
    return statistics.median(samples)


def step_times(fn: Callable[[], object], steps: int) -> list[float]:
    """Milliseconds of each of ``steps`` calls, one event pair each (for steps that change state, e.g. HF's
    growing cache). Events bracket the launches, so host-bound code is charged its host time too."""
    out = []
    for _ in range(steps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        out.append(start.elapsed_time(end))
    return out


def copy_bandwidth_gbs(gib: float = 4.0) -> float:
    """Device-to-device copy of a ``gib`` GiB buffer: (bytes read + bytes written) / time, in GB/s."""
    n = int(gib * 2**30)
    src = torch.empty(n, dtype=torch.uint8, device="cuda").random_(0, 255)
    dst = torch.empty_like(src)
    ms = cuda_time(lambda: dst.copy_(src), iters=5, reps=5, warmup=2)
    return 2 * n / (ms * 1e-3) / 1e9


def matmul_tflops(n: int = 8192) -> float:
    """bf16 n x n x n product on random data (never zeros: they run faster), in TFLOP/s."""
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    ms = cuda_time(lambda: a @ b, iters=10, reps=5, warmup=3)
    return 2 * n**3 / (ms * 1e-3) / 1e12
