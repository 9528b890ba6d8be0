"""The one way a keel service becomes an ASGI app.

:func:`create_service_app` wires what every service shares: the problem-JSON error handler, body
limit, request-id logging and metrics, ``/health``, ``/ready`` and ``/metrics``. Engines, pools and
workers are created in the lifespan and kept on ``app.state.platform``; nothing happens at import.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass, field
from datetime import timedelta
from functools import partial
from typing import Annotated, Any

from fastapi import APIRouter, Depends, FastAPI, Request
from starlette.responses import JSONResponse, Response
from starlette.types import ASGIApp, Receive, Send
from starlette.types import Scope as AsgiScope

from keel import __version__
from keel.core.auth import ApiKey, ApiKeyVerifier, Scope
from keel.core.database import Database
from keel.core.errors import install_error_handlers
from keel.core.fastpath import FastPath, FastRoute
from keel.core.idempotency import Idempotency
from keel.core.limits import BodyLimit
from keel.core.migrate import pending_migrations
from keel.core.observability import RequestObservation, configure_logging, metrics_response
from keel.core.ratelimit import RateLimiter
from keel.core.settings import ServiceSettings

log = logging.getLogger("keel")

HealthProbe = Callable[["Platform"], Awaitable[dict[str, Any]]]
# Returns None while ready, else why not (e.g. "ledger_postings: committer died"); must be cheap.
ReadinessCheck = Callable[[], str | None]
Workers = Callable[["Platform"], AbstractAsyncContextManager[None]]


@dataclass
class Platform:
    """Everything a running service holds: built in the lifespan, closed there."""

    settings: ServiceSettings
    database: Database
    api_keys: ApiKeyVerifier
    rate_limiter: RateLimiter
    idempotency: Idempotency
    services: dict[str, Any] = field(default_factory=dict)
    readiness_checks: list[ReadinessCheck] = field(default_factory=list)

    def add_readiness_check(self, check: ReadinessCheck) -> None:
        """Make ``GET /ready`` answer 503 ``not_ready`` whenever ``check`` returns a reason."""
        self.readiness_checks.append(check)


@dataclass(frozen=True)
class ServiceSpec:
    """What a service adds to the platform."""

    name: str
    title: str
    description: str
    routers: list[APIRouter]
    fast_routes: list[FastRoute] = field(default_factory=list)  # measured hot paths
    workers: Workers | None = None  # background work started and stopped with the app
    health: HealthProbe | None = None  # extra fields for GET /health


async def platform(request: Request) -> Platform:
    """The running service's platform (a FastAPI dependency; async so it skips the threadpool)."""
    value: Platform = request.app.state.platform
    return value


PlatformDep = Annotated[Platform, Depends(platform)]


def require(scope: Scope) -> Callable[..., Awaitable[ApiKey]]:
    """A dependency that authenticates the caller, checks ``scope`` and counts the rate limit."""

    async def authenticated(request: Request) -> ApiKey:
        plat: Platform = request.app.state.platform
        key = await plat.api_keys.authenticate(request.headers, scope)
        await plat.rate_limiter.check(str(key.id))
        request.state.api_key = key
        return key

    authenticated.__name__ = f"require_{scope.value}"
    return authenticated


ReadKey = Annotated[ApiKey, Depends(require(Scope.READ))]
WriteKey = Annotated[ApiKey, Depends(require(Scope.WRITE))]
AdminKey = Annotated[ApiKey, Depends(require(Scope.ADMIN))]


def _system_router(spec: ServiceSpec) -> APIRouter:
    router = APIRouter(tags=["system"])

    @router.get("/health", summary="Liveness and a status summary")
    async def health(plat: PlatformDep) -> JSONResponse:
        body: dict[str, Any] = {"status": "ok", "service": spec.name, "version": __version__}
        try:
            await plat.database.ping()
            body["database"] = {"status": "ok", "dialect": plat.database.dialect}
        except Exception as exc:  # health reports the failure rather than failing itself
            body["status"] = "degraded"
            body["database"] = {"status": "down", "error": type(exc).__name__}
        if spec.health is not None and body["database"]["status"] == "ok":
            try:
                body.update(await spec.health(plat))
            except Exception as exc:  # a failing probe degrades health, never 500s it
                log.warning("%s health probe failed: %r", spec.name, exc)
                body["status"] = "degraded"
                body["probe_error"] = type(exc).__name__
        return JSONResponse(body)

    @router.get("/ready", summary="503 until the database is reachable and migrated")
    async def ready(plat: PlatformDep) -> JSONResponse:
        try:
            pending = await pending_migrations(plat.database, spec.name)
        except Exception as exc:
            return _not_ready(f"database unreachable: {type(exc).__name__}")
        if pending:
            return _not_ready(
                f"migrations pending for: {', '.join(pending)}; run `keel db upgrade`"
            )
        reasons = [reason for check in plat.readiness_checks if (reason := check())]
        if reasons:
            return _not_ready("; ".join(reasons))
        return JSONResponse({"status": "ready"})

    @router.get("/metrics", summary="Prometheus metrics", response_class=Response)
    async def metrics() -> Response:
        return metrics_response()

    return router


