"""Sampling parameters and next-token sampling for a batch of requests.

Legend: B batch rows (one request each), V vocabulary (logits width).

Semantics follow OpenAI / vLLM / HF:
- temperature 0: greedy argmax (after penalties);
- repetition_penalty (HF): logits of tokens in prompt + output are divided by it when positive, multiplied when not;
- presence / frequency penalty (OpenAI): subtract presence * [count > 0] + frequency * count over *output* tokens;
- logit_bias (OpenAI): added to the logits of the listed token ids;
- min_tokens (vLLM): the stop tokens are banned until that many tokens have been generated;
- a grammar's mask (structured output, tool calls): tokens the grammar does not allow next are banned;
- then temperature, min-p (tokens below min_p x the top token's probability dropped), top-k (ties with the k-th
  value are kept), top-p over the top-k renormalized distribution (the smallest prefix of the sorted distribution
  whose mass reaches top_p; the top token always survives).

Log-probabilities (OpenAI ``logprobs``): the log-softmax of the logits the token is drawn from -- after penalties,
bias, bans, the grammar's mask and temperature (1 for greedy rows), before the min-p / top-k / top-p truncation,
which only decides which tokens may be drawn. A banned token's log-probability is -inf.

Reproducibility: each request owns a ``torch.Generator`` seeded by its ``seed`` and draws its own noise, so a seed
gives the same tokens whatever else shares the batch. The draw is an exponential race, argmax(p / q) with
q ~ Exp(1) i.i.d., which picks token j with probability p_j.
"""

from __future__ import annotations

import math
import secrets
from dataclasses import dataclass, fields
from typing import Any, Mapping, Sequence

import torch

from ..model.batch import list_to_device, to_host_queued
from .media import RequestError


class SamplingParamError(RequestError):
    """A sampling parameter out of range; the message starts with the parameter's name."""


