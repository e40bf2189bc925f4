"""The last stage's sampler: per-slot state (the request's seeded generator, its token history for penalties).

Lives in the engine layer and is handed to the last stage's runtime at start-up (the pipeline layer only knows the
``Sampler`` protocol). Each row draws with its own generator, so a seeded request samples the same tokens whatever
else shares its batch. The draw itself is ``sampling.sample``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from .sampling import SamplingParams, TokenHistory, make_generator, sample


@dataclass
class _SlotState:
    params: SamplingParams
    generator: torch.Generator | None
    history: TokenHistory | None


class SlotSampler:
    def __init__(self):
        self.slots: dict[int, _SlotState] = {}
        self._prompts: dict[int, list[int]] = {}

    def start(self, slot: int, request: dict[str, Any], prompt_ids: list[int]) -> None:
        """A new request in ``slot``: ``request["params"]`` is ``SamplingParams.wire()``; ``history_prefix``, if
        there, the prompt tokens before ``prompt_ids`` that were already cached (prefix reuse) and that the
        penalties still count."""
        prefix = request.get("history_prefix") or []
        p = SamplingParams.from_wire(request["params"])
        self.slots[slot] = _SlotState(p, None, None)  # generator made on the logits' device at the first draw
        self._prompts.pop(slot, None)  # a previous request's, if it ended before its first draw (aborted in prefill)
        if p.needs_history:
            self._prompts[slot] = list(prefix) + list(prompt_ids)  # built into a history at the first draw

    def extend(self, slot: int, prompt_ids: list[int]) -> None:
        """More of the slot's prompt (a later prefill chunk): part of the history the penalties see."""
        if slot in self._prompts:
            self._prompts[slot] += prompt_ids

    def sample(self, slots: list[int], logits: torch.Tensor) -> torch.Tensor:
        logits = logits.float()
        states = [self.slots[s] for s in slots]
        for s, st in zip(slots, states):
            if not st.params.greedy and st.generator is None:
                st.generator = make_generator(st.params.seed, logits.device)
            if st.params.needs_history and st.history is None:
                st.history = TokenHistory(self._prompts.pop(s), logits.shape[-1], logits.device)
        out = sample(logits, [st.params for st in states], [st.generator for st in states],
                     [st.history for st in states])
        for st, tok in zip(states, out):
            if st.history is not None:
                st.history.append(tok)
        return out
