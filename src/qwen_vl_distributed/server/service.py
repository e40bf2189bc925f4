"""What the completion routes share: the prompt's length check, starting a request's choices in the engine, and
running a non-streamed request to its end unless the client hangs up first."""

from __future__ import annotations

import asyncio
import json
from typing import Any, Awaitable, Callable

from fastapi import Request

from ..engine.async_engine import EngineDeadError, QueueFullError
from ..engine.engine import Prompt, PromptError
from ..engine.output import OutputStream
from ..engine.sampling import SamplingParams
from ..engine.session import to_prompt
from .errors import APIError, ended_error
from .generation import EngineFailure, Generation
from .middleware import request_id
from .tools import ToolCallParser


def checked_prompt(inputs: Any, max_len: int, param: str = "messages") -> Prompt:
    n = len(inputs.input_ids)
    if n >= max_len:  # at least one token must fit after the prompt
        raise APIError(400, f"{param}: the prompt is {n} tokens; this server's context is {max_len} tokens "
                            f"(prompt plus output)", param=param, code="context_length_exceeded")
    return to_prompt(inputs)


def start(state: Any, prompt: Prompt, params: list[SamplingParams], t_arrival: float,
          text: Callable[[SamplingParams], OutputStream], tools: bool = False, first_index: int = 0,
          count_prompt: bool = True, request: Request | None = None, param: str = "messages") -> list[Generation]:
    """One sequence per ``params`` over ``prompt`` (choices first_index, first_index + 1, ...), admitted together.
    ``request``: its place in the queue is released once they are submitted (the engine counts them from then), and
    its deadline, if any, ends them. ``param``: the request field that holds the prompt (named by the error for a
    prompt that can never run)."""
    try:
        handles = state.engine.submit_group(prompt, params)
    except PromptError as e:  # more KV than the whole cache holds: it could never run
        raise APIError(400, f"{param}: {e}", param=param, code="context_length_exceeded") from None
    except QueueFullError as e:
        raise APIError(503, f"the server is busy ({e}); retry later", "server_error", None, "queue_full",
                       {"Retry-After": str(state.settings.retry_after_s)}) from None
    except EngineDeadError as e:
        raise APIError(503, f"the engine is not running: {e}", "server_error", None, "engine_stopped") from None
    place = getattr(request.state, "place", None) if request is not None else None
    if place is not None:
        place.release()
    deadline = getattr(request.state, "deadline", None) if request is not None else None
    return [Generation(state.engine, h, text(p), ToolCallParser() if tools else None, first_index + i,
                       len(prompt.input_ids), t_arrival, state.metrics, count_prompt and i == 0, deadline)
            for i, (h, p) in enumerate(zip(handles, params))]


async def until_done_or_gone(request: Request, work: Awaitable, state: Any) -> Any:
    """The result of ``work``, or None if the client disconnects first (then ``work`` is cancelled, which aborts
    its sequences: their KV blocks are free at once)."""
    task = asyncio.ensure_future(work)
    gone = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({task, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
        if not task.done():
            task.cancel()
    if not task.done() or task.cancelled():
        return None
    try:
        return task.result()
    except EngineFailure as e:
        raise ended_error(e, request_id(request), state.settings.retry_after_s) from None


async def _disconnected(request: Request) -> None:
    """Returns when the client disconnects (the body has been read, so the next message is the disconnect)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def engine_failure_event(e: EngineFailure, request: Request) -> str:
    """Headers are gone already: report in-band, the way OpenAI streams report errors."""
    return f"data: {json.dumps(ended_error(e, request_id(request)).body())}\n\n"
