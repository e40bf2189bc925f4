"""Log-probabilities in the wire forms of chat completions (``logprobs.content``) and completions (``tokens``,
``token_logprobs``, ``top_logprobs``, ``text_offset``). One entry per generated token, the reasoning's included."""

from __future__ import annotations

from functools import lru_cache
from typing import Any

from .generation import TokenLogprobs
from .protocol import ChoiceLogprobs, CompletionLogprobs, TokenLogprob, TopLogprob


class TokenText:
    """A token's own bytes and text (byte-level BPE: the bytes behind its vocabulary symbol)."""

    def __init__(self, tokenizer: Any):
        self.tok = tokenizer
        from transformers.convert_slow_tokenizer import bytes_to_unicode

        self.byte_of = {c: b for b, c in bytes_to_unicode().items()}
        self.added = {i: t.content for i, t in tokenizer.added_tokens_decoder.items()}
        self.bytes = lru_cache(maxsize=65536)(self._bytes)

    def _bytes(self, token: int) -> bytes:
        if token in self.added:
            return self.added[token].encode()
        symbol = self.tok.convert_ids_to_tokens(token)
        if symbol is None:
            return b""
        if all(c in self.byte_of for c in symbol):
            return bytes(self.byte_of[c] for c in symbol)
        return self.tok.decode([token], skip_special_tokens=False).encode()

    def text(self, token: int) -> str:
        return self.bytes(token).decode("utf-8", errors="replace")


def chat_logprobs(entries: list[TokenLogprobs], texts: TokenText) -> ChoiceLogprobs:
    def top(t: int, lp: float) -> TopLogprob:
        return TopLogprob(token=texts.text(t), logprob=lp, bytes=list(texts.bytes(t)))

    return ChoiceLogprobs(content=[
        TokenLogprob(token=texts.text(e.token), logprob=e.logprob, bytes=list(texts.bytes(e.token)),
                     top_logprobs=[top(t, lp) for t, lp in e.top]) for e in entries])


def completion_logprobs(entries: list[TokenLogprobs], texts: TokenText, offset: int) -> CompletionLogprobs:
    """``offset``: where the first token's text starts in the choice's text (after an echoed prompt)."""
    tokens, offsets = [], []
    for e in entries:
        tokens.append(texts.text(e.token))
        offsets.append(offset)
        offset += len(tokens[-1])
    return CompletionLogprobs(tokens=tokens, token_logprobs=[e.logprob for e in entries],
                              top_logprobs=[{texts.text(t): lp for t, lp in e.top} for e in entries],
                              text_offset=offsets)
