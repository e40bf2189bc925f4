"""A request id on every request: the ``X-Request-Id`` response header, the server log's lines about the request,
and the message of a 5xx error, so that a client can quote it and an operator find what happened (the details stay
in the log). A client's own ``X-Request-Id`` is kept when it is a plain token.

Plain ASGI, like ``metrics.StatusRecorder``: FastAPI's ``@app.middleware`` would wrap ``receive`` and hide client
disconnects from the endpoints.
"""

from __future__ import annotations

import re
import uuid

from starlette.requests import Request

HEADER = "x-request-id"
_CLIENT_ID = re.compile(r"[A-Za-z0-9._:-]{1,64}")


def request_id(request: Request) -> str:
    return request.scope.get("state", {}).get("request_id", "-")


class RequestIds:
    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        sent = dict(scope["headers"]).get(HEADER.encode(), b"").decode("latin-1")
        rid = sent if _CLIENT_ID.fullmatch(sent) else f"req-{uuid.uuid4().hex[:16]}"
        scope.setdefault("state", {})["request_id"] = rid

        async def send_with_id(message):
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), (HEADER.encode(), rid.encode())]}
            await send(message)

        await self.app(scope, receive, send_with_id)
