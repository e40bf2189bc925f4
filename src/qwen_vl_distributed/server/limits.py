"""What one request may carry and how long it may take: the checks that run before any heavy work.

A chat completion is checked cheapest first: its API key, a place in the queue (``lifecycle.Admission``), the body's
size (its Content-Length, then as it arrives), the JSON (nesting, Unicode), field types, the model, ``max_tokens``
against the context, the sampling values; only then, in the preprocessing pool, the messages, the text's length, the
media's count and bytes, each image's header and each video's container, and the prompt's length from those, all
before anything is decoded (``engine/prompt_size.py``).

``LIMITS`` lists every limit for docs/server.md, whose table is generated from it and the ``serve`` parser's defaults
(``tests/test_docs_limits.py``).
"""

from __future__ import annotations

import asyncio
import json
import math
import re
import time
from dataclasses import dataclass
from typing import Any

from fastapi import Request
from starlette.requests import ClientDisconnect

from ..engine.prompt_size import PromptTooLongError
from .errors import APIError

# The body limit allows this many bytes of JSON text per token of context: a token is a few characters, and a
# character at most 12 bytes of JSON (a \uXXXX\uXXXX escaped pair).
TEXT_BYTES_PER_TOKEN = 32
BODY_OVERHEAD = 2**20  # the JSON around the messages: roles, parameters
MEDIA_BYTES_UNLIMITED = 64_000_000  # what the body limit allows for media when the processor sets no media limit

TIMEOUT_HEADER = "X-Request-Timeout"
# Stop strings are matched against the text after every token, on the event loop that serves every request:
# their number and length bound that work.
MAX_STOP_STRINGS = 16
MAX_STOP_CHARS = 256

_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")


def body_limit(max_media_bytes: int, max_len: int) -> int:
    """The largest body a request can legitimately need: its media as base64 (4/3 of their bytes), text for the
    whole context, and the JSON around them."""
    return math.ceil(max_media_bytes * 4 / 3) + max_len * TEXT_BYTES_PER_TOKEN + BODY_OVERHEAD


