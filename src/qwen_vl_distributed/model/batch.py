"""What one forward step of a stage sees besides hidden states: the packed-sequence layout.

A step packs B sequences' new tokens into T rows (sequence after sequence). Sequence i keeps its KV in the cache
blocks ``block_tables[i]`` (model/kv_cache.py: token p in block ``table[p // block_size]`` at offset
``p % block_size``), already holds ``starts[i]`` cached tokens and brings ``lens[i]`` new ones (a prompt, a prompt
chunk, or one decoded token). Its table covers at least ``starts[i] + lens[i]`` tokens.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class SeqLayout:
    block_tables: list[list[int]]
    starts: list[int]
    lens: list[int]
    _cache: dict = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self):
        if not (len(self.block_tables) == len(self.starts) == len(self.lens)):
            raise ValueError("SeqLayout: block_tables, starts and lens must have the same length")

    @property
    def num_tokens(self) -> int:
        return sum(self.lens)

    @property
    def is_decode(self) -> bool:
        return all(n == 1 for n in self.lens)

    def offsets(self) -> list[int]:
        """Row offset of each sequence in the packed T rows (length B + 1)."""
        out = [0]
        for n in self.lens:
            out.append(out[-1] + n)
        return out

    def last_rows(self) -> list[int]:
        """Row index of each sequence's last new token (where the next-token logits come from)."""
        return [o - 1 for o in self.offsets()[1:]]

    def tensor(self, name: str, device) -> torch.Tensor:
        """Device copies of the per-sequence lists (``starts``, ``lens``), built once per step and shared by every
        layer."""
        key = (name, str(device))
        if key not in self._cache:
            self._cache[key] = to_device(torch.tensor(getattr(self, name), dtype=torch.long), device)
        return self._cache[key]

    def block_table(self, device) -> torch.Tensor:
        """The block tables as one int32 [B, W] table on ``device`` (W: the longest table; shorter rows padded with
        block 0, which no kernel reads past a sequence's length). Rows start 16-byte aligned."""
        key = ("tables", str(device))
        if key not in self._cache:
            width = max((len(t) for t in self.block_tables), default=1) or 1
            self._cache[key] = aligned_rows([torch.tensor(t, dtype=torch.int32) for t in self.block_tables],
                                            torch.int32, device)[:, :width]
        return self._cache[key]

    def row_tables(self, device, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The cache block and the offset in it of every row of the step, [T] each: where each new token's k/v
        go. Built once per step (vectorised: a Python list of an 8k prompt's rows took ~2 ms of host time while
        the GPU waited)."""
        key = ("rows", str(device), block_size)
        if key not in self._cache:
            lens = torch.tensor(self.lens, dtype=torch.long)
            shift = torch.tensor(self.starts, dtype=torch.long) - torch.tensor(self.offsets()[:-1], dtype=torch.long)
            t = int(lens.sum())
            pos = torch.arange(t) + shift.repeat_interleave(lens)  # each row's position in its sequence
            seq = torch.arange(len(self.lens)).repeat_interleave(lens)
            table = self.block_table("cpu").long()
            both = aligned_rows([table[seq, pos // block_size], pos % block_size], torch.long, device)
            self._cache[key] = (both[0, :t], both[1, :t])
        return self._cache[key]

    def bind(self, device, block_size: int, *, starts: torch.Tensor, block_table: torch.Tensor,
             rows: tuple[torch.Tensor, torch.Tensor]) -> "SeqLayout":
        """Use these device tensors as this step's (a CUDA graph's static buffers) instead of building copies."""
        self._cache[("starts", str(device))] = starts
        self._cache[("tables", str(device))] = block_table
        self._cache[("rows", str(device), block_size)] = rows
        return self


def aligned_rows(rows: list[torch.Tensor], dtype: torch.dtype, device) -> torch.Tensor:
    """The 1-D ``rows`` as one [R, W] table on ``device`` in one copy, zero-padded to a width W that is a multiple
    of 16 elements, so that every row starts 16-byte aligned: Triton compiles a kernel variant per pointer
    alignment, and a row at an odd offset would cost a compile the first time it is met."""
    width = -(-max((len(r) for r in rows), default=1) // 16) * 16 or 16
    table = torch.zeros(len(rows), width, dtype=dtype)
    for i, r in enumerate(rows):
        table[i, :len(r)] = r
    return to_device(table, device)


def to_device(t: torch.Tensor, device) -> torch.Tensor:
    """``t`` on ``device``; from the host to a GPU without a stream sync: the driver may stage a copy from pageable
    memory through pinned memory and wait for the stream first (that is, for every step still running on the GPU);
    a copy from pinned memory is queued (torch's caching host allocator reuses the pinned block once the copy has
    run). Never during CUDA-graph capture."""
    if torch.device(device).type == "cuda" and t.device.type == "cpu":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def to_host_queued(t: torch.Tensor) -> torch.Tensor:
    """A pinned host copy of device tensor ``t``, queued on the current stream (no wait): read it only after an
    event recorded behind it has passed."""
    host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
    host.copy_(t, non_blocking=True)
    return host


def list_to_device(values: list, device, dtype: torch.dtype | None = None) -> torch.Tensor:
    """A small host list as a tensor on ``device``, through ``to_device``: queued, never waiting for the stream (a
    plain ``torch.tensor(values, device=gpu)`` synchronises with every queued kernel)."""
    return to_device(torch.tensor(values, dtype=dtype), device)
