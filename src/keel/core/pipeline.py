"""The one ASGI wrapper around every request of a keel service, whichever code serves it.

:class:`RequestPipeline` gives each request its id (``X-Request-ID``, echoed in the response),
enforces the body limit, and records one access line and the request metrics. It sits outside
the middleware a service declares and outside both the fast path and FastAPI, so every route gets
the same behaviour. One wrapper instead of three: each wrapped ``send`` and ``receive`` is a
coroutine call per message on every request.
"""

from __future__ import annotations

import time
from typing import Any

from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from keel.core.errors import render
from keel.core.fastpath import FastPath
from keel.core.limits import BodyTooLarge, declared_length_refused, limited, too_large
from keel.core.observability import AccessLog, new_request_id, request_id_from, request_id_var


class RequestPipeline:
    """Request id, body limit, access log and metrics; then the fast path or ``app``.

    ``fast`` is given only when nothing sits between this wrapper and the routes: a fast route's
    answer is then a :class:`Response` object whose status and headers are set here directly,
    with no ``send`` wrapper at all.
    """

    def __init__(
        self, app: ASGIApp, *, access: AccessLog, max_body_bytes: int, fast: FastPath | None
    ) -> None:
        self.app = app
        self.access = access
        self.max_body_bytes = max_body_bytes
        self.fast = fast

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        rid, length = _scan(scope)
        token = request_id_var.set(rid)
        rid_header = (b"x-request-id", rid.encode("latin-1"))
        status = 500
        try:
            if length is not None and declared_length_refused(length, self.max_body_bytes):
                status = await self._answer(
                    render(too_large(self.max_body_bytes)), rid_header, scope, receive, send
                )
                return
            if length is None:
                receive = limited(receive, self.max_body_bytes)
            matched = self.fast.match(scope) if self.fast is not None else None
            if matched is not None and self.fast is not None:
                (_route, plan), params = matched
                response = await self.fast.serve(plan, params, scope, receive)
                status = await self._answer(response, rid_header, scope, receive, send)
            else:
                status = await self._forward(rid_header, scope, receive, send)
        finally:
            self.access.record(scope, status, time.perf_counter() - started, rid)
            request_id_var.reset(token)

    @staticmethod
    async def _answer(
        response: Response,
        rid_header: tuple[bytes, bytes],
        scope: Scope,
        receive: Receive,
        send: Send,
    ) -> int:
        response.raw_headers.append(rid_header)
        await response(scope, receive, send)
        return response.status_code

    async def _forward(
        self, rid_header: tuple[bytes, bytes], scope: Scope, receive: Receive, send: Send
    ) -> int:
        status = 500
        started = False

        async def send_with_id(message: Message) -> None:
            nonlocal status, started
            if message["type"] == "http.response.start":
                status, started = message["status"], True
                message["headers"] = [*message.get("headers", []), rid_header]
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        except BodyTooLarge:  # raised past a service's middleware; FastAPI itself renders it
            if started:
                raise
            return await self._answer(
                render(too_large(self.max_body_bytes)), rid_header, scope, receive, send
            )
        return status


def _scan(scope: Scope) -> tuple[str, Any]:
    """The request id and the ``Content-Length`` value, in one pass over the headers."""
    rid: str | None = None
    length = None
    for name, value in scope["headers"]:
        if name == b"content-length":
            length = value
        elif name == b"x-request-id":
            rid = request_id_from(value)
    return rid or new_request_id(), length
