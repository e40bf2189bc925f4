"""The last stage's sampler: per-sequence state (the request's seeded generator, its token history for penalties),
keyed by the engine's sequence id and dropped when the engine releases the sequence.

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
class _SeqState:
    params: SamplingParams
    generator: torch.Generator | None
    history: TokenHistory | None


class SequenceSampler:
    def __init__(self):
        self.states: dict[int, _SeqState] = {}
        self._prompts: dict[int, list[int]] = {}

    def start(self, seq_id: int, request: dict[str, Any], prompt_ids: list[int]) -> None:
        """A new request: ``request["params"]`` is ``SamplingParams.wire()``; ``history_prefix``, if there, the
        prompt tokens before ``prompt_ids`` that were already cached (prefix cache) and that the penalties still
        count. Starting a sequence again (preempted before its first draw) starts it afresh."""
        prefix = request.get("history_prefix") or []
        p = SamplingParams.from_wire(request["params"])
        self.states[seq_id] = _SeqState(p, None, None)  # generator made on the logits' device at the first draw
        self._prompts.pop(seq_id, None)
        if p.needs_history:
            self._prompts[seq_id] = list(prefix) + list(prompt_ids)  # built into a history at the first draw

    def extend(self, seq_id: int, prompt_ids: list[int]) -> None:
        """More of the sequence's prompt (a later prefill chunk): part of the history the penalties see."""
        if seq_id in self._prompts:
            self._prompts[seq_id] += prompt_ids

    def release(self, seq_id: int) -> None:
        """The sequence has ended: drop its state (unknown ids are fine: it may never have reached this stage)."""
        self.states.pop(seq_id, None)
        self._prompts.pop(seq_id, None)

    def sample(self, seq_ids: list[int], logits: torch.Tensor) -> torch.Tensor:
        logits = logits.float()
        states = [self.states[s] for s in seq_ids]
        for s, st in zip(seq_ids, states):
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
