"""POST /v1/completions: raw prompts (a string, token ids, or a list of either: one prompt each) -> text, no chat
template and no reasoning split. Choice index = prompt index x n + choice; ``echo`` puts the prompt's text in front
of each choice's text; ``logprobs: k`` gives each generated token's log-probability and the k most likely."""

from __future__ import annotations

from typing import Any, AsyncIterator

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.background import BackgroundTask

from ..engine.output import OutputStream
from ..engine.processor import PromptInputs
from ..engine.prompt_size import PromptTooLongError
from . import limits
from .errors import APIError
from .generation import EngineFailure, Generation, Result, collect_all, merged
from .logprobs import TokenText, completion_logprobs
from .params import sampling_params
from .protocol import Completion, CompletionChoice, CompletionRequest, Usage, completion_id, now, sse
from .service import checked_prompt, engine_failure_event, start, until_done_or_gone
from .structured import grammar_spec, output_format


def _prompts(req: CompletionRequest, processor: Any, vocab_size: int, budget: int) -> list[list[int]]:
    """The request's prompts as token ids; vision placeholders are refused (this route takes no images). In the
    preprocessing pool; a text longer than any prompt of ``budget`` tokens is refused before it is tokenised."""
    p = req.prompt
    if isinstance(p, str) or (p and isinstance(p[0], int)):
        p = [p]
    if not p:
        raise APIError(400, "prompt: expected a non-empty string or list of token ids", param="prompt",
                       code="invalid_value")
    reserved = {processor.image_token_id, processor.video_token_id}
    out = []
    for i, one in enumerate(p):
        where = "prompt" if len(p) == 1 else f"prompt[{i}]"
        if isinstance(one, str):
            processor.size.check_text([(where, one)], budget)
        ids = processor.encode(one) if isinstance(one, str) else list(one)
        if not ids:
            raise APIError(400, f"{where}: empty", param="prompt", code="invalid_value")
        bad = [t for t in ids if not 0 <= t < vocab_size or t in reserved]
        if bad:
            raise APIError(400, f"{where}: token id {bad[0]} is out of range or an image/video placeholder",
                           param="prompt", code="invalid_value")
        out.append(ids)
    return out


async def completion(request: Request, req: CompletionRequest, state: Any, t_arrival: float) -> Response:
    try:
        prompts = await state.admission.run(request.state.deadline, _prompts, req, state.processor,
                                            state.vocab_size, limits.prompt_budget(req.max_new_tokens, state.max_len))
    except PromptTooLongError as e:
        raise limits.prompt_too_long(e, req.max_new_tokens, req.max_tokens_param, state.max_len) from None
    fmt, field = output_format(req)
    spec = grammar_spec(fmt, field)
    gens: list[Generation] = []
    try:
        for i, ids in enumerate(prompts):
            prompt = checked_prompt(PromptInputs(ids, [0] * len(ids)), state.max_len, "prompt")
            params = sampling_params(req, state, len(ids), req.logprobs, spec)

            def text(p) -> OutputStream:
                return OutputStream(state.processor, None, False, p.stop, bool(req.include_stop_str_in_output),
                                    req.skip_special)

            gens += start(state, prompt, params, t_arrival, text, first_index=i * req.choices, request=request,
                          param="prompt")
    except BaseException:
        for g in gens:  # a later prompt refused: the earlier ones' sequences go too
            g.close()
        raise
    echoes = [state.processor.decode(ids, req.skip_special) if req.echo else "" for ids in prompts]
    cid, created = completion_id("cmpl"), now()
    if req.stream:
        return StreamingResponse(_sse(request, gens, req, state, cid, created, echoes),
                                 media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
                                 background=BackgroundTask(lambda: [g.close() for g in gens]))
    results = await until_done_or_gone(request, collect_all(gens), state)
    if results is None:
        return Response(status_code=499)
    texts = TokenText(state.processor.tokenizer) if req.logprobs is not None else None
    choices = [_choice(g.index, r, echoes[g.index // req.choices], texts) for g, r in zip(gens, results)]
    body = Completion(id=cid, created=created, model=state.settings.model_name, choices=choices,
                      usage=_usage(gens))
    return JSONResponse(body.model_dump())


def _usage(gens: list[Generation]) -> Usage:
    counted = [g for g in gens if g.count_prompt]
    return Usage.of(sum(g.prompt_tokens for g in counted), sum(g.completion_tokens for g in gens),
                    sum(g.cached_tokens for g in counted))


def _choice(index: int, r: Result, echo: str, texts: TokenText | None) -> CompletionChoice:
    lp = completion_logprobs(r.logprobs, texts, len(echo)) if texts is not None else None
    return CompletionChoice(index=index, text=echo + r.content, logprobs=lp, finish_reason=r.finish_reason)


async def _sse(request: Request, gens: list[Generation], req: CompletionRequest, state: Any, cid: str, created: int,
               echoes: list[str]) -> AsyncIterator[str]:
    texts = TokenText(state.processor.tokenizer) if req.logprobs is not None else None
    offsets = [len(echoes[g.index // req.choices]) for g in gens]  # text already sent, per choice

    def chunk(choices: list[CompletionChoice], usage: Usage | None = None) -> str:
        return sse(Completion(id=cid, created=created, model=state.settings.model_name, choices=choices,
                              usage=usage), req.include_usage)

    try:
        for g in gens:
            if echoes[g.index // req.choices]:
                yield chunk([CompletionChoice(index=g.index, text=echoes[g.index // req.choices], finish_reason=None)])
        async for u in merged(gens):
            k = next(j for j, g in enumerate(gens) if g.index == u.index)
            lp = completion_logprobs(u.logprobs, texts, offsets[k]) if texts is not None else None
            offsets[k] += len(u.content)
            yield chunk([CompletionChoice(index=u.index, text=u.content, logprobs=lp,
                                          finish_reason=u.finish_reason)])
        if req.include_usage:
            yield chunk([], _usage(gens))
    except EngineFailure as e:
        yield engine_failure_event(e, request)
    finally:
        for g in gens:
            g.close()
    yield "data: [DONE]\n\n"
