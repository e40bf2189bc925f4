"""The last stage's sampler: per-sequence state (the request's seeded generator, its token history for penalties,
its grammar, how many tokens it has drawn), keyed by the engine's sequence id and dropped when the engine releases
the sequence.

Lives in the engine layer and is handed to the last stage's runtime at start-up (the pipeline layer only knows the
``Sampler`` protocol). Each row draws with its own generator, so a seeded request samples the same tokens whatever
else shares its batch. The draw itself is ``sampling.draw``; grammars are ``grammar.SequenceGrammar``. The masks
apply to the logits the stage's model returned, after any CUDA graph: decode graphs stay as they are.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from .grammar import GrammarBackend, SequenceGrammar
from .sampling import Draw, SamplingParams, TokenHistory, draw, make_generator


@dataclass
class _SeqState:
    params: SamplingParams
    generator: torch.Generator | None
    history: TokenHistory | None
    grammar: SequenceGrammar | None = None
    min_tokens_stop: tuple[int, ...] = ()  # banned while fewer than params.min_tokens have been drawn
    drawn: int = 0


class SequenceSampler:
    def __init__(self, grammars: GrammarBackend | None = None):
        self.states: dict[int, _SeqState] = {}
        self._prompts: dict[int, list[int]] = {}
        self.grammars = grammars

    def start(self, seq_id: int, request: dict[str, Any], prompt_ids: list[int]) -> None:
        """A new request: ``request["params"]`` is ``SamplingParams.wire()``; ``history_prefix``, if there, the
        prompt tokens before ``prompt_ids`` that were already cached (prefix cache) and that the penalties still
        count; ``stop_ids`` (with min_tokens) the tokens that would end the sequence. Starting a sequence again
        (preempted before its first draw) starts it afresh."""
        prefix = request.get("history_prefix") or []
        p = SamplingParams.from_wire(request["params"])
        st = _SeqState(p, None, None, min_tokens_stop=tuple(request.get("stop_ids") or ()))
        if p.grammar is not None:
            if self.grammars is None:
                raise RuntimeError("a request with a grammar reached a sampler built without one")
            st.grammar = SequenceGrammar(self.grammars.compile(p.grammar), p.grammar_after)
        self.states[seq_id] = st  # generator made on the logits' device at the first draw
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

    def sample(self, seq_ids: list[int], logits: torch.Tensor) -> Draw:
        logits = logits.float()
        states = [self.states[s] for s in seq_ids]
        for s, st in zip(seq_ids, states):
            if not st.params.greedy and st.generator is None:
                st.generator = make_generator(st.params.seed, logits.device)
            if st.params.needs_history and st.history is None:
                st.history = TokenHistory(self._prompts.pop(s), logits.shape[-1], logits.device)
        banned = [st.min_tokens_stop if st.drawn < st.params.min_tokens else () for st in states]
        out = draw(logits, [st.params for st in states], [st.generator for st in states],
                   [st.history for st in states], banned, self._masks(states, logits.device))
        # the tokens go to the host only for a grammar (it advances on the host); penalties count them on the device
        host = out.tokens.tolist() if any(st.grammar is not None for st in states) else None
        for i, st in enumerate(states):
            st.drawn += 1
            if st.history is not None:
                st.history.append(out.tokens[i])
            if st.grammar is not None:
                st.grammar.accept(host[i])
        return out

    def _masks(self, states: list[_SeqState], device: torch.device) -> tuple[torch.Tensor, list[int]] | None:
        """The packed masks of the rows whose grammar is active, and those rows."""
        rows = [i for i, st in enumerate(states) if st.grammar is not None and st.grammar.active]
        if not rows:
            return None
        bitmask = self.grammars.bitmask(len(rows))
        for r, i in enumerate(rows):
            states[i].grammar.fill(bitmask, r, self.grammars.stop_ids)
        return bitmask.to(device, non_blocking=True), rows
