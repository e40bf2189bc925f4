"""One sequence's tokens -> text: detokenization, the reasoning split, stop strings. Every frontend (the server's
chat and completions routes, the CLI) reads a sequence's text through an ``OutputStream``, so they cannot disagree.

The reasoning and the answer are detokenized apart (``</think>`` is the boundary, by token id), each with its own
stop-string matcher: a stop string inside the reasoning ends the sequence there, with no answer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

from .reasoning import CONTENT, REASONING, FramingTrimmer, ReasoningRouter, ThinkTokens
from .sampling import StopStringMatcher


@dataclass
class Piece:
    reasoning: str = ""
    content: str = ""
    stopped: bool = False  # a stop string matched: the sequence ends here

    def add(self, part: str, text: str) -> None:
        if part == REASONING:
            self.reasoning += text
        else:
            self.content += text

    def __bool__(self) -> bool:
        return bool(self.reasoning or self.content)


class OutputStream:
    """``add(token) -> Piece`` for each generated token, then ``finish() -> Piece`` at the end of the sequence (it
    releases held-back text: a partial stop string, framing newlines, an incomplete character)."""

    def __init__(self, processor: Any, think: ThinkTokens | None = None, opened: bool = False,
                 stops: Sequence[str] = (), include_stop: bool = False, skip_special_tokens: bool = True):
        self.processor = processor
        self.stop_strings = tuple(stops)
        self.include_stop = include_stop
        self.skip_special_tokens = skip_special_tokens
        self.router = ReasoningRouter(think, opened)
        self.part = self.router.part
        self.stopped = False
        self.reasoning = ""  # all text emitted so far, per part
        self.content = ""
        self._open_part()

    def _open_part(self) -> None:
        self.detok = self.processor.detokenizer(self.skip_special_tokens)
        self.stops = StopStringMatcher(self.stop_strings, self.include_stop)
        self.trim = FramingTrimmer(trim_tail=self.part == REASONING)

    def add(self, token: int) -> Piece:
        piece = Piece()
        if self.stopped:
            piece.stopped = True
            return piece
        part = self.router.route(token)
        if part is None:  # a think tag: dropped; </think> ends the reasoning
            if self.router.part != self.part:
                self._close_part(piece, framed=True)
                self.part = CONTENT
                self._open_part()
            return self._record(piece)
        text, stopped = self.stops.feed(self.detok.add(token))
        piece.add(self.part, self.trim.feed(text))
        if stopped:
            self.stopped = piece.stopped = True
            piece.add(self.part, self.trim.close(framed=False))
        return self._record(piece)

    def finish(self) -> Piece:
        """The end of the output; the last bytes may still complete a stop string (then ``stopped``)."""
        piece = Piece()
        if not self.stopped:
            self._close_part(piece, framed=False)
        return self._record(piece)

    def _close_part(self, piece: Piece, framed: bool) -> None:
        text, stopped = self.stops.feed(self.detok.finish())
        if stopped:
            self.stopped = piece.stopped = True
        else:
            text += self.stops.flush()
        piece.add(self.part, self.trim.feed(text))
        piece.add(self.part, self.trim.close(framed and not stopped))

    def _record(self, piece: Piece) -> Piece:
        self.reasoning += piece.reasoning
        self.content += piece.content
        return piece


def output_stream(processor: Any, prompt_ids: Sequence[int], stops: Sequence[str] = (), include_stop: bool = False,
                  skip_special_tokens: bool = True) -> OutputStream:
    """The stream for a sequence of this prompt: the reasoning split on exactly when the prompt opened a think
    block."""
    think = ThinkTokens.of(processor.tokenizer)
    opened = think is not None and think.opened_by(prompt_ids)
    return OutputStream(processor, think, opened, stops, include_stop, skip_special_tokens)