async def read_body(request: Request, limit: int, deadline: float | None = None) -> bytes:
    """The body, refused with 413 as soon as it passes ``limit`` bytes (never held whole in memory first), and
    with 408 when it has not all arrived by the request's deadline. A client that hangs up while sending it gets
    nothing back (499 in the access log), and no error is logged."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise APIError(413, f"the request body is {declared} bytes; the limit is {limit}", code="body_too_large")
    timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
    try:
        return await asyncio.wait_for(_read(request, limit), timeout)
    except ClientDisconnect:
        raise APIError(499, "the client closed the connection while sending the request",
                       code="client_closed_request") from None
    except asyncio.TimeoutError:
        raise APIError(408, "the request body did not arrive before the request's deadline",
                       code="deadline_exceeded") from None


async def _read(request: Request, limit: int) -> bytes:
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise APIError(413, f"the request body passes the limit of {limit} bytes", code="body_too_large")
        chunks.append(chunk)
    return b"".join(chunks)


def parse_json(body: bytes) -> dict:
    """The body as a JSON object. Too deep, not JSON, not an object, or a string that is not Unicode (a lone
    surrogate escape): 400 naming what is wrong."""
    try:
        data = json.loads(body)
    except RecursionError:
        raise APIError(400, "the request body is nested too deeply to parse", code="invalid_json") from None
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError, an integer of too many digits
        raise APIError(400, f"the request body is not valid JSON ({e})", code="invalid_json") from None
    if not isinstance(data, dict):
        raise APIError(400, "the request body must be a JSON object", code="invalid_json")
    if _SURROGATE_ESCAPE.search(body):  # only an escape can put a surrogate into a str (UTF-8 bytes cannot)
        where = _lone_surrogate(data)
        if where is not None:
            raise APIError(400, f"{where}: not valid Unicode (a lone surrogate escape such as \\ud800)",
                           param=None if where == "body" else re.split(r"[.\[]", where)[0], code="invalid_value")
    return data


def _lone_surrogate(data: Any) -> str | None:
    """The path of the first string (or key) holding a lone surrogate, or None. Iterative: the data may be as deep
    as the parser allowed."""
    todo = [("", data)]
    while todo:
        path, value = todo.pop()
        if isinstance(value, str):
            if not _is_unicode(value):
                return path or "body"
        elif isinstance(value, dict):
            for k, v in value.items():
                if not _is_unicode(k):
                    return path or "body"
                todo.append((f"{path}.{k}" if path else k, v))
        elif isinstance(value, list):
            todo += [(f"{path}[{i}]", v) for i, v in enumerate(value)]
    return None


def _is_unicode(s: str) -> bool:
    try:
        s.encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


def check_stop(stop: Any) -> None:
    """At most MAX_STOP_STRINGS stop strings of at most MAX_STOP_CHARS characters (their form is checked with the
    other sampling parameters)."""
    stops = [stop] if isinstance(stop, str) else stop if isinstance(stop, list) else []
    if len(stops) > MAX_STOP_STRINGS:
        raise APIError(400, f"stop: {len(stops)} strings; the limit is {MAX_STOP_STRINGS}", param="stop",
                       code="invalid_value")
    for i, s in enumerate(stops):
        if isinstance(s, str) and len(s) > MAX_STOP_CHARS:
            raise APIError(400, f"stop[{i}]: {len(s)} characters; the limit is {MAX_STOP_CHARS}", param="stop",
                           code="invalid_value")


def check_max_tokens(max_tokens: int | None, name: str, max_len: int) -> None:
    """Before any work: a ``max_tokens`` that no prompt leaves room for (every prompt has a token)."""
    if max_tokens is not None and max_tokens >= max_len:
        raise APIError(400, f"{name}: {max_tokens} is more than fits after any prompt in this server's context of "
                            f"{max_len} tokens (prompt plus output): at most {max_len - 1}", param=name,
                       code="context_length_exceeded")


def prompt_budget(max_tokens: int | None, max_len: int) -> int:
    """Prompt tokens that leave room for ``max_tokens`` new tokens (at least one when the client sent none)."""
    return max_len - (max_tokens or 1)


def prompt_too_long(e: PromptTooLongError, max_tokens: int | None, name: str, max_len: int) -> APIError:
    """The processor's refusal as the client should read it: the prompt itself, or the room it leaves for
    ``max_tokens`` (then named ``name``, the field the client sent)."""
    if max_tokens is not None and e.tokens < max_len:
        at_least = "" if e.exact else "at least "
        return APIError(400, f"{name}: {max_tokens} new tokens do not fit after the prompt's {at_least}{e.tokens} "
                             f"tokens in this server's context of {max_len} tokens", param=name,
                        code="context_length_exceeded")
    return APIError(400, f"{e.where}: {e.describe()}; this server's context is {max_len} tokens (prompt plus "
                         "output)", param=e.where, code="context_length_exceeded")


def request_deadline(request: Request, default_s: float | None) -> float | None:
    """When the request must have ended (``time.monotonic()``): the sooner of its ``X-Request-Timeout`` header
    (seconds) and the server's ``--request-timeout``; None when neither is set."""
    raw = request.headers.get(TIMEOUT_HEADER)
    limits = [] if default_s is None else [default_s]
    if raw is not None:
        try:
            asked = float(raw)
        except ValueError:
            asked = math.nan
        if not (math.isfinite(asked) and asked > 0):
            raise APIError(400, f"{TIMEOUT_HEADER}: expected a positive number of seconds, got {raw[:40]!r}",
                           param=TIMEOUT_HEADER, code="invalid_value")
        limits.append(asked)
    return time.monotonic() + min(limits) if limits else None


# -- the table of limits in docs/server.md ----------------------------------------------------------------------


@dataclass(frozen=True)
class Limit:
    what: str
    flag: str | None  # the serve option that sets it (its default is read from the parser), or None
    default: str  # shown when there is no flag, or appended to the flag's default
    beyond: str  # what a request beyond it gets


