"""Splitting the Thinking model's output into reasoning and answer.

The prompt already ends with ``<think>\\n``, so the generated text is ``reasoning \\n</think>\\n\\n answer``. If
``</think>`` never appears (e.g. the output was cut by max tokens) everything is reasoning. Newlines that only frame
the tag are dropped: leading / trailing ``\\n`` of the reasoning and leading ``\\n`` of the answer (what the chat
template itself strips when it re-renders a turn). A stray ``<think>`` the model may repeat at the very start is
dropped too.

``ReasoningStreamParser`` gives, delta by delta, exactly the pieces ``split_reasoning`` gives for the whole text,
whatever the delta boundaries (the tag may arrive split across several deltas).
"""

from __future__ import annotations

OPEN, CLOSE = "<think>", "</think>"


def split_reasoning(text: str) -> tuple[str, str]:
    """(reasoning, content) of a complete generation."""
    body = text.lstrip("\n")
    if body.startswith(OPEN):
        body = body[len(OPEN):]
    reasoning, sep, content = body.partition(CLOSE)
    if sep:
        return reasoning.strip("\n"), content.lstrip("\n")
    return reasoning.lstrip("\n"), ""


def _held_tail(buf: str) -> int:
    """Start of the tail to hold back: newlines, then possibly the beginning of ``</think>``."""
    k = len(buf)
    for n in range(min(len(CLOSE) - 1, len(buf)), 0, -1):
        if CLOSE.startswith(buf[-n:]):
            k -= n
            break
    while k > 0 and buf[k - 1] == "\n":
        k -= 1
    return k


class ReasoningStreamParser:
    """Feed text deltas, get (reasoning_delta, content_delta) pairs; call ``finish`` at the end of the stream."""

    def __init__(self) -> None:
        self._buf = ""  # reasoning text not yet released
        self._open_checked = False  # decided whether the output starts with a stray <think>
        self._started = False  # some reasoning text (not a framing newline) seen
        self._in_content = False
        self._content_started = False

    @property
    def in_content(self) -> bool:
        """True once ``</think>`` has been seen."""
        return self._in_content

    def feed(self, delta: str) -> tuple[str, str]:
        if self._in_content:
            return "", self._content(delta)
        self._buf += delta
        return self._drain(final=False)

    def finish(self) -> tuple[str, str]:
        """Release what was held back (an unfinished tag at the end is plain reasoning text)."""
        if self._in_content:
            return "", ""
        return self._drain(final=True)

    def _content(self, text: str) -> str:
        if not self._content_started:
            text = text.lstrip("\n")
            self._content_started = bool(text)
        return text

    def _drain(self, final: bool) -> tuple[str, str]:
        buf = self._buf
        if not self._started:
            buf = buf.lstrip("\n")
            if not self._open_checked:
                if not final and len(buf) < len(OPEN) and OPEN.startswith(buf):
                    self._buf = buf  # may still become <think>
                    return "", ""
                if buf.startswith(OPEN):
                    buf = buf[len(OPEN):].lstrip("\n")
                self._open_checked = True
            self._started = bool(buf)
        i = buf.find(CLOSE)
        if i >= 0:
            self._in_content, self._buf = True, ""
            return buf[:i].rstrip("\n"), self._content(buf[i + len(CLOSE):])
        k = len(buf) if final else _held_tail(buf)
        self._buf = buf[k:]
        return buf[:k], ""
