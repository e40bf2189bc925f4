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
            self._cache[key] = torch.tensor(getattr(self, name), dtype=torch.long, device=device)
        return self._cache[key]