LIMITS: tuple[Limit, ...] = (
    Limit("tokens of one sequence (prompt plus output)", "--max-len", "",
          "400 `context_length_exceeded`, param `messages`, the image / video part that pushed the prompt over, "
          "or `max_tokens`; checked from text length and media headers before decoding"),
    Limit("`max_tokens` / `max_completion_tokens`", None, "the context minus the prompt",
          "400 `context_length_exceeded`, param `max_tokens`, before any work when it alone passes the context"),
    Limit("requests running", "--max-batch", "", "wait in the queue"),
    Limit("KV cache tokens of a stage (all running sequences together)", "--max-total-tokens",
          "what the GPU holds after weights and activations (the plan's figure); on CPU max-len x max-batch",
          "a prompt plus `max_tokens` over the whole cache: 400 `context_length_exceeded`; otherwise sequences "
          "wait, or are preempted and computed again later"),
    Limit("requests waiting, being preprocessed or arriving", "--max-queue", "", "503 `queue_full`, `Retry-After`"),
    Limit("images per request", "--max-images", "", "400 `media_limit_exceeded`"),
    Limit("videos per request", "--max-videos", "", "400 `media_limit_exceeded`"),
    Limit("megabytes of all images and videos of a request", "--max-media-mb", "", "400 `media_limit_exceeded`"),
    Limit("pixels of one image (from its header)", "--max-image-pixels", "", "400 `media_limit_exceeded`"),
    Limit("pixels a video's decoding goes through (frames x width x height)", "--max-video-pixels", "",
          "400 `media_limit_exceeded`, from the container before decoding and again frame by frame"),
    Limit("image / video aspect ratio", None, "200:1", "400 `media_limit_exceeded`"),
    Limit("image formats", None, "PNG, JPEG, WebP, GIF, BMP, TIFF, AVIF", "400 `invalid_media`"),
    Limit("stop strings", None, f"{MAX_STOP_STRINGS} of {MAX_STOP_CHARS} characters each",
          "400 `invalid_value`, param `stop`"),
    Limit("request body", None, f"4/3 x the media limit + {TEXT_BYTES_PER_TOKEN} bytes per token of context + "
          "1 MiB ({body} with the defaults)", "413 `body_too_large`, from `Content-Length` or as it arrives"),
    Limit("characters of text", None, "the context x the longest token of the vocabulary (in bytes)",
          "400 `context_length_exceeded` before tokenising"),
    Limit("JSON nesting", None, "Python's recursion limit (about 1000 levels)", "400 `invalid_json`"),
    Limit("seconds for one request", "--request-timeout", "; a client may ask for less with the `X-Request-Timeout` "
          "header (seconds)", "504 `deadline_exceeded` (408 while its body is still arriving; in a stream: an error "
          "event, then `[DONE]`); its KV blocks are freed"),
    Limit("seconds of grace for running requests at SIGTERM / SIGINT", "--shutdown-grace", "",
          "ended with 503 `shutting_down` (in a stream: an error event, then `[DONE]`)"),
    Limit("seconds of silence of a pipeline stage", "--stage-timeout", "",
          "every request ends with 500 `engine_failure`; `serve` exits with status 3 naming the stage"),
)


def limits_table(defaults: dict[str, Any]) -> str:
    """docs/server.md's table; ``defaults``: option string -> the ``serve`` parser's default."""
    body = body_limit(int(defaults["--max-media-mb"] * 1e6), defaults["--max-len"])
    rows = ["| limit | set by | default | beyond it |", "|---|---|---|---|"]
    for lim in LIMITS:
        extra = lim.default.format(body=f"{body / 1e6:.1f} MB")
        if lim.flag and not (defaults[lim.flag] is None and extra and not extra.startswith(";")):
            default = f"{_show(defaults[lim.flag])}{extra}"
        else:  # no flag, or a flag whose default (None) is computed: the text says what it is
            default = extra
        rows.append(f"| {lim.what} | {f'`{lim.flag}`' if lim.flag else '-'} | {default or 'none'} | {lim.beyond} |")
    return "\n".join(rows) + "\n"


def _show(value: Any) -> str:
    if value is None:
        return "none"
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return f"{value:,}".replace(",", " ") if isinstance(value, int) and value >= 10**5 else str(value)