def _not_ready(detail: str) -> JSONResponse:
    body = {
        "type": "https://keel.dev/problems/not-ready",
        "title": "Not ready",
        "status": 503,
        "detail": detail,
        "code": "not_ready",
    }
    return JSONResponse(body, status_code=503, media_type="application/problem+json")


async def _purge_idempotency_keys(plat: Platform) -> None:
    while True:
        try:
            async with plat.database.write() as conn:
                removed = await plat.idempotency.store.purge_expired(conn)
            if removed:
                log.info("purged %d expired idempotency keys", removed)
        except Exception:
            log.exception("idempotency purge failed; will retry")
        await asyncio.sleep(600)


_heap_settled = False


def settle_heap() -> None:
    """Hide everything alive after start-up from the cyclic garbage collector, once per process.

    A service's modules, classes and caches are about 130,000 objects that live as long as the
    process. Under load, objects of in-flight requests survive young collections, so full
    collections run every second or so, and each walked all of them: 60-100 ms with the event loop
    stopped, the whole of the p99. ``gc.freeze`` moves them to a generation the collector skips;
    what requests allocate is still collected as before.
    """
    global _heap_settled
    if _heap_settled:
        return
    gc.collect()
    gc.freeze()
    _heap_settled = True


def create_service_app(spec: ServiceSpec, settings: ServiceSettings) -> FastAPI:
    """Build a service's ASGI app."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        configure_logging(settings.log_format, settings.log_level)
        database = Database.from_settings(settings)
        plat = Platform(
            settings=settings,
            database=database,
            api_keys=ApiKeyVerifier(database, settings.api_key_cache_seconds),
            rate_limiter=RateLimiter(settings.rate_limit, settings.redis_url, spec.name),
            idempotency=Idempotency(spec.name, timedelta(hours=settings.idempotency_ttl_hours)),
        )
        app.state.platform = plat
        if settings.gc_freeze:
            settle_heap()
        purge = asyncio.create_task(_purge_idempotency_keys(plat))
        try:
            if spec.workers is None:
                yield
            else:
                async with spec.workers(plat):
                    yield
        finally:
            purge.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await purge
            await database.dispose()

    app = KeelApp(
        title=f"keel {spec.title}",
        description=spec.description,
        version=__version__,
        lifespan=lifespan,
        # keel exports Prometheus metrics itself; FastAPI's OpenTelemetry hooks cost ~4%/request.
        telemetry={"tracing": False, "metrics": False, "logs": False},
    )
    install_error_handlers(app)
    app.include_router(_system_router(spec))
    for router in spec.routers:
        app.include_router(router)
    app.add_middleware(BodyLimit, max_bytes=settings.max_body_bytes)
    app.add_middleware(RequestObservation, service=spec.name, log_requests=settings.access_log)
    if settings.fast_path and spec.fast_routes:
        fast = FastPath(partial(FastAPI.__call__, app), spec.fast_routes)
        app.fast_path = fast
        app.fast_stack = RequestObservation(
            BodyLimit(fast, max_bytes=settings.max_body_bytes),
            service=spec.name,
            log_requests=settings.access_log,
        )
    return app


class KeelApp(FastAPI):
    """FastAPI, with the service's measured hot routes served in front of it.

    A request for a fast route skips FastAPI's own middleware (error, telemetry and body-limit
    wrappers around every send, which cost a posting more than its share of the group commit)
    and goes through keel's observation and body limit straight to :class:`FastPath`.
    Everything else, including the documentation of the fast routes, is plain FastAPI.
    """

    fast_path: FastPath | None = None
    fast_stack: ASGIApp | None = None

    async def __call__(self, scope: AsgiScope, receive: Receive, send: Send) -> None:
        fast, stack = self.fast_path, self.fast_stack
        if fast is not None and stack is not None and fast.match(scope) is not None:
            scope["app"] = self
            await stack(scope, receive, send)
            return
        await super().__call__(scope, receive, send)
