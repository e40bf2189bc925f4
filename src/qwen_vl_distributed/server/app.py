"""The OpenAI-compatible HTTP API in front of an engine.

``create_app(engine, processor, settings)`` takes an engine and processor that are already built (one process with
S = 1, or stage 0's driver of a pipeline): the server does not care how the model is split. Routes:

  POST /v1/chat/completions   chat completions, plain JSON or server-sent events (stream=true) (server/chat.py)
  POST /v1/completions        completions of raw prompts (server/completions.py)
  POST /tokenize, /detokenize vLLM's token routes (server/tokenize.py)
  GET  /v1/models[/{id}]      the one served model
  GET|HEAD /health            200 while the engine thread serves, else 503
  GET  /metrics               Prometheus text format, vLLM's metric names (server/metrics.py)

/v1 routes and the token routes need ``Authorization: Bearer <key>`` when an API key is set; /health and /metrics
do not (they reveal no request content and are what probes and scrapers call).
"""

from __future__ import annotations

import hmac
import json
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ValidationError

from ..engine.async_engine import AsyncEngine
from ..engine.engine import Engine
from .chat import chat_completion
from .completions import completion
from .errors import APIError, from_validation_error, install_handlers
from .metrics import CONTENT_TYPE, Metrics, StatusRecorder
from .protocol import (ChatCompletionRequest, CompletionRequest, DetokenizeRequest, ModelCard, ModelList,
                       TokenizeRequest, now)
from .tokenize import detokenize, tokenize

log = logging.getLogger(__name__)


@dataclass
class ServerSettings:
    model_name: str
    api_key: str | None = None
    max_queue: int = 64  # requests waiting beyond max_batch running; more get 503
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
        self.metrics = Metrics(settings.model_name, self.engine.stats)
        self.max_len = engine.max_len
        self.vocab_size = engine.cfg.text.vocab_size
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
    limit = state.settings.max_body_bytes

    @app.api_route("/health", methods=["GET", "HEAD"])
    async def health() -> JSONResponse:
        if state.engine.alive:
            return JSONResponse({"status": "ok"})
        raise APIError(503, state.engine.error or "the engine is not running", "server_error", None,
                       "engine_stopped")

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(state.metrics.render(), media_type=CONTENT_TYPE)

    @app.get("/v1/models", dependencies=[auth])
    async def models() -> dict:
        return ModelList(data=[_card(state)]).model_dump()

    @app.get("/v1/models/{model_id:path}", dependencies=[auth])
    async def model(model_id: str) -> dict:
        _check_model(model_id, state)
        return _card(state).model_dump()

    for path, request_model, respond in (("/v1/chat/completions", ChatCompletionRequest, chat_completion),
                                         ("/v1/completions", CompletionRequest, completion)):
        _generation_route(app, path, request_model, respond, auth, state)

    @app.post("/tokenize", dependencies=[auth])
    async def tokenize_route(request: Request) -> dict:
        return await tokenize(await _parse(request, limit, TokenizeRequest), state)

    @app.post("/detokenize", dependencies=[auth])
    async def detokenize_route(request: Request) -> dict:
        return detokenize(await _parse(request, limit, DetokenizeRequest), state)


def _generation_route(app: FastAPI, path: str, request_model: type[BaseModel], respond, auth, state: ServerState):
    @app.post(path, dependencies=[auth])
    async def route(request: Request) -> Response:
        t_arrival = time.perf_counter()
        req = await _parse(request, state.settings.max_body_bytes, request_model)
        _check_model(req.model, state)
        return await respond(request, req, state, t_arrival)


def _card(state: ServerState) -> ModelCard:
    return ModelCard(id=state.settings.model_name, created=state.created, root=state.settings.model_name,
                     max_model_len=state.max_len)


def _check_model(name: str, state: ServerState) -> None:
    if name != state.settings.model_name:
        raise APIError(404, f"the model {name!r} does not exist; this server serves "
                            f"{state.settings.model_name!r}", param="model", code="model_not_found")


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


async def _parse(request: Request, max_body_bytes: int, model: type[BaseModel]) -> Any:
    body = await _read_body(request, max_body_bytes)
    try:
        data = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise APIError(400, f"the request body is not valid JSON ({e})", code="invalid_json") from None
    if not isinstance(data, dict):
        raise APIError(400, "the request body must be a JSON object", code="invalid_json")
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise from_validation_error(e) from None
