"""The OpenAI-compatible HTTP API in front of an engine.

``create_app(engine, processor, settings)`` takes an engine and processor that are already built (one process with
S = 1, or stage 0's driver of a pipeline): the server does not care how the model is split. Routes:

  POST /v1/chat/completions   chat completions, plain JSON or server-sent events (stream=true)
  GET  /v1/models             the one served model
  GET  /health                200 while the engine thread serves, else 503
  GET  /metrics               Prometheus text format

/v1 routes need ``Authorization: Bearer <key>`` when an API key is set; /health and /metrics do not (they reveal no
request content and are what probes and scrapers call). With a key, /openapi.json needs it too and /docs is off.

Limits and the order of checks: ``limits.py``; admission, the preprocessing pool, draining and ending:
``lifecycle.py``; request ids and what an error may tell a client: ``middleware.py``, ``errors.py``.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, AsyncIterator

from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from pydantic import ValidationError
from starlette.background import BackgroundTask

from ..engine.async_engine import AsyncEngine, EngineDeadError, QueueFullError
from ..engine.engine import Engine
from ..engine.prompt_size import PromptTooLongError
from ..engine.sampling import SamplingParamError, SamplingParams
from ..engine.session import to_prompt
from ..engine.threads import preprocess_workers
from . import limits
from .errors import APIError, ended_error, from_validation_error, install_handlers
from .generation import EngineFailure, Generation, TextStream
from .lifecycle import Admission
from .metrics import Metrics, StatusRecorder
from .middleware import RequestIds, request_id
from .protocol import (ChatCompletion, ChatCompletionChunk, ChatCompletionRequest, ChatMessage, Choice, ChunkChoice,
                       Delta, ModelCard, ModelList, Usage, completion_id, now)

log = logging.getLogger(__name__)


@dataclass
class ServerSettings:
    model_name: str
    api_key: str | None = None
    max_queue: int = 64  # requests waiting for a KV slot beyond those running; more get 503
    retry_after_s: int = 1
    # Request defaults from the checkpoint's generation_config.json (temperature, top_p, top_k, ...).
    generation_config: dict[str, Any] = field(default_factory=dict)
    # larger requests get 413 before they are read in full; None: limits.body_limit of the processor's media limit
    # (limits.MEDIA_BYTES_UNLIMITED without one) and the context
    max_body_bytes: int | None = None
    request_timeout_s: float | None = None  # each request's deadline, unless it asks for a shorter one


class ServerState:
    """What the routes share: the engine thread, the processor, admission and its pool, settings and metrics."""

    def __init__(self, engine: Engine, processor: Any, settings: ServerSettings):
        self.engine = AsyncEngine(engine, settings.max_queue)
        self.processor = processor
        self.settings = settings
        self.metrics = Metrics()
        self.max_len = engine.max_len
        media = processor.media.max_media_bytes
        self.max_body_bytes = settings.max_body_bytes or limits.body_limit(
            limits.MEDIA_BYTES_UNLIMITED if media is None else media, engine.max_len)
        self.created = now()
        self.admission = Admission(self.engine, preprocess_workers(), settings.retry_after_s)

    def start(self) -> None:
        self.engine.start()

    def stop(self) -> None:
        self.engine.shutdown()
        self.admission.shutdown()


def create_app(engine: Engine, processor: Any, settings: ServerSettings) -> FastAPI:
    state = ServerState(engine, processor, settings)

    @asynccontextmanager
    async def lifespan(_: FastAPI):
        state.start()
        try:
            yield
        finally:
            state.stop()

    open_docs = settings.api_key is None  # with a key, the schema needs it too (a route below) and /docs is off
    app = FastAPI(title="qwen-vl-distributed", lifespan=lifespan, openapi_url="/openapi.json" if open_docs else None,
                  docs_url="/docs" if open_docs else None, redoc_url="/redoc" if open_docs else None)
    app.state.server = state
    install_handlers(app)
    app.add_middleware(StatusRecorder, metrics=state.metrics)
    app.add_middleware(RequestIds)
    _routes(app, state)
    return app


def _routes(app: FastAPI, state: ServerState) -> None:
    auth = Depends(_api_key_check(state.settings.api_key))

    @app.get("/health")
    async def health() -> JSONResponse:
        if state.engine.alive:
            return JSONResponse({"status": "ok"})
        # (why it stopped, which names hosts and processes, is in the server log, not here: no key guards /health)
        raise APIError(503, "the engine is not running", "server_error", None, "engine_stopped")

    if state.settings.api_key is not None:
        @app.get("/openapi.json", dependencies=[auth], include_in_schema=False)
        async def openapi() -> dict:
            return app.openapi()

    @app.get("/metrics")
    async def metrics() -> PlainTextResponse:
        return PlainTextResponse(state.metrics.render(state.engine.stats(), state.admission.preparing),
                                 media_type="text/plain; version=0.0.4")

    @app.get("/v1/models", dependencies=[auth])
    async def models() -> dict:
        card = ModelCard(id=state.settings.model_name, created=state.created, max_model_len=state.max_len)
        return ModelList(data=[card]).model_dump()

    @app.post("/v1/chat/completions", dependencies=[auth])
    async def chat_completions(request: Request) -> Response:
        t_arrival = time.perf_counter()
        deadline = limits.request_deadline(request, state.settings.request_timeout_s)
        # a place first (a full server reads no body), held from the body's reading to the engine's queue
        with state.admission.place():
            req = await _parse(request, state.max_body_bytes, deadline)
            _check_request(req, state)
            params = _sampling_params(req, state.settings.generation_config)
            inputs = await _preprocess(state, req, deadline)
            gen = _start(state, to_prompt(inputs), params, t_arrival, deadline)
        cid, created = completion_id(), now()
        if req.stream:
            # The background close is a safety net for a client gone before the stream's first chunk (then the
            # generator never starts, and its own ``finally`` cannot abort the request).
            return StreamingResponse(_sse(request, gen, req, state, cid, created), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
                                     background=BackgroundTask(gen.close))
        return await _complete(request, gen, state, cid, created)


async def _preprocess(state: ServerState, req: ChatCompletionRequest, deadline: float | None) -> Any:
    """The processor's work in the pool, with the prompt's budget: room for the max_tokens asked for."""
    name, max_tokens = _max_tokens_field(req)
    try:
        return await state.admission.run(deadline, state.processor.build_inputs, req.messages,
                                         limits.prompt_budget(max_tokens, state.max_len))
    except PromptTooLongError as e:
        raise limits.prompt_too_long(e, max_tokens, name, state.max_len) from None


def _max_tokens_field(req: ChatCompletionRequest) -> tuple[str, int | None]:
    """The output limit the client sent and the name it sent it by (max_completion_tokens wins)."""
    name = "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens"
    return name, req.max_new_tokens


def _api_key_check(key: str | None):
    async def check(request: Request) -> None:
        if key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), key.encode()):
            raise APIError(401, "missing or incorrect API key (send 'Authorization: Bearer <key>')",
                           code="invalid_api_key")
    return check


# -- request -> prompt and sampling parameters -----------------------------------------------------------------------


async def _parse(request: Request, max_body_bytes: int, deadline: float | None) -> ChatCompletionRequest:
    data = limits.parse_json(await limits.read_body(request, max_body_bytes, deadline))
    try:
        return ChatCompletionRequest.model_validate(data)
    except ValidationError as e:
        raise from_validation_error(e) from None


def _check_request(req: ChatCompletionRequest, state: ServerState) -> None:
    if req.model != state.settings.model_name:
        raise APIError(404, f"the model {req.model!r} does not exist; this server serves "
                            f"{state.settings.model_name!r}", param="model", code="model_not_found")
    if req.n not in (None, 1):
        raise APIError(400, f"n: only 1 choice per request is supported, got {req.n}", param="n",
                       code="invalid_value")
    if req.logprobs:
        raise APIError(400, "logprobs: not supported", param="logprobs", code="invalid_value")
    limits.check_max_tokens(req.max_new_tokens, _max_tokens_field(req)[0], state.max_len)
    limits.check_stop(req.stop)


def _sampling_params(req: ChatCompletionRequest, defaults: dict[str, Any]) -> SamplingParams:
    try:
        return SamplingParams.from_generation_config(
            defaults, temperature=req.temperature, top_p=req.top_p, top_k=req.top_k, seed=req.seed,
            max_new_tokens=req.max_new_tokens, stop=req.stop, stop_token_ids=req.stop_token_ids,
            presence_penalty=req.presence_penalty, frequency_penalty=req.frequency_penalty,
            repetition_penalty=req.repetition_penalty)
    except SamplingParamError as e:
        if not str(e).startswith("max_new_tokens"):
            raise
        # The engine's name for it is not the one the client sent.
        name = _max_tokens_field(req)[0]
        raise APIError(400, name + str(e)[len("max_new_tokens"):], param=name, code="invalid_value") from None


def _start(state: ServerState, prompt: Any, params: SamplingParams, t_arrival: float,
           deadline: float | None) -> Generation:
    try:
        handle = state.engine.submit(prompt, params)
    except QueueFullError as e:
        raise APIError(503, f"the server is busy ({e}); retry later", "server_error", None, "queue_full",
                       {"Retry-After": str(state.settings.retry_after_s)}) from None
    except EngineDeadError as e:
        raise APIError(503, f"the engine is not running: {e}", "server_error", None, "engine_stopped") from None
    text = TextStream(state.processor, params.stop)
    return Generation(state.engine, handle, text, len(prompt.input_ids), t_arrival, state.metrics, deadline)


# -- responses ------------------------------------------------------------------------------------------------------


async def _complete(request: Request, gen: Generation, state: ServerState, cid: str, created: int) -> Response:
    """Run to the end, unless the client hangs up first: then abort at once (its slot is freed)."""
    work = asyncio.ensure_future(gen.collect())
    gone = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({work, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
        if not work.done():
            work.cancel()  # gen.pieces() aborts the request on its way out
    if not work.done() or work.cancelled():
        return Response(status_code=499)  # nobody reads it; nginx's "client closed request"
    try:
        reasoning, content = work.result()
    except EngineFailure as e:
        raise ended_error(e, request_id(request), state.settings.retry_after_s) from None
    msg = ChatMessage(content=content, reasoning_content=reasoning or None)
    body = ChatCompletion(id=cid, created=created, model=state.settings.model_name,
                          choices=[Choice(message=msg, finish_reason=gen.finish_reason)],
                          usage=Usage.of(gen.prompt_tokens, gen.completion_tokens, gen.cached_tokens))
    return JSONResponse(body.model_dump())


async def _disconnected(request: Request) -> None:
    """Returns when the client disconnects (the body has been read, so the next message is the disconnect)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _sse(request: Request, gen: Generation, req: ChatCompletionRequest, state: ServerState, cid: str,
               created: int) -> AsyncIterator[str]:
    """OpenAI chunks: a role chunk, delta chunks, a finish chunk, [usage chunk], then ``data: [DONE]``."""
    usage_field = req.include_usage

    def chunk(choices: list[ChunkChoice], usage: Usage | None = None) -> str:
        c = ChatCompletionChunk(id=cid, created=created, model=state.settings.model_name, choices=choices,
                                usage=usage)
        return c.sse(usage_field)

    rid = request_id(request)
    try:
        yield chunk([ChunkChoice(delta=Delta(role="assistant", content=""))])
        async for r, c in gen.pieces():
            yield chunk([ChunkChoice(delta=Delta(reasoning_content=r or None, content=c or None))])
        yield chunk([ChunkChoice(finish_reason=gen.finish_reason)])
        if usage_field:
            yield chunk([], Usage.of(gen.prompt_tokens, gen.completion_tokens, gen.cached_tokens))
    except EngineFailure as e:
        # Headers are gone already: report in-band, the way OpenAI streams report errors.
        yield f"data: {json.dumps(ended_error(e, rid).body())}\n\n"
    finally:
        gen.close()  # client gone mid-stream: free the slot now rather than when the generator is collected
    yield "data: [DONE]\n\n"
