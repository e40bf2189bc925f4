"""The OpenAI-compatible HTTP API in front of an engine.

``create_app(engine, processor, settings)`` takes an engine and processor that are already built (one process with
S = 1, or stage 0's driver of a pipeline): the server does not care how the model is split. Routes:

  POST /v1/chat/completions   chat completions, plain JSON or server-sent events (stream=true)
  GET  /v1/models             the one served model
  GET  /health                200 while the engine thread serves, else 503
  GET  /metrics               Prometheus text format

/v1 routes need ``Authorization: Bearer <key>`` when an API key is set; /health and /metrics do not (they reveal no
request content and are what probes and scrapers call).
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, AsyncIterator

from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from pydantic import ValidationError
from starlette.background import BackgroundTask

from ..engine.async_engine import AsyncEngine, EngineDeadError, QueueFullError
from ..engine.engine import Engine, Prompt
from ..engine.sampling import SamplingParamError, SamplingParams
from ..engine.session import TextStream, to_prompt
from .errors import APIError, from_validation_error, install_handlers
from .generation import EngineFailure, Generation
from .metrics import Metrics, StatusRecorder
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
    max_body_bytes: int = 256 * 2**20  # larger requests get 413 before they are read in full


class ServerState:
    """What the routes share: the engine thread, the processor and its worker, settings and metrics."""

    def __init__(self, engine: Engine, processor: Any, settings: ServerSettings):
        self.engine = AsyncEngine(engine, settings.max_queue)
        self.processor = processor
        self.settings = settings
        self.metrics = Metrics()
        self.max_len = engine.max_len
        self.created = now()
        # One worker: image / video preprocessing is CPU-heavy and must not stall the event loop, and a single
        # thread keeps the (shared) tokenizer out of concurrent use.
        self.prep: ThreadPoolExecutor | None = None

    def start(self) -> None:
        self.prep = ThreadPoolExecutor(max_workers=1, thread_name_prefix="preprocess")
        self.engine.start()

    def stop(self) -> None:
        self.engine.shutdown()
        if self.prep is not None:
            self.prep.shutdown(wait=False, cancel_futures=True)


def create_app(engine: Engine, processor: Any, settings: ServerSettings) -> FastAPI:
    state = ServerState(engine, processor, settings)

    @asynccontextmanager
    async def lifespan(_: FastAPI):
        state.start()
        try:
            yield
        finally:
            state.stop()

    app = FastAPI(title="qwen-vl-distributed", lifespan=lifespan)
    app.state.server = state
    install_handlers(app)
    app.add_middleware(StatusRecorder, metrics=state.metrics)
    _routes(app, state)
    return app


def _routes(app: FastAPI, state: ServerState) -> None:
    auth = Depends(_api_key_check(state.settings.api_key))

    @app.get("/health")
    async def health() -> JSONResponse:
        if state.engine.alive:
            return JSONResponse({"status": "ok"})
        raise APIError(503, state.engine.error or "the engine is not running", "server_error", None,
                       "engine_stopped")

    @app.get("/metrics")
    async def metrics() -> PlainTextResponse:
        return PlainTextResponse(state.metrics.render(state.engine.stats()), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models", dependencies=[auth])
    async def models() -> dict:
        card = ModelCard(id=state.settings.model_name, created=state.created, max_model_len=state.max_len)
        return ModelList(data=[card]).model_dump()

    @app.post("/v1/chat/completions", dependencies=[auth])
    async def chat_completions(request: Request) -> Response:
        t_arrival = time.perf_counter()
        req = await _parse(request, state.settings.max_body_bytes)
        _check_request(req, state)
        params = _sampling_params(req, state.settings.generation_config)
        inputs = await asyncio.get_running_loop().run_in_executor(state.prep, state.processor.build_inputs,
                                                                  req.messages)
        prompt = _prompt(inputs, state.max_len)
        gen = _start(state, prompt, params, t_arrival)
        cid, created = completion_id(), now()
        if req.stream:
            # The background close is a safety net for a client gone before the stream's first chunk (then the
            # generator never starts, and its own ``finally`` cannot abort the request).
            return StreamingResponse(_sse(gen, req, state, cid, created), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
                                     background=BackgroundTask(gen.close))
        return await _complete(request, gen, state, cid, created)


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


async def _read_body(request: Request, limit: int) -> bytes:
    """The body, refused with 413 as soon as it passes ``limit`` bytes (never held whole in memory first)."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise APIError(413, f"the request body is {declared} bytes; the limit is {limit}", code="body_too_large")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise APIError(413, f"the request body passes the limit of {limit} bytes", code="body_too_large")
        chunks.append(chunk)
    return b"".join(chunks)