def _number(name: str, value: Any, lo: float | None = None, hi: float | None = None, lo_open: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise SamplingParamError(f"{name}: expected a finite number, got {value!r}")
    if lo is not None and (value < lo or (lo_open and value == lo)):
        raise SamplingParamError(f"{name}: must be {'>' if lo_open else '>='} {lo}, got {value!r}")
    if hi is not None and value > hi:
        raise SamplingParamError(f"{name}: must be <= {hi}, got {value!r}")
    return float(value)


def _integer(name: str, value: Any, lo: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise SamplingParamError(f"{name}: expected an integer, got {value!r}")
    if lo is not None and value < lo:
        raise SamplingParamError(f"{name}: must be >= {lo}, got {value!r}")
    return value


GREEDY_BELOW = 1e-5  # temperatures under this sample greedily
MAX_LOGPROBS = 20  # top log-probabilities per token, at most (OpenAI's limit)


@dataclass(frozen=True)
class SamplingParams:
    """Per-request decoding settings, validated at construction. top_k 0 or -1 and top_p 1 disable the filters."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    max_new_tokens: int = 1024
    stop_token_ids: tuple[int, ...] = ()
    stop: tuple[str, ...] = ()
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    min_p: float = 0.0
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, bias) pairs, ids ascending
    logprobs: int | None = None  # None: none; k: the sampled token's log-probability and the k most likely
    min_tokens: int = 0  # the stop tokens are banned until this many tokens have been generated
    ignore_eos: bool = False  # the checkpoint's end-of-sequence tokens do not end the sequence
    grammar: str | None = None  # JSON text of a structured-output format (engine/grammar.py)
    grammar_after: int | None = None  # the grammar starts after this token id is sampled (None: at once)

    def __post_init__(self) -> None:
        _number("temperature", self.temperature, lo=0.0)
        _number("top_p", self.top_p, lo=0.0, hi=1.0, lo_open=True)
        if _integer("top_k", self.top_k, lo=-1) == -1:
            object.__setattr__(self, "top_k", 0)
        if self.seed is not None:
            _integer("seed", self.seed)
        _integer("max_new_tokens", self.max_new_tokens, lo=1)
        _number("presence_penalty", self.presence_penalty, lo=-2.0, hi=2.0)
        _number("frequency_penalty", self.frequency_penalty, lo=-2.0, hi=2.0)
        _number("repetition_penalty", self.repetition_penalty, lo=0.0, lo_open=True)
        _number("min_p", self.min_p, lo=0.0, hi=1.0)
        if self.logprobs is not None:
            _integer("logprobs", self.logprobs, lo=0)
            if self.logprobs > MAX_LOGPROBS:
                raise SamplingParamError(f"logprobs: at most {MAX_LOGPROBS} top log-probabilities, got {self.logprobs}")
        _integer("min_tokens", self.min_tokens, lo=0)
        if self.grammar is not None and not isinstance(self.grammar, str):
            raise SamplingParamError(f"grammar: expected JSON text, got {type(self.grammar).__name__}")
        if self.grammar_after is not None:
            _integer("grammar_after", self.grammar_after, lo=0)
        object.__setattr__(self, "logit_bias", self._bias(self.logit_bias))
        object.__setattr__(self, "stop_token_ids", self._stop_ids(self.stop_token_ids))
        object.__setattr__(self, "stop", self._stop_strings(self.stop))

    @staticmethod
    def _stop_ids(ids: Any) -> tuple[int, ...]:
        if isinstance(ids, (str, bytes)) or not isinstance(ids, (list, tuple)):
            raise SamplingParamError(f"stop_token_ids: expected a list of integers, got {ids!r}")
        return tuple(_integer(f"stop_token_ids[{i}]", t, lo=0) for i, t in enumerate(ids))

    @staticmethod
    def _bias(bias: Any) -> tuple[tuple[int, float], ...]:
        """{token id: bias} or (id, bias) pairs -> sorted pairs; ids >= 0, biases in [-100, 100] (OpenAI's range)."""
        items = bias.items() if isinstance(bias, Mapping) else bias
        if isinstance(items, (str, bytes)) or not isinstance(items, (list, tuple, type({}.items()))):
            raise SamplingParamError(f"logit_bias: expected a map of token ids to numbers, got {bias!r}")
        out = {}
        for pair in items:
            if not isinstance(pair, (list, tuple)) or len(pair) != 2:
                raise SamplingParamError(f"logit_bias: expected (token id, bias) pairs, got {pair!r}")
            tok, b = pair
            key = int(tok) if isinstance(tok, str) and tok.strip().isdigit() else tok
            out[_integer(f"logit_bias[{tok!r}]", key, lo=0)] = _number(f"logit_bias[{tok!r}]", b, -100.0, 100.0)
        return tuple(sorted(out.items()))

    @staticmethod
    def _stop_strings(stop: Any) -> tuple[str, ...]:
        if stop is None:
            return ()
        if isinstance(stop, str):  # OpenAI accepts a single string
            stop = [stop]
        if not isinstance(stop, (list, tuple)):
            raise SamplingParamError(f"stop: expected a string or a list of strings, got {stop!r}")
        for i, s in enumerate(stop):
            if not isinstance(s, str) or not s:
                raise SamplingParamError(f"stop[{i}]: expected a non-empty string, got {s!r}")
        return tuple(stop)

    @property
    def greedy(self) -> bool:
        # below this, logits / temperature overflows float32; the distribution is a point mass anyway
        return self.temperature < GREEDY_BELOW

    @property
    def needs_history(self) -> bool:
        """Whether sampling this request needs a ``TokenHistory`` (any penalty active)."""
        return self.repetition_penalty != 1.0 or self.presence_penalty != 0.0 or self.frequency_penalty != 0.0

    # what only the driver needs (lengths and stop checks happen there); every other field travels to the sampler
    DRIVER_ONLY = ("max_new_tokens", "stop_token_ids", "stop", "ignore_eos")

    def wire(self) -> dict[str, Any]:
        """The fields the last stage's sampler needs, as plain values (the payload's form for them)."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name not in self.DRIVER_ONLY}

    @classmethod
    def from_wire(cls, data: Mapping[str, Any]) -> SamplingParams:
        return cls(**data)  # (logit_bias arrives as JSON lists; __post_init__ makes them pairs again)

    @classmethod
    def from_generation_config(cls, gen: Mapping[str, Any], **overrides: Any) -> SamplingParams:
        """Defaults from a checkpoint's generation_config.json (do_sample false -> greedy), then ``overrides``."""
        keys = {f.name for f in fields(cls)}
        base = {k: gen[k] for k in ("temperature", "top_p", "top_k", "repetition_penalty") if gen.get(k) is not None}
        if gen.get("do_sample") is False:
            base["temperature"] = 0.0
        base.update({k: v for k, v in overrides.items() if v is not None})
        unknown = set(base) - keys
        if unknown:
            raise SamplingParamError(f"{sorted(unknown)[0]}: unknown sampling parameter")
        return cls(**base)


def make_generator(seed: int | None, device: torch.device | str = "cpu") -> torch.Generator:
    """A request's own generator; without a seed it is seeded from the OS so requests still differ."""
    g = torch.Generator(device=device)
    g.manual_seed((secrets.randbits(63) if seed is None else seed) % 2**64)
    return g


class TokenHistory:
    """One request's token statistics for penalties. counts: int32 [V] over output; seen: bool [V] prompt + output."""

    def __init__(self, prompt_ids: Sequence[int], vocab_size: int, device: torch.device | str = "cpu"):
        self.counts = torch.zeros(vocab_size, dtype=torch.int32, device=device)
        self.seen = torch.zeros(vocab_size, dtype=torch.bool, device=device)
        ids = torch.as_tensor(list(prompt_ids), dtype=torch.long, device=device)
        self.seen[ids[ids < vocab_size]] = True

    def append(self, token: int | torch.Tensor) -> None:
        """Record a sampled token (an int or a 0-d / 1-element tensor, no host sync needed)."""
        t = torch.as_tensor(token, dtype=torch.long, device=self.counts.device).reshape(1)
        self.counts.index_add_(0, t, torch.ones(1, dtype=torch.int32, device=t.device))
        self.seen.index_fill_(0, t, True)  # (``seen[t] = True`` would copy a host scalar: a stream sync)


def _col(values: list[float], like: torch.Tensor) -> torch.Tensor:
    return list_to_device(values, like.device, like.dtype).unsqueeze(1)  # [B, 1]


def apply_penalties(logits: torch.Tensor, params: Sequence[SamplingParams],
                    histories: Sequence[TokenHistory | None]) -> torch.Tensor:
    """Penalized copy of logits [B, V]; rows without an active penalty are unchanged."""
    rows = [i for i, p in enumerate(params) if p.needs_history]
    if not rows:
        return logits
    logits = logits.clone()
    for i in rows:
        h = histories[i]
        if h is None:
            raise ValueError(f"row {i}: penalties requested but no TokenHistory given")
        p, row = params[i], logits[i]
        if p.repetition_penalty != 1.0:
            scaled = torch.where(row > 0, row / p.repetition_penalty, row * p.repetition_penalty)
            row = torch.where(h.seen, scaled, row)
        counts = h.counts.to(row.dtype)
        row = row - p.frequency_penalty * counts - p.presence_penalty * (counts > 0).to(row.dtype)
        logits[i] = row
    return logits


def apply_bias(logits: torch.Tensor, params: Sequence[SamplingParams],
               banned: Sequence[Sequence[int]] | None = None) -> torch.Tensor:
    """Logits [B, V] with each row's logit_bias added and its ``banned`` ids at -inf (a copy when anything
    changes). Ids at or past V are ignored (the server refuses them before they get here)."""
    rows = [i for i, p in enumerate(params) if p.logit_bias or (banned and banned[i])]
    if not rows:
        return logits
    logits = logits.clone()
    V = logits.shape[-1]
    for i in rows:
        pairs = [(t, b) for t, b in params[i].logit_bias if t < V]
        if pairs:
            ids = list_to_device([t for t, _ in pairs], logits.device)
            logits[i, ids] += list_to_device([b for _, b in pairs], logits.device, logits.dtype)
        ban = [t for t in (banned[i] if banned else ()) if t < V]
        if ban:
            logits[i].index_fill_(0, list_to_device(ban, logits.device), float("-inf"))  # (a scalar: no host tensor)
    return logits


def apply_bitmask(logits: torch.Tensor, bitmask: torch.Tensor, rows: Sequence[int]) -> torch.Tensor:
    """Logits [B, V] with the tokens a grammar forbids at -inf, in place. ``bitmask`` int32 [len(rows), W] on the
    logits' device: bit j of word w allows token 32 w + j (the packed form grammar libraries fill); ``rows`` are
    the logits rows it applies to."""
    V = logits.shape[-1]
    shifts = torch.arange(32, device=bitmask.device, dtype=torch.int32)
    allowed = ((bitmask.unsqueeze(-1) >> shifts) & 1).bool().flatten(1)[:, :V]  # [R, V]
    if len(rows) == logits.shape[0]:  # every row (the common case): no gather / scatter
        return logits.masked_fill_(~allowed, float("-inf"))
    idx = list_to_device(list(rows), logits.device)
    logits[idx] = logits[idx].masked_fill(~allowed, float("-inf"))
    return logits


def filter_top_k_top_p(logits: torch.Tensor, top_k: Sequence[int], top_p: Sequence[float],
                       min_p: Sequence[float] | None = None) -> torch.Tensor:
    """Logits [B, V] with tokens outside each row's min-p / top-k / top-p set at -inf (0, 0 and 1 disable)."""
    B, V = logits.shape
    min_p = min_p or [0.0] * B
    if all(k == 0 or k >= V for k in top_k) and all(p >= 1.0 for p in top_p) and not any(min_p):
        return logits
    sorted_vals, order = logits.sort(dim=-1, descending=True)  # [B, V]
    if any(min_p):  # p_j >= min_p * p_max  <=>  logit_j >= logit_max + log(min_p)
        floor = sorted_vals[:, :1] + torch.log(_col([m if m > 0 else 0.0 for m in min_p], logits))
        sorted_vals = sorted_vals.masked_fill(sorted_vals < floor, float("-inf"))
    ks = list_to_device([k if 0 < k < V else V for k in top_k], logits.device)
    kth = sorted_vals.gather(1, (ks - 1).unsqueeze(1))  # [B, 1]
    sorted_vals = sorted_vals.masked_fill(sorted_vals < kth, float("-inf"))
    probs = sorted_vals.softmax(dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs  # probability of strictly better-ranked tokens
    # top_p 1 keeps everything (a float32 cumsum can pass 1.0 before the tail).
    drop = mass_before >= _col([p if p < 1.0 else math.inf for p in top_p], probs)
    drop[:, 0] = False
    sorted_vals = sorted_vals.masked_fill(drop, float("-inf"))
    return torch.full_like(logits, float("-inf")).scatter(1, order, sorted_vals)


@dataclass
class TokenLogprobs:
    """The sampled token's log-probability and the ``k`` most likely tokens' (ids and log-probabilities)."""

    logprob: float
    top: list[tuple[int, float]]


@dataclass
class PendingLogprobs:
    """The log-probabilities of a draw as tensors, on the device until ``to_host``: the sampled token's of each of
    ``rows`` (``chosen`` [R]) and the ``ns[r]`` most likely tokens' (``top_lp`` / ``top_ids`` [R, max n]), of a
    draw of ``width`` rows. ``lists`` reads them (after the device work and any queued copy: the caller's wait)."""

    width: int
    rows: list[int]
    ns: list[int]
    chosen: torch.Tensor
    top_lp: torch.Tensor
    top_ids: torch.Tensor

    def to_host(self) -> "PendingLogprobs":
        """Copies into pinned host memory queued behind the draw (no wait); on the CPU, itself."""
        if self.chosen.device.type != "cuda":
            return self
        return PendingLogprobs(self.width, self.rows, self.ns,
                               *(to_host_queued(t) for t in (self.chosen, self.top_lp, self.top_ids)))

    def lists(self) -> list[TokenLogprobs | None]:
        """Per row of the draw: None where the row asked for none."""
        result: list[TokenLogprobs | None] = [None] * self.width
        chosen, top_lp, top_ids = self.chosen.tolist(), self.top_lp.tolist(), self.top_ids.tolist()
        for r, (i, n) in enumerate(zip(self.rows, self.ns)):
            result[i] = TokenLogprobs(chosen[r], list(zip(top_ids[r][:n], top_lp[r][:n])))
        return result


@dataclass
class Draw:
    tokens: torch.Tensor  # int64 [B]
    pending: PendingLogprobs | None = None  # the log-probabilities asked for, not yet read; None: no row asked

    @property
    def logprobs(self) -> list[TokenLogprobs | None]:
        """Per row; None where the row's params ask for none. Reading them waits for the draw's device work."""
        return self.pending.lists() if self.pending is not None else [None] * self.tokens.shape[0]


def draw(logits: torch.Tensor, params: Sequence[SamplingParams], generators: Sequence[torch.Generator | None],
         histories: Sequence[TokenHistory | None] | None = None, banned: Sequence[Sequence[int]] | None = None,
         bitmask: tuple[torch.Tensor, Sequence[int]] | None = None) -> Draw:
    """Next token per row, and the log-probabilities asked for: logits [B, V] (float32) -> ``Draw``.

    ``generators[i]`` is row i's own generator (unused for greedy rows); ``histories[i]`` is needed only when row i
    has a penalty; ``banned[i]`` token ids row i may not draw (min_tokens); ``bitmask`` (packed mask, its rows) a
    grammar's allowed tokens. The caller appends the chosen tokens to the histories.
    """
    B, V = logits.shape
    if len(params) != B or len(generators) != B:
        raise ValueError(f"{B} rows of logits but {len(params)} params and {len(generators)} generators")
    given = logits.float()
    logits = apply_bias(apply_penalties(given, params, histories or [None] * B), params, banned)
    if bitmask is not None:  # (in place: on a copy, never on the caller's logits)
        logits = apply_bitmask(logits.clone() if logits is given else logits, *bitmask)
    rows = [i for i, p in enumerate(params) if not p.greedy]
    if not rows:
        out = logits.argmax(dim=-1)
        return Draw(out, _logprobs(logits, out, params))
    scaled = logits / _col([1.0 if p.greedy else p.temperature for p in params], logits)
    every = len(rows) == B  # every row samples (the common case): no gather, no scatter, no greedy argmax
    sel = None if every else list_to_device(rows, logits.device)
    kept = filter_top_k_top_p(scaled if every else scaled[sel], [params[i].top_k for i in rows],
                              [params[i].top_p for i in rows], [params[i].min_p for i in rows])
    noise = torch.stack([_exponential(V, generators[i], logits.device) for i in rows])
    drawn = (kept.softmax(dim=-1) / noise).argmax(dim=-1)
    if every:
        out = drawn
    else:
        out = logits.argmax(dim=-1)
        out[sel] = drawn
    return Draw(out, _logprobs(scaled, out, params))


def _logprobs(scaled: torch.Tensor, tokens: torch.Tensor, params: Sequence[SamplingParams]
              ) -> PendingLogprobs | None:
    """The rows' log-probabilities as device tensors (no host sync), or None where no row asks for any."""
    rows = [i for i, p in enumerate(params) if p.logprobs is not None]
    if not rows:
        return None
    sel = list_to_device(rows, scaled.device)
    lp = torch.log_softmax(scaled[sel], dim=-1)  # [R, V]
    chosen = lp.gather(1, tokens[sel].unsqueeze(1)).squeeze(1)
    ns = [params[i].logprobs for i in rows]
    top_lp, top_ids = (lp.topk(max(ns), dim=-1) if max(ns) else (lp[:, :0], lp[:, :0].long()))
    return PendingLogprobs(len(params), rows, ns, chosen, top_lp, top_ids)


def sample(logits: torch.Tensor, params: Sequence[SamplingParams], generators: Sequence[torch.Generator | None],
           histories: Sequence[TokenHistory | None] | None = None) -> torch.Tensor:
    """Next token per row: logits [B, V] (float32) -> int64 [B] on the same device (``draw`` without extras)."""
    return draw(logits, params, generators, histories).tokens


def _exponential(n: int, gen: torch.Generator | None, device: torch.device) -> torch.Tensor:
    if gen is None:
        raise ValueError("a sampled (temperature > 0) row needs a generator")
    return torch.empty(n, dtype=torch.float32, device=device).exponential_(generator=gen)


# --------------------------------------------------------------------------------------------------------------------
# Stop strings on streamed text


class StopStringMatcher:
    """Streams text while watching for stop strings; holds back a tail that could still start one.

    ``feed(delta) -> (text to emit, stopped)``; after a stop the emitted text ends just before the stop string
    (OpenAI semantics: the stop string is not returned), or just after it with ``include`` (vLLM's
    include_stop_str_in_output). ``flush()`` releases the held tail at the end.
    """

    def __init__(self, stops: Sequence[str], include: bool = False):
        self.stops = tuple(stops)
        self.include = include
        self.held = ""
        self.stopped = False

    def feed(self, delta: str) -> tuple[str, bool]:
        if self.stopped:
            return "", True
        if not self.stops:
            return delta, False
        text = self.held + delta
        hits = [(i, i + len(s)) for i, s in ((text.find(s), s) for s in self.stops) if i >= 0]
        if hits:
            self.held, self.stopped = "", True
            start, end = min(hits)
            return text[: end if self.include else start], True
        keep = self._partial_suffix(text)
        self.held = text[len(text) - keep:] if keep else ""
        return text[: len(text) - keep], False

    def _partial_suffix(self, text: str) -> int:
        """Length of the longest tail of ``text`` that is a proper prefix of some stop string."""
        best = 0
        for s in self.stops:
            for n in range(min(len(s) - 1, len(text)), best, -1):
                if s.startswith(text[-n:]):
                    best = n
                    break
        return best

    def flush(self) -> str:
        out, self.held = ("" if self.stopped else self.held), ""
        return out
