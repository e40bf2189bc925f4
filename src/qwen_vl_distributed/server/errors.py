"""Every failure leaves the server as an OpenAI-style body ``{"error": {message, type, param, code}}``.

Status codes:
  400  invalid_request_error: bad JSON, wrong field types, bad messages, bad sampling values, bad media URL or
       base64, undecodable image / video, too many images, prompt longer than the context, and local media paths
       that are not allowed. A disallowed local path is 400 (code ``media_access_denied``) rather than 403: OpenAI
       reports every unusable image URL as a 400, and clients map 403 to "your key lacks permission", which is not
       what happened.
  401  missing or wrong API key (code ``invalid_api_key``)
  404  unknown model (code ``model_not_found``) or route
  503  the waiting queue is full (code ``queue_full``, with Retry-After) or the engine has stopped
  500  anything else: a bug, logged with its traceback; the server keeps serving.
"""

from __future__ import annotations

import logging
import re

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..engine.media import (MediaAccessError, MediaDecodeError, MediaLimitError, MediaURLError, MessageFormatError,
                            RequestError)
from .protocol import ErrorInfo, ErrorResponse

log = logging.getLogger(__name__)

INVALID = "invalid_request_error"

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
        return ErrorResponse(error=ErrorInfo(message=self.message, type=self.type, param=self.param,
                                             code=self.code)).model_dump()


def error_response(status: int, message: str, type: str = INVALID, param: str | None = None,
                   code: str | None = None, headers: dict[str, str] | None = None) -> JSONResponse:
    body = ErrorResponse(error=ErrorInfo(message=message, type=type, param=param, code=code))
    return JSONResponse(body.model_dump(), status_code=status, headers=headers)


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
        log.exception("unhandled error serving %s %s", request.method, request.url.path)
        return error_response(500, f"internal error: {type(e).__name__}", "server_error", None, "internal_error")
