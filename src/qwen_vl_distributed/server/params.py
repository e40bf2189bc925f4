"""A request's sampling fields -> one ``SamplingParams`` per choice, every value checked and every error naming the
field the client sent (not the engine's name for it)."""

from __future__ import annotations

import dataclasses
from typing import Any

from ..engine.sampling import SamplingParamError, SamplingParams
from .errors import APIError
from .protocol import CommonRequest

MAX_N = 64  # choices per request; each is a sequence of its own (sharing the prompt's KV blocks)


def _bad(param: str, message: str, code: str = "invalid_value") -> APIError:
    return APIError(400, f"{param}: {message}", param=param, code=code)


def max_new_tokens(req: CommonRequest, prompt_len: int, max_len: int) -> int:
    """max_tokens absent: the rest of the context. A request that cannot fit the context is refused (vLLM's
    behaviour), never silently shortened."""
    asked, param = req.max_new_tokens, req.max_tokens_param
    room = max_len - prompt_len
    if asked is None:
        return room
    if isinstance(asked, int) and asked > room:
        raise _bad(param, f"{asked} tokens asked for, but the prompt is {prompt_len} tokens and this server's "
                          f"context is {max_len} tokens: at most {room}", "context_length_exceeded")
    return asked


def logit_bias(req: CommonRequest, vocab_size: int) -> dict[int, float] | None:
    if req.logit_bias is None:
        return None
    out = {}
    for key, bias in req.logit_bias.items():
        if not key.strip().lstrip("-").isdigit() or not 0 <= int(key) < vocab_size:
            raise _bad("logit_bias", f"{key!r} is not a token id of this model (0 to {vocab_size - 1})")
        out[int(key)] = bias
    return out


def sampling_params(req: CommonRequest, state: Any, prompt_len: int, logprobs: int | None,
                    grammar: str | None = None, grammar_after: int | None = None) -> list[SamplingParams]:
    """One SamplingParams per choice; with a seed, choice i draws with seed + i (so choices differ but repeat)."""
    most = min(MAX_N, state.engine.capacity)  # more could never be admitted together
    if not 1 <= req.choices <= most:
        raise _bad("n", f"must be between 1 and {most} on this server, got {req.choices}")
    defaults, max_len = state.settings.generation_config, state.max_len
    if grammar is not None and (req.ignore_eos or req.min_tokens):
        name = "ignore_eos" if req.ignore_eos else "min_tokens"
        raise _bad(name, "cannot be combined with structured output or forced tool calls (the grammar decides "
                         "where the output ends)")
    try:
        base = SamplingParams.from_generation_config(
            defaults, temperature=req.temperature, top_p=req.top_p, top_k=req.top_k, seed=req.seed,
            max_new_tokens=max_new_tokens(req, prompt_len, max_len), stop=req.stop,
            stop_token_ids=req.stop_token_ids, presence_penalty=req.presence_penalty,
            frequency_penalty=req.frequency_penalty, repetition_penalty=req.repetition_penalty, min_p=req.min_p,
            logit_bias=logit_bias(req, state.vocab_size), logprobs=logprobs, min_tokens=req.min_tokens,
            ignore_eos=req.ignore_eos, grammar=grammar, grammar_after=grammar_after)
    except SamplingParamError as e:
        raise _renamed(e, req) from None
    if base.seed is None or req.choices == 1:
        return [base] * req.choices
    return [dataclasses.replace(base, seed=(base.seed + i) % 2**63) for i in range(req.choices)]


def _renamed(e: SamplingParamError, req: CommonRequest) -> APIError:
    """The engine's parameter names, as the client spelled them."""
    msg = str(e)
    renames = {"max_new_tokens": req.max_tokens_param,
               "logprobs": "top_logprobs" if hasattr(req, "top_logprobs") else "logprobs"}
    for engine_name, wire_name in renames.items():
        if msg.startswith(engine_name):
            msg = wire_name + msg[len(engine_name):]
    name = msg.split(":")[0].split("[")[0]
    return APIError(400, msg, param=name, code="invalid_value")
