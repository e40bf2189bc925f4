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


def _cuda_kernel_events(fn: Callable[[], object], calls: int) -> list:
    """torch.profiler's CUDA events of ``calls`` back-to-back calls of ``fn`` (after one unprofiled warm-up call)."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    return [e for e in prof.events() if e.device_type.name == "CUDA"]


def kernel_table(fn: Callable[[], object], top: int = 25, width: int = 90) -> tuple[float, list[tuple]]:
    """CUDA kernel time of one call of ``fn`` by kernel name (torch.profiler): (total ms, [(ms, calls, name)]
    for the ``top`` names by time). For probes on the GPU machine, never for tests."""
    import collections

    per, calls = collections.Counter(), collections.Counter()
    for e in _cuda_kernel_events(fn, 1):
        name = e.name[:width]
        per[name] += e.device_time_total if hasattr(e, "device_time_total") else e.cuda_time_total
        calls[name] += 1
    return sum(per.values()) / 1e3, [(us / 1e3, calls[n], n) for n, us in per.most_common(top)]


def kernel_gaps(fn: Callable[[], object], calls: int = 4, top: int = 8) -> dict:
    """Run ``fn`` ``calls`` times back to back under torch.profiler: the GPU's busy time (sum of kernel times) against
    the span from the first kernel's start to the last one's end, and the idle time between consecutive kernels
    summed by the pair of kernels on either side, ``top`` pairs (total us, count, before, after): where the GPU
    waits for the host."""
    ev = sorted(((e.time_range.start, e.time_range.end, e.name[:60]) for e in _cuda_kernel_events(fn, calls)),
                key=lambda x: x[0])
    busy = sum(end - start for start, end, _ in ev)
    by_pair: dict = {}
    for a, b in zip(ev, ev[1:]):
        total, n = by_pair.get((a[2], b[2]), (0.0, 0))
        by_pair[(a[2], b[2])] = (total + max(0.0, b[0] - a[1]), n + 1)
    gaps = sorted(by_pair.items(), key=lambda kv: -kv[1][0])[:top]
    return {"busy_ms": busy / 1e3, "span_ms": (ev[-1][1] - ev[0][0]) / 1e3,
            "gaps_us": [(round(total, 1), n, before, after) for (before, after), (total, n) in gaps]}


def print_kernel_table(fn: Callable[[], object], top: int = 25) -> float:
    total, rows = kernel_table(fn, top)
    print(f"kernel time total {total:.3f} ms")
    for ms, n, name in rows:
        print(f"{ms:8.3f} ms {n:5d}x  {name}")
    return total


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
