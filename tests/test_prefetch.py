"""The decode chain's L2 prefetches (kernels.prefetch): which bytes each program asks for, checked in the Triton
interpreter (the prefetch instruction itself is inline PTX, so it runs only on a GPU: tests/gpu holds the decode
step with it to the step without, bit for bit)."""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
import torch
import triton
import triton.language as tl

from qwen_vl_distributed.kernels.choices import L2Prefetch
from qwen_vl_distributed.kernels.prefetch import prefetch_runs_on, row_head_addresses, row_heads


@triton.jit
def _addresses_kernel(base_ptr, out_ptr, rows, row_bytes, RB: tl.constexpr):
    part = tl.program_id(0)
    addr = row_head_addresses(base_ptr, rows, row_bytes, part, tl.num_programs(0), RB)
    tl.store(out_ptr + part * RB + tl.arange(0, RB), addr - base_ptr.to(tl.int64))


@pytest.mark.parametrize("rows,parts", [(48, 1), (48, 5), (4096, 68), (7, 16), (3072, 8)])
def test_the_programs_together_ask_for_every_row_and_nothing_past_the_last(rows, parts):
    w = torch.zeros(rows, 24, dtype=torch.bfloat16)
    row_bytes = w.stride(0) * w.element_size()
    rb = triton.next_power_of_2(triton.cdiv(rows, parts))
    out = torch.full((parts, rb), -1, dtype=torch.int64)
    _addresses_kernel[(parts,)](w, out, rows, row_bytes, RB=rb)
    assert (out % row_bytes == 0).all()
    asked = out // row_bytes
    assert set(asked.flatten().tolist()) == set(range(rows))
    per = triton.cdiv(rows, parts)
    for p in range(parts):  # each program its own contiguous share
        share = set(asked[p].tolist())
        assert share == set(range(min(p * per, rows - 1), min((p + 1) * per, rows))) or share == {rows - 1}


def test_the_head_of_each_row_is_the_budget_over_the_rows_in_16_byte_units():
    w = torch.zeros(4096, 8192, dtype=torch.bfloat16)
    rows, row_bytes, head = row_heads(w, 24_000_000)
    assert (rows, row_bytes) == (4096, 16384) and head == 24_000_000 // 4096 // 16 * 16
    assert row_heads(w, 10**12)[2] == 16384  # at most the whole row
    assert row_heads(w, 100)[2] == 0  # under 16 bytes a row: nothing
    experts = torch.zeros(4, 3072, 4096, dtype=torch.bfloat16)
    assert row_heads(experts, 3_000_000) == (3072, 8192, 976)
    odd = torch.zeros(10, 7, dtype=torch.bfloat16)  # 14-byte rows: no aligned head
    assert row_heads(odd, 10**6)[2] == 0
    assert row_heads(torch.zeros(16, 64)[:, 1:], 10**6)[2] == 0  # the base is 4 bytes past a 16-byte boundary


def test_the_choice_checks_its_numbers_and_is_for_decode_sized_steps():
    pf = L2Prefetch(o_mb=2, experts_mb=1, max_rows=8)
    assert pf.o_bytes(8) == 2_000_000 and pf.o_bytes(9) == 0 and pf.experts_bytes(1) == 1_000_000
    with pytest.raises(ValueError, match="L2Prefetch"):
        L2Prefetch(o_mb=-1)
    assert not prefetch_runs_on("cpu")
