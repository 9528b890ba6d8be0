"""The bench's reference apps, served under the same uvicorn as the services (factories).

``bare_app``: an ASGI handler that answers 200 ``{}`` to anything: what uvicorn alone costs.
``noop_app``: a keel service whose one route, an authenticated fast ``POST /noop``, answers 202
and does nothing else: what keel's request path costs (auth, rate limit, request id, body limit,
access log, metrics). Every service's bench table carries both rows, measured in the same run.
"""

from __future__ import annotations

from fastapi import APIRouter, FastAPI
from starlette.responses import Response
from starlette.types import ASGIApp, Receive, Scope, Send

from keel.core.app import Platform, ServiceSpec, WriteKey, create_service_app
from keel.core.auth import Scope as KeyScope
from keel.core.fastpath import FastRequest, FastRoute
from keel.core.settings import ServiceSettings

_EMPTY = b"{}"
_HEADERS = [(b"content-type", b"application/json"), (b"content-length", b"2")]


async def _bare(scope: Scope, receive: Receive, send: Send) -> None:
    if scope["type"] != "http":  # lifespan: nothing to start
        message = await receive()
        while message["type"] != "lifespan.shutdown":
            await send({"type": message["type"] + ".complete"})
            message = await receive()
        await send({"type": "lifespan.shutdown.complete"})
        return
    more = True
    while more:  # read the body so the connection can be reused
        more = (await receive()).get("more_body", False)
    await send({"type": "http.response.start", "status": 200, "headers": _HEADERS})
    await send({"type": "http.response.body", "body": _EMPTY})


def bare_app() -> ASGIApp:
    """The bare ASGI handler (a uvicorn factory)."""
    return _bare


router = APIRouter(tags=["reference"])


@router.post("/noop", status_code=202, summary="Authenticate, count the rate limit, do nothing")
async def noop(key: WriteKey) -> Response:
    return Response(status_code=202)


async def _fast_noop(plat: Platform, request: FastRequest[None]) -> Response:
    return Response(status_code=202)


SPEC = ServiceSpec(
    name="noop",
    title="no-op reference",
    description="One authenticated route that does nothing: the cost of keel's request path.",
    routers=[router],
    fast_routes=[FastRoute("POST", "/noop", KeyScope.WRITE, _fast_noop)],
)


def noop_app() -> FastAPI:
    """The no-op keel service (a uvicorn factory); settings from ``KEEL_*``."""
    return create_service_app(SPEC, ServiceSettings())
