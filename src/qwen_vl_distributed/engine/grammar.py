"""Grammars for structured output and forced tool calls, enforced token by token on the last stage's sampler.

A request's grammar is ``SamplingParams.grammar``: the JSON text of one structural-tag *format* of xgrammar
(``{"type": "json_schema", ...}``, ``{"type": "regex", ...}``, ``{"type": "tags_with_separator", ...}``, ...), built
by the server (server/structured.py). xgrammar turns it into a matcher over this checkpoint's vocabulary; every
decode step the matcher fills a packed bitmask of the tokens allowed next, the sampler bans the others
(``sampling.apply_bitmask``) and feeds the drawn token back. When the structure is complete only the stop tokens
are allowed, so the sequence ends there.

Why on the last stage: it sees every sampled token as it is drawn, so the mask for the next step needs nothing
from the driver (the alternative, masks computed on stage 0 and sent down the pipeline, would add 19 KB a row to
every step's payload). Compiling a grammar (tens to hundreds of ms for a JSON schema) runs on a worker thread
as soon as the request arrives, so the step loop waits only if the grammar is needed before it is ready -- for a
Thinking model, never: its grammar starts after ``</think>`` (``SamplingParams.grammar_after``).

Why xgrammar: on this vocabulary (151k tokens) its mask costs ~8 us a token against ~200 us for llguidance
(docs/server.md, "Structured output"), and vLLM's default backend is the same library.
"""

from __future__ import annotations

import json
import logging
import re
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Sequence

import torch

from .media import RequestError

log = logging.getLogger(__name__)

# Bound on consecutive whitespace characters between JSON tokens: enough to pretty-print a few levels deep, never
# the endless run of blanks an unbounded grammar lets a model fall into.
JSON_MAX_WHITESPACE = 4


class GrammarError(RequestError):
    """A grammar that cannot be built (bad JSON schema, regex, EBNF); the message names the request field."""


def _short_reason(e: Exception) -> str:
    """xgrammar's message without its C++ source location prefix."""
    text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return re.sub(r"^\[[\d:]+\] [^ ]+:\d+: ", "", text)


def structural_tag(fmt: dict[str, Any]) -> str:
    """The wire form of a format: JSON text of the whole structural tag. Keys keep their order: a schema's
    properties are generated in the order they are declared."""
    return json.dumps({"type": "structural_tag", "format": fmt}, separators=(",", ":"))


def json_format(schema: Any) -> dict[str, Any]:
    """The structural-tag format of JSON matching ``schema`` (compact whitespace, escaped control characters)."""
    return {"type": "json_schema", "json_schema": _escaped_strings(schema), "max_whitespace_cnt": JSON_MAX_WHITESPACE}


def _escaped_strings(schema: Any) -> Any:
    """A copy of ``schema`` whose length-bounded strings carry an equivalent pattern. xgrammar (0.2.9) matches a
    string with minLength / maxLength by any characters but quote and backslash, raw control characters included,
    which no JSON parser accepts; a pattern in their place keeps the bounds and excludes them."""
    if isinstance(schema, list):
        return [_escaped_strings(x) for x in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: _escaped_strings(v) for k, v in schema.items()}
    bounded = "minLength" in out or "maxLength" in out
    if out.get("type") == "string" and bounded and not {"pattern", "format", "enum", "const"} & set(out):
        lo, hi = out.get("minLength", 0), out.get("maxLength", "")
        if isinstance(lo, int) and (hi == "" or isinstance(hi, int)):
            out["pattern"] = r'^[^"\\\x01-\x1f]{%d,%s}$' % (lo, hi)
            out.pop("minLength", None)  # (the pattern holds the bounds; xgrammar warns when both are given)
            out.pop("maxLength", None)
    return out


def check_grammar(spec: str, field: str) -> None:
    """Build the grammar once without a tokenizer (cheap), so that a bad schema is a 400 naming ``field`` here
    rather than a failure on the last stage."""
    import xgrammar

    try:
        xgrammar.Grammar.from_structural_tag(spec)
    except Exception as e:  # xgrammar raises RuntimeError / ValueError / its own errors alike
        raise GrammarError(f"{field}: cannot build a grammar from it ({_short_reason(e)})") from None


class GrammarBackend:
    """This checkpoint's vocabulary for xgrammar, and compiled grammars by their spec. Built lazily: importing
    xgrammar and indexing the vocabulary (~1 s) happens at the first request that needs it."""

    def __init__(self, tokenizer_dir: str, vocab_size: int, stop_ids: Sequence[int]):
        self.tokenizer_dir = tokenizer_dir
        self.vocab_size = vocab_size
        self.stop_ids = list(stop_ids)
        self._compiler = None
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="grammar")

    def _get_compiler(self):
        with self._lock:
            if self._compiler is None:
                import transformers
                import xgrammar

                tok = transformers.AutoTokenizer.from_pretrained(self.tokenizer_dir)
                info = xgrammar.TokenizerInfo.from_huggingface(tok, vocab_size=self.vocab_size,
                                                               stop_token_ids=self.stop_ids)
                self._compiler = xgrammar.GrammarCompiler(info, max_threads=2)
            return self._compiler

    def compile(self, spec: str) -> Future:
        """A future of the compiled grammar (compiled on the worker thread; xgrammar caches by spec)."""
        # Imported here, on the caller's thread: transformers' lazy module is not safe to import from a second
        # thread while the first may be importing too.
        import transformers  # noqa: F401
        import xgrammar  # noqa: F401

        return self._pool.submit(lambda: self._get_compiler().compile_structural_tag(spec))

    def bitmask(self, rows: int) -> torch.Tensor:
        words = (self.vocab_size + 31) // 32
        return torch.full((rows, words), -1, dtype=torch.int32)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


def allow_only(bitmask: torch.Tensor, row: int, ids: Sequence[int]) -> None:
    """Row ``row`` of a packed int32 bitmask := exactly ``ids``."""
    words = [0] * bitmask.shape[1]
    for t in ids:
        words[t // 32] |= 1 << (t % 32)
    # as signed 32-bit values (bit 31 is the sign bit)
    bitmask[row] = torch.tensor([w - (1 << 32) if w >= 1 << 31 else w for w in words], dtype=torch.int32)


class SequenceGrammar:
    """One sequence's grammar state: inactive until ``after`` is sampled (if set), then a matcher."""

    def __init__(self, compiled: Future, after: int | None):
        self._compiled = compiled
        self.active = after is None
        self.after = after
        self._matcher = None
        self.failed = False

    def _ready(self):
        if self._matcher is None and not self.failed:
            try:
                import xgrammar

                self._matcher = xgrammar.GrammarMatcher(self._compiled.result())
            except Exception as e:  # checked by the server first; if it still fails, end the sequence
                log.error("grammar failed to compile on the last stage: %s", _short_reason(e))
                self.failed = True
        return self._matcher

    def fill(self, bitmask: torch.Tensor, row: int, stop_ids: Sequence[int]) -> None:
        """Row ``row`` of the packed bitmask := the tokens allowed next (only the stop tokens if the grammar
        failed or is already complete)."""
        m = self._ready()
        if m is not None and not m.is_terminated():
            m.fill_next_token_bitmask(bitmask, row)
            return
        allow_only(bitmask, row, stop_ids)

    def accept(self, token: int) -> None:
        if not self.active:
            self.active = token == self.after
            return
        m = self._matcher
        if m is not None and not m.is_terminated() and not m.accept_token(token):
            log.error("grammar rejected token %d that its own mask allowed", token)
