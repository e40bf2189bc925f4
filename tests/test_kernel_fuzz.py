"""Every Triton kernel against its PyTorch reference on random shapes, in Triton's CPU interpreter (tests/conftest.py
turns it on where there is no GPU): the checks of tests/kernel_fuzz.py, a few seeds each, float32 and float16 (the
interpreter's tl.dot mishandles bfloat16 operands: bfloat16 runs on the GPU, tests/gpu/test_kernels_gpu.py).
Seeded, so a failure names a shape that fails again."""

from __future__ import annotations

import pytest
import torch

from kernel_fuzz import CHECKS, CPU, run_check

pytest.importorskip("triton")

SEEDS = range(3)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("name", sorted(CHECKS))
def test_kernel_matches_reference_on_random_shapes(name, dtype, seed):
    run_check(name, dtype, seed, "cpu", CPU)
