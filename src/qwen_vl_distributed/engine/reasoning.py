"""Splitting a Thinking model's output into reasoning and answer, by token id.

The split applies only when the prompt itself opened a think block: the Thinking chat template ends the
generation prompt with ``<think>\\n``, so the output is ``reasoning \\n</think>\\n\\n answer``; an Instruct template
opens none, and then the whole output is the answer. Both tags are found by their token ids, never in decoded text
(a tokenizer that marks them special drops them from decoded text). If ``</think>`` never comes (the output was
cut by max tokens) everything is reasoning.

Newlines that only frame the tags are dropped: leading / trailing ``\\n`` of the reasoning and leading ``\\n`` of
the answer (what the chat template itself strips when it re-renders a turn). A stray ``<think>`` the model may
repeat before any reasoning is dropped too.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

OPEN, CLOSE = "<think>", "</think>"
REASONING, CONTENT = "reasoning", "content"


@dataclass(frozen=True)
class ThinkTokens:
    """The ids of ``<think>`` and ``</think>`` in a vocabulary."""

    start: int
    end: int

    @classmethod
    def of(cls, tokenizer: Any) -> ThinkTokens | None:
        """The tags' ids, or None if the vocabulary does not have both as single tokens."""
        ids = []
        for tag in (OPEN, CLOSE):
            i = tokenizer.convert_tokens_to_ids(tag)
            if not isinstance(i, int) or i == tokenizer.unk_token_id:
                return None
            ids.append(i)
        return cls(*ids)

    def opened_by(self, prompt_ids: Sequence[int]) -> bool:
        """Whether the prompt leaves a think block open (its last ``<think>`` comes after its last ``</think>``)."""
        last = {self.start: -1, self.end: -1}
        for i, t in enumerate(prompt_ids):
            if t in last:
                last[t] = i
        return last[self.start] > last[self.end]


class ReasoningRouter:
    """Which part each output token belongs to: ``REASONING``, ``CONTENT`` or None (a tag, dropped)."""

    def __init__(self, think: ThinkTokens | None, opened: bool):
        self.think = think
        self.part = REASONING if (think is not None and opened) else CONTENT
        self._any_reasoning = False

    def route(self, token: int) -> str | None:
        if self.part == CONTENT:
            return CONTENT
        if token == self.think.end:
            self.part = CONTENT
            return None
        if token == self.think.start and not self._any_reasoning:
            return None  # the model repeating the prompt's <think>
        self._any_reasoning = True
        return REASONING


class FramingTrimmer:
    """Drops the newlines that frame a part: all leading ``\\n``; for the reasoning also the trailing ones, which are
    held back until more text shows they were inside the reasoning, or ``</think>`` shows they framed it."""

    def __init__(self, trim_tail: bool):
        self.trim_tail = trim_tail
        self.started = False
        self.held = ""

    def feed(self, text: str) -> str:
        if not self.started:
            text = text.lstrip("\n")
            self.started = bool(text)
        if not self.trim_tail or not text:
            return text
        text = self.held + text
        body = text.rstrip("\n")
        self.held = text[len(body):]
        return body

    def close(self, framed: bool) -> str:
        """The end of the part: ``framed`` (a ``</think>`` follows) drops the held newlines, else releases them."""
        held, self.held = self.held, ""
        return "" if framed else held
