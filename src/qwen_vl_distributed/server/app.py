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
do not (they reveal no request content and are what probes and scrapers call). With a key, /openapi.json needs it
too and /docs is off.

Limits and the order of checks: ``limits.py``; admission, the preprocessing pool, draining and ending:
``lifecycle.py``; request ids and what an error may tell a client: ``middleware.py``, ``errors.py``.
"""

from __future__ import annotations

import hmac
import logging
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ValidationError

from ..engine.async_engine import AsyncEngine
from ..engine.engine import Engine
from ..engine.threads import preprocess_workers
from . import limits
from .chat import chat_completion
from .completions import completion
from .errors import APIError, from_validation_error, install_handlers
from .lifecycle import Admission
from .metrics import CONTENT_TYPE, Metrics, StatusRecorder
from .middleware import RequestIds
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
        self.metrics = Metrics(settings.model_name, self.engine.stats)
        self.max_len = engine.max_len
        self.vocab_size = engine.cfg.text.vocab_size
        media = processor.media.max_media_bytes
        self.max_body_bytes = settings.max_body_bytes or limits.body_limit(
            limits.MEDIA_BYTES_UNLIMITED if media is None else media, engine.max_len)
        self.created = now()
        self.admission = Admission(self.engine, preprocess_workers(), settings.retry_after_s)
        self.metrics.preprocessing.set_function(lambda: self.admission.preparing)

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
    limit = state.max_body_bytes

    # GET in the schema; HEAD the same handler under its own route (one route with both methods gives the schema
    # two operations of one id, which FastAPI warns about)
    @app.head("/health", include_in_schema=False)
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
        deadline = limits.request_deadline(request, state.settings.request_timeout_s)
        request.state.deadline = deadline  # (read by the route's preprocessing and its sequences)
        # a place first (a full server reads no body), held from the body's reading until its sequences are
        # submitted (service.start releases it; the engine counts them from there)
        with state.admission.place() as place:
            request.state.place = place
            req = await _parse(request, state.max_body_bytes, request_model, deadline)
            _check_model(req.model, state)
            limits.check_max_tokens(req.max_new_tokens, req.max_tokens_param, state.max_len)
            limits.check_stop(req.stop)
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


async def _parse(request: Request, max_body_bytes: int, model: type[BaseModel],
                 deadline: float | None = None) -> Any:
    data = limits.parse_json(await limits.read_body(request, max_body_bytes, deadline))
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise from_validation_error(e) from None