async def _parse(request: Request, max_body_bytes: int) -> ChatCompletionRequest:
    body = await _read_body(request, max_body_bytes)
    try:
        data = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise APIError(400, f"the request body is not valid JSON ({e})", code="invalid_json") from None
    if not isinstance(data, dict):
        raise APIError(400, "the request body must be a JSON object", code="invalid_json")
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
        name = "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens"
        raise APIError(400, name + str(e)[len("max_new_tokens"):], param=name, code="invalid_value") from None


def _prompt(inputs: Any, max_len: int) -> Prompt:
    n = len(inputs.input_ids)
    if n >= max_len:  # at least one token must fit after the prompt
        raise APIError(400, f"messages: the prompt is {n} tokens; this server's context is {max_len} tokens "
                            f"(prompt plus output)", param="messages", code="context_length_exceeded")
    return to_prompt(inputs)


def _start(state: ServerState, prompt: Prompt, params: SamplingParams, t_arrival: float) -> Generation:
    try:
        handle = state.engine.submit(prompt, params)
    except QueueFullError as e:
        raise APIError(503, f"the server is busy ({e}); retry later", "server_error", None, "queue_full",
                       {"Retry-After": str(state.settings.retry_after_s)}) from None
    except EngineDeadError as e:
        raise APIError(503, f"the engine is not running: {e}", "server_error", None, "engine_stopped") from None
    text = TextStream(state.processor, params.stop)
    return Generation(state.engine, handle, text, len(prompt.input_ids), t_arrival, state.metrics)


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
        raise APIError(500, str(e), "server_error", None, "engine_failure") from None
    msg = ChatMessage(content=content, reasoning_content=reasoning or None)
    body = ChatCompletion(id=cid, created=created, model=state.settings.model_name,
                          choices=[Choice(message=msg, finish_reason=gen.finish_reason)],
                          usage=Usage.of(gen.prompt_tokens, gen.completion_tokens, gen.cached_tokens))
    return JSONResponse(body.model_dump())


async def _disconnected(request: Request) -> None:
    """Returns when the client disconnects (the body has been read, so the next message is the disconnect)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _sse(gen: Generation, req: ChatCompletionRequest, state: ServerState, cid: str,
               created: int) -> AsyncIterator[str]:
    """OpenAI chunks: a role chunk, delta chunks, a finish chunk, [usage chunk], then ``data: [DONE]``."""
    usage_field = req.include_usage

    def chunk(choices: list[ChunkChoice], usage: Usage | None = None) -> str:
        c = ChatCompletionChunk(id=cid, created=created, model=state.settings.model_name, choices=choices,
                                usage=usage)
        return c.sse(usage_field)

    try:
        yield chunk([ChunkChoice(delta=Delta(role="assistant", content=""))])
        async for r, c in gen.pieces():
            yield chunk([ChunkChoice(delta=Delta(reasoning_content=r or None, content=c or None))])
        yield chunk([ChunkChoice(finish_reason=gen.finish_reason)])
        if usage_field:
            yield chunk([], Usage.of(gen.prompt_tokens, gen.completion_tokens, gen.cached_tokens))
    except EngineFailure as e:
        # Headers are gone already: report in-band, the way OpenAI streams report errors.
        yield f"data: {json.dumps(APIError(500, str(e), 'server_error', None, 'engine_failure').body())}\n\n"
    finally:
        gen.close()  # client gone mid-stream: free the slot now rather than when the generator is collected
    yield "data: [DONE]\n\n"
