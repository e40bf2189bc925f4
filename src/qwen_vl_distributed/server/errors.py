"""Every failure leaves the server as an OpenAI-style body ``{"error": {message, type, param, code}}``.

Status codes:
  400  invalid_request_error: bad JSON, wrong field types, bad messages, bad sampling values, bad media URL or
       base64, undecodable image / video, too many images, prompt longer than the context, and local media paths
       that are not allowed. A disallowed local path is 400 (code ``media_access_denied``) rather than 403: OpenAI
       reports every unusable image URL as a 400, and clients map 403 to "your key lacks permission", which is not
       what happened.
  401  missing or wrong API key (code ``invalid_api_key``)
  404  unknown model (code ``model_not_found``) or route
  413  a body over the limit (code ``body_too_large``)
  503  the waiting queue is full (code ``queue_full``, with Retry-After), the server is shutting down
       (``shutting_down``, with Retry-After) or the engine has stopped (``engine_stopped``)
  504  the request's deadline passed (``deadline_exceeded``)
  500  the engine failed mid-request (``engine_failure``), or a bug (``internal_error``), logged with its traceback;
       the server keeps serving after a bug.

What a client reads is the request's own business: its fields, limits, the request id. Process ids, host names,
addresses, ports, source paths and exception texts stay in the server log; ``scrub`` removes any that an error
message would otherwise carry.
"""

from __future__ import annotations

import functools
import logging
import os
import re
import socket
import sys

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..engine.media import (MediaAccessError, MediaDecodeError, MediaLimitError, MediaURLError, MessageFormatError,
                            RequestError)
from .middleware import HEADER as REQUEST_ID_HEADER
from .middleware import request_id
from .protocol import ErrorInfo, ErrorResponse

log = logging.getLogger(__name__)

INVALID = "invalid_request_error"
# codes of requests that end without finishing (besides the engine's "engine_failure")
SHUTTING_DOWN = "shutting_down"
DEADLINE_EXCEEDED = "deadline_exceeded"

# RequestError subclass -> error code (all 400); the first match in order wins, so subclasses come first.
_REQUEST_CODES: tuple[tuple[type, str], ...] = (
    (MessageFormatError, "invalid_messages"),
    (MediaURLError, "invalid_media_url"),
    (MediaAccessError, "media_access_denied"),
    (MediaDecodeError, "invalid_media"),
    (MediaLimitError, "media_limit_exceeded"),
    (RequestError, "invalid_value"),
)

# A RequestError message starts with the field it is about: "messages[0].content[1].image_url: ..."
_WHERE = re.compile(r"^([A-Za-z_][\w.\[\]]*): ")


class APIError(Exception):
    def __init__(self, status: int, message: str, type: str = INVALID, param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers

    def response(self) -> JSONResponse:
        return error_response(self.status, self.message, self.type, self.param, self.code, self.headers)

    def body(self) -> dict:
        return error_body(self.message, self.type, self.param, self.code)


def error_body(message: str, type: str = INVALID, param: str | None = None, code: str | None = None) -> dict:
    """The body every error has, in a response or a stream's error event; its message and param ``scrub``bed."""
    return ErrorResponse(error=ErrorInfo(message=scrub(message), type=type, param=param and scrub(param),
                                         code=code)).model_dump()


def error_response(status: int, message: str, type: str = INVALID, param: str | None = None,
                   code: str | None = None, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(error_body(message, type, param, code), status_code=status, headers=headers)


_ADDRESS = re.compile(r"<[^<>]*\bat 0x[0-9a-fA-F]+>|\b0x[0-9a-fA-F]{6,}\b")
_PID = re.compile(r"\bpid \d+")
_IP_PORT = re.compile(r"\b\d{1,3}(?:\.\d{1,3}){3}(?::\d+)?\b|\blocalhost:\d+\b")


@functools.cache
def _server_dirs() -> list[str]:
    """Where the server's own files are: its source, its Python, its working directory."""
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    dirs = {here, os.path.dirname(here), sys.prefix, sys.base_prefix, os.getcwd()}
    return sorted((d for d in dirs if len(d) > 1), key=len, reverse=True)


def scrub(text: str) -> str:
    """An error message as a client may read it: no object addresses, process ids, IP addresses and ports, host
    name or server paths; and valid UTF-8 (a client's lone surrogate, echoed, must not break the response)."""
    text = _ADDRESS.sub("<object>", text)
    text = _PID.sub("pid ?", text)
    text = _IP_PORT.sub("<address>", text)
    for d in _server_dirs():
        text = text.replace(d, "<server>")
    host = socket.gethostname()
    if host:
        text = re.sub(rf"\b{re.escape(host)}\b", "<host>", text)
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def ended_error(e: Exception, rid: str, retry_after_s: int = 1) -> APIError:
    """A request that ended without finishing (generation.EngineFailure), as the client reads it. The engine's own
    words (which stage, host and process) are in the server log."""
    code = getattr(e, "code", None)
    if code == SHUTTING_DOWN:
        return APIError(503, str(e), "server_error", None, code, {"Retry-After": str(retry_after_s)})
    if code == DEADLINE_EXCEEDED:
        return APIError(504, str(e), "timeout_error", None, code)
    log.error("request %s ended by an engine failure: %s", rid, e)
    return APIError(500, f"the engine failed while serving this request (request id {rid}; the server log has the "
                         "details)", "server_error", None, "engine_failure")


def from_request_error(e: RequestError) -> APIError:
    """A processor / media / sampling error -> 400 naming the field (param) it starts with."""
    code = next(c for cls, c in _REQUEST_CODES if isinstance(e, cls))
    m = _WHERE.match(str(e))
    return APIError(400, str(e), INVALID, m.group(1) if m else None, code)


def from_validation_error(e: ValidationError | RequestValidationError) -> APIError:
    """The first pydantic error, as "<field>: <what is wrong>" with param = the field's dotted path."""
    err = e.errors()[0]
    loc = [str(x) for x in err.get("loc", ()) if x != "body"]
    msg = err.get("msg", "invalid value")
    if err.get("type") == "extra_forbidden":  # docs/server.md lists the fields this server accepts
        msg = "unknown or unsupported field"
    # param is the top-level field (as OpenAI reports it); the message keeps the full path, union branch included.
    return APIError(400, f"{'.'.join(loc)}: {msg}" if loc else msg, INVALID, loc[0] if loc else None,
                    "invalid_value")


def install_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api(_: Request, e: APIError) -> JSONResponse:
        return e.response()

    @app.exception_handler(RequestError)
    async def _request(_: Request, e: RequestError) -> JSONResponse:
        return from_request_error(e).response()

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, e: RequestValidationError) -> JSONResponse:
        return from_validation_error(e).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, e: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(e.status_code)
        return error_response(e.status_code, str(e.detail), INVALID, None, code, getattr(e, "headers", None))

    @app.exception_handler(Exception)
    async def _bug(request: Request, e: Exception) -> JSONResponse:
        # (this handler answers outside the middleware, so the request id header is set here)
        rid = request_id(request)
        log.exception("request %s: unhandled error serving %s %s", rid, request.method, request.url.path)
        return error_response(500, f"internal error (request id {rid}; the server log has the details)",
                              "server_error", None, "internal_error", {REQUEST_ID_HEADER: rid})
