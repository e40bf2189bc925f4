"""What one forward step of a stage sees besides hidden states: the packed-sequence layout.

A step packs B sequences' new tokens into T rows (sequence after sequence). Sequence i owns KV-cache slot
``slots[i]``, already holds ``starts[i]`` cached tokens and brings ``lens[i]`` new ones (a prompt, a prompt chunk, or
one decoded token).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class SeqLayout:
    slots: list[int]
    starts: list[int]
    lens: list[int]
    _cache: dict = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self):
        if not (len(self.slots) == len(self.starts) == len(self.lens)):
            raise ValueError("SeqLayout: slots, starts and lens must have the same length")

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
        """Device copies of the per-sequence lists, built once per step and shared by every layer."""
        key = (name, str(device))
        if key not in self._cache:
            self._cache[key] = to_device(torch.tensor(getattr(self, name), dtype=torch.long), device)
        return self._cache[key]

    def row_tables(self, device) -> tuple[torch.Tensor, torch.Tensor]:
        """Cache slot and cache position of every row of the step, [T] each, built once per step (vectorised: a
        Python list of an 8k prompt's rows took ~2 ms of host time while the GPU waited)."""
        key = ("rows", str(device))
        if key not in self._cache:
            lens = torch.tensor(self.lens, dtype=torch.long)
            shift = torch.tensor(self.starts, dtype=torch.long) - torch.tensor(self.offsets()[:-1], dtype=torch.long)
            t = int(lens.sum())
            both = aligned_rows([torch.tensor(self.slots, dtype=torch.long).repeat_interleave(lens),
                                 torch.arange(t) + shift.repeat_interleave(lens)], torch.long, device)
            self._cache[key] = (both[0, :t], both[1, :t])
        return self._cache[key]


def aligned_rows(rows: list[torch.Tensor], dtype: torch.dtype, device) -> torch.Tensor:
    """The 1-D ``rows`` as one [R, W] table on ``device`` in one copy, zero-padded to a width W that is a multiple
    of 16 elements, so that every row starts 16-byte aligned: Triton compiles a kernel variant per pointer
    alignment, and a row at an odd offset would cost a compile the first time it is met."""
    width = -(-max((len(r) for r in rows), default=1) // 16) * 16
    table = torch.zeros(len(rows), width, dtype=dtype)
    for i, r in enumerate(rows):
        table[i, :len(r)] = r
    return to_device(table, device)


def to_device(t: torch.Tensor, device) -> torch.Tensor:
    """A host tensor on ``device`` without a stream sync: the driver may stage a copy from pageable memory through
    pinned memory and wait for the stream first; a copy from pinned memory is queued (torch's caching host
    allocator reuses the pinned block once the copy has run). Never during CUDA-graph capture."""
    if torch.device(device).type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)
