"""POST /v1/chat/completions: messages -> the checkpoint's chat template (tools included) -> n choices, each with
its reasoning, content, tool calls and log-probabilities; plain JSON or server-sent events."""

from __future__ import annotations

from typing import Any, AsyncIterator

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.background import BackgroundTask

from ..engine.output import OutputStream
from ..engine.prompt_size import PromptTooLongError
from ..engine.reasoning import ThinkTokens
from . import limits
from .errors import APIError
from .generation import EngineFailure, Generation, Result, Update, collect_all, merged
from .logprobs import TokenText, chat_logprobs
from .params import sampling_params
from .protocol import (ChatCompletion, ChatCompletionChunk, ChatCompletionRequest, ChatMessage, Choice, ChunkChoice,
                       Delta, Usage, completion_id, now, sse)
from .service import checked_prompt, engine_failure_event, start, until_done_or_gone
from .structured import grammar_spec, output_format
from .tools import delta_calls, plan_tools


def _prepare(state: Any, req: ChatCompletionRequest):
    """In the preprocessing pool: the grammar (checked) and the prompt, refused before the work where it cannot
    leave room for the max_tokens asked for (limits.prompt_budget)."""
    plan = plan_tools(req)
    fmt, field = output_format(req)
    if plan.grammar is not None and fmt is not None:
        raise APIError(400, f"{field}: cannot be combined with tool_choice {req.tool_choice!r} (both would decide "
                            "the whole output)", param=field, code="invalid_value")
    spec = grammar_spec(plan.grammar, "tools") if plan.grammar is not None else grammar_spec(fmt, field)
    budget = limits.prompt_budget(req.max_new_tokens, state.max_len)
    try:
        inputs = state.processor.build_inputs(req.messages, plan.template_tools, req.chat_template_kwargs, budget)
    except PromptTooLongError as e:
        raise limits.prompt_too_long(e, req.max_new_tokens, req.max_tokens_param, state.max_len) from None
    return plan, spec, inputs


async def chat_completion(request: Request, req: ChatCompletionRequest, state: Any, t_arrival: float) -> Response:
    if req.top_logprobs is not None and not req.logprobs:
        raise APIError(400, "top_logprobs: needs logprobs true", param="top_logprobs", code="invalid_value")
    plan, spec, inputs = await state.admission.run(request.state.deadline, _prepare, state, req)
    prompt = checked_prompt(inputs, state.max_len)
    think = ThinkTokens.of(state.processor.tokenizer)
    opened = think is not None and think.opened_by(prompt.input_ids)
    params = sampling_params(req, state, len(prompt.input_ids), req.top_logprobs_count, spec,
                             think.end if opened else None)

    def text(p) -> OutputStream:
        return OutputStream(state.processor, think, opened, p.stop, bool(req.include_stop_str_in_output),
                            req.skip_special)

    gens = start(state, prompt, params, t_arrival, text, tools=plan.parse, request=request)
    cid, created = completion_id(), now()
    if req.stream:
        # The background close is a safety net for a client gone before the stream's first chunk (then the
        # generator never starts, and its own ``finally`` cannot abort the request).
        return StreamingResponse(_sse(request, gens, req, state, cid, created), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
                                 background=BackgroundTask(_close, gens))
    results = await until_done_or_gone(request, collect_all(gens), state)
    if results is None:
        return Response(status_code=499)  # nobody reads it; nginx's "client closed request"
    texts = TokenText(state.processor.tokenizer) if req.logprobs else None
    body = ChatCompletion(id=cid, created=created, model=state.settings.model_name,
                          choices=[_choice(i, r, texts, opened) for i, r in enumerate(results)],
                          usage=_usage(gens))
    return JSONResponse(body.model_dump())


def _close(gens: list[Generation]) -> None:
    for g in gens:
        g.close()


def _usage(gens: list[Generation]) -> Usage:
    return Usage.of(gens[0].prompt_tokens, sum(g.completion_tokens for g in gens), gens[0].cached_tokens)


def _choice(index: int, r: Result, texts: TokenText | None, reasoning_split: bool) -> Choice:
    reasoning = (r.reasoning or None) if reasoning_split else None
    msg = ChatMessage(content=None if (r.calls and not r.content) else r.content, reasoning_content=reasoning,
                      reasoning=reasoning, tool_calls=r.calls or None)
    return Choice(index=index, message=msg, finish_reason=r.finish_reason,
                  logprobs=chat_logprobs(r.logprobs, texts) if texts is not None else None)


async def _sse(request: Request, gens: list[Generation], req: ChatCompletionRequest, state: Any, cid: str,
               created: int) -> AsyncIterator[str]:
    """OpenAI chunks: a role chunk per choice, delta chunks, a finish chunk per choice, [usage chunk], then
    ``data: [DONE]``."""
    usage_field = req.include_usage
    continuous = bool(req.stream_options and req.stream_options.continuous_usage_stats)
    texts = TokenText(state.processor.tokenizer) if req.logprobs else None
    calls_seen = [0] * len(gens)

    def chunk(choices: list[ChunkChoice], usage: Usage | None = None) -> str:
        c = ChatCompletionChunk(id=cid, created=created, model=state.settings.model_name, choices=choices,
                                usage=usage if usage is not None or not continuous else _usage(gens))
        return sse(c, usage_field)

    try:
        for g in gens:
            yield chunk([ChunkChoice(index=g.index, delta=Delta(role="assistant", content=""))])
        async for u in merged(gens):
            for c in _chunk_choices(u, texts, calls_seen):
                yield chunk([c])
        if usage_field:
            yield chunk([], _usage(gens))
    except EngineFailure as e:
        yield engine_failure_event(e, request)
    finally:
        _close(gens)  # client gone mid-stream: free the KV blocks now rather than when the generator is collected
    yield "data: [DONE]\n\n"


def _chunk_choices(u: Update, texts: TokenText | None, calls_seen: list[int]) -> list[ChunkChoice]:
    """An update as stream chunks: text (and log-probabilities), each tool call in its pieces, the finish."""
    out = []
    if u.reasoning or u.content or u.logprobs:
        out.append(ChunkChoice(index=u.index,
                               delta=Delta(reasoning_content=u.reasoning or None, reasoning=u.reasoning or None,
                                           content=u.content or None),
                               logprobs=chat_logprobs(u.logprobs, texts) if texts and u.logprobs else None))
    for piece in delta_calls(u.calls, calls_seen[u.index]):
        out.append(ChunkChoice(index=u.index, delta=Delta(tool_calls=piece)))
    calls_seen[u.index] += len(u.calls)
    if u.finish_reason is not None:
        out.append(ChunkChoice(index=u.index, finish_reason=u.finish_reason))
    return out
