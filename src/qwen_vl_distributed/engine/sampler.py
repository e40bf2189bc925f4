"""The last stage's sampler: per-slot state (seeded generator, token counts for penalties) and the next-token draw.

Lives in the engine layer and is handed to the last stage's runtime at start-up (the pipeline layer only knows the
``Sampler`` protocol). Temperature 0 (or None) is greedy.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class _SlotState:
    params: dict[str, Any]
    generator: torch.Generator | None
    prompt_ids: list[int]
    output_counts: dict[int, int] = field(default_factory=dict)


class SlotSampler:
    def __init__(self):
        self.slots: dict[int, _SlotState] = {}

    def start(self, slot: int, params: dict[str, Any], prompt_ids: list[int]) -> None:
        gen = None
        if params.get("temperature"):
            gen = torch.Generator()
            gen.manual_seed(params["seed"] if params.get("seed") is not None else torch.seed())
        self.slots[slot] = _SlotState(dict(params), gen, list(prompt_ids))

    def sample(self, slots: list[int], logits: torch.Tensor) -> torch.Tensor:
        logits = logits.float().cpu()
        out = torch.empty(len(slots), dtype=torch.long)
        for i, slot in enumerate(slots):
            st = self.slots[slot]
            out[i] = self._draw(st, logits[i])
            tok = int(out[i])
            st.output_counts[tok] = st.output_counts.get(tok, 0) + 1
        return out

    def _draw(self, st: _SlotState, row: torch.Tensor) -> int:
        if not st.params.get("temperature") and not _has_penalty(st.params):
            return int(row.argmax())
        from .sampling import sample_row  # the filters and penalties

        return sample_row(row, st.params, st.generator, st.prompt_ids, st.output_counts)


def _has_penalty(p: dict[str, Any]) -> bool:
    return bool(p.get("presence_penalty") or p.get("frequency_penalty")
                or p.get("repetition_penalty") not in (None, 1.0))
