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
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass, field
from datetime import timedelta
from functools import partial
from typing import Any

from fastapi import APIRouter, FastAPI
from sqlalchemy.ext.asyncio import AsyncConnection
from starlette.middleware import Middleware
from starlette.responses import JSONResponse, Response
from starlette.types import ASGIApp, Receive, Send
from starlette.types import Scope as AsgiScope

from keel import __version__
from keel.core.auth import ApiKeyVerifier
from keel.core.chains import MigrationChain
from keel.core.database import Database
from keel.core.docs import install_docs
from keel.core.errors import NotReady, install_error_handlers, problem_responses, render
from keel.core.fastpath import FastPath, FastRoute, compile_fast_routes
from keel.core.idempotency import Idempotency
from keel.core.maintenance import PeriodicJob, run_periodically
from keel.core.migrate import pending_migrations
from keel.core.observability import AccessLog, configure_logging, metrics_response
from keel.core.openapi import install_openapi
from keel.core.outbox import Outbox, WebhookSettings
from keel.core.outbox import service as outbox_service
from keel.core.outbox.api import deliveries_router
from keel.core.pipeline import RequestPipeline
from keel.core.platform import Platform, PlatformDep, platform
from keel.core.ratelimit import RateLimiter
from keel.core.settings import ServiceSettings

log = logging.getLogger("keel")
# The longest a /ready probe waits for the migration check (probes share the one in flight).
READY_CHECK_SECONDS = 5.0

HealthProbe = Callable[[Platform], Awaitable[dict[str, Any]]]
Workers = Callable[[Platform], AbstractAsyncContextManager[None]]


@dataclass(frozen=True)
class ServiceSpec:
    """What a service adds to the platform."""

    name: str
    title: str
    description: str
    routers: list[APIRouter]
    migrations: MigrationChain | None = None  # the service's own chain; /ready checks it
    # Routes of ``routers`` served on the fast path (keel.core.fastpath), same answers.
    fast_routes: list[FastRoute] = field(default_factory=list)
    # ASGI middleware around every route, fast or not (inside keel's request id, body limit,
    # access log and metrics, which therefore cover it too).
    middleware: list[Middleware] = field(default_factory=list)
    workers: Workers | None = None  # background work started and stopped with the app
    health: HealthProbe | None = None  # extra fields for GET /health
    outbox: Outbox | None = None  # the events it publishes; settings must be WebhookSettings


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
        body["rate_limit"] = await plat.rate_limiter.health()
        if body["rate_limit"]["status"] != "ok":  # requests still pass: limits count per process
            body["status"] = "degraded"
        if spec.outbox is not None and body["database"]["status"] == "ok":
            worker = plat.services.get("outbox")
            body.update(await outbox_service.health(plat.database, worker, spec.name))
        if spec.health is not None:  # it may report what still works while the database is down
            try:
                body.update(await spec.health(plat))
            except Exception as exc:  # a failing probe degrades health, never 500s it
                log.warning("%s health probe failed: %r", spec.name, exc)
                body["status"] = "degraded"
                body["probe_error"] = type(exc).__name__
        return JSONResponse(body)

    checking: asyncio.Future[list[str]] | None = None
    started = 0.0

    async def bounded_check(plat: Platform) -> list[str]:
        own = [spec.migrations] if spec.migrations is not None else []
        async with asyncio.timeout(READY_CHECK_SECONDS):
            return await pending_migrations(plat.database, own)

    async def pending_now(plat: Platform) -> list[str]:
        """One migration check at a time: probes that arrive while one runs share its answer, so
        a burst of 1,000 ``/ready`` calls is one query, not 1,000 queued on the pool.

        Bounded by ``READY_CHECK_SECONDS``: a check the database never answers (a link gone
        silent: no error, no reply) would otherwise hold every later probe, for as long as the
        kernel takes to give the connection up, even once the database is back. The check times
        itself out (ending with TimeoutError, which its waiters hear, and giving its connection
        up); a probe that finds one older than that, still winding down, starts another.
        """
        nonlocal checking, started
        now = time.monotonic()
        if checking is None or checking.done() or now - started >= READY_CHECK_SECONDS:
            checking, started = asyncio.ensure_future(bounded_check(plat)), now
            # Read its outcome even when every waiter gave up, so none is logged as unretrieved.
            checking.add_done_callback(lambda done: done.cancelled() or done.exception())
        async with asyncio.timeout(started + READY_CHECK_SECONDS - now):  # its wind-down too
            return await asyncio.shield(checking)

    @router.get(
        "/ready",
        summary="503 until the database is reachable and migrated",
        responses=problem_responses(NotReady),
    )
    async def ready(plat: PlatformDep) -> Response:
        body = {"status": "ready"}
        try:
            pending = await pending_now(plat)
        except Exception as exc:
            if not (plat.buffers_database_outages and plat.migrations_verified):
                return _not_ready(f"database unreachable: {type(exc).__name__}")
            pending = []
            body["database"] = f"unreachable ({type(exc).__name__}): writes are buffered"
        if pending:
            return _not_ready(
                f"migrations pending for: {', '.join(pending)}; run `keel db upgrade`"
            )
        plat.migrations_verified = True
        reasons = [reason for check in plat.readiness_checks if (reason := check())]
        if reasons:
            return _not_ready("; ".join(reasons))
        return JSONResponse(body)

    @router.get(
        "/metrics",
        summary="Prometheus metrics",
        response_class=Response,
        responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}}}},
    )
    async def metrics() -> Response:
        return metrics_response()

    return router


def _not_ready(detail: str) -> Response:
    return render(NotReady(detail))


def _maintenance_jobs(spec: ServiceSpec, plat: Platform) -> list[PeriodicJob]:
    """Expired idempotency records, and the outbox's settled history if the service has one."""

    async def expired_keys(conn: AsyncConnection, limit: int) -> int:
        return await plat.idempotency.store.purge_expired(conn, spec.name, limit)

    jobs = [PeriodicJob(name=f"{spec.name}:idempotency-purge", chunks=[expired_keys])]
    if spec.outbox is not None:
        assert isinstance(plat.settings, WebhookSettings)
        jobs.append(outbox_service.purge_job(plat.settings, spec.name))
    return jobs


@asynccontextmanager
async def _outbox_worker(spec: ServiceSpec, plat: Platform) -> AsyncIterator[None]:
    if spec.outbox is None:
        yield
        return
    assert isinstance(plat.settings, WebhookSettings)
    async with outbox_service.running_worker(plat.database, plat.settings, spec.name) as worker:
        if worker is not None:
            plat.services["outbox"] = worker
        yield


_heap_settled = False


def settle_heap() -> None:
    """Hide everything alive after start-up from the cyclic garbage collector, once per process.

    A service's modules, classes and caches live as long as the process. Under load, objects of
    in-flight requests survive young collections, so full collections run often, and each walked
    the whole start-up heap with the event loop stopped: that was the p99. ``gc.freeze`` moves
    them to a generation the collector skips; what requests allocate is still collected.
    """
    global _heap_settled
    if _heap_settled:
        return
    gc.collect()
    gc.freeze()
    _heap_settled = True


def create_service_app(spec: ServiceSpec, settings: ServiceSettings) -> FastAPI:
    """Build a service's ASGI app."""
    if spec.outbox is not None and not (
        spec.outbox.service == spec.name and isinstance(settings, WebhookSettings)
    ):
        raise TypeError(f"{spec.name}: an outbox needs its own name and WebhookSettings")

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        configure_logging(settings.log_format, settings.log_level)
        database = Database.from_settings(settings)
        plat = Platform(
            settings=settings,
            database=database,
            api_keys=ApiKeyVerifier(
                database,
                settings.api_key_cache_seconds,
                settings.api_key_negative_cache_seconds,
                stale_seconds=settings.api_key_stale_seconds,
            ),
            rate_limiter=RateLimiter(
                settings.rate_limit,
                settings.redis_url,
                spec.name,
                redis_timeout=settings.rate_limit_redis_timeout_seconds,
                redis_backoff=settings.rate_limit_redis_backoff_seconds,
            ),
            idempotency=Idempotency(spec.name, timedelta(hours=settings.idempotency_ttl_hours)),
        )
        app.state.platform = plat
        if settings.gc_freeze:
            settle_heap()
        purge = asyncio.create_task(run_periodically(database, _maintenance_jobs(spec, plat)))
        try:
            async with _outbox_worker(spec, plat):
                if spec.workers is None:
                    yield
                else:
                    async with spec.workers(plat):
                        yield
        finally:
            purge.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await purge
            await plat.rate_limiter.close()
            await database.dispose()

    app = KeelApp(
        title=f"keel {spec.title}",
        description=spec.description,
        version=__version__,
        lifespan=lifespan,
        docs_url=None,  # install_docs serves them from local assets
        redoc_url=None,
        # keel exports Prometheus metrics itself; FastAPI's OpenTelemetry hooks cost ~4%/request.
        telemetry={"tracing": False, "metrics": False, "logs": False},
    )
    install_error_handlers(app)
    install_docs(app)
    install_openapi(app)
    app.include_router(_system_router(spec))
    for router in spec.routers:
        app.include_router(router)
    if spec.outbox is not None:
        app.include_router(deliveries_router(spec.name))
    app.spec = spec
    app.fast_path = _fast_path(spec, settings)
    app.pipeline = _pipeline(app, spec, settings, app.fast_path)
    return app


def _fast_path(spec: ServiceSpec, settings: ServiceSettings) -> FastPath | None:
    if not (settings.fast_path and spec.fast_routes):
        return None
    return FastPath(compile_fast_routes(spec.routers, spec.fast_routes, platform))


def _pipeline(
    app: FastAPI, spec: ServiceSpec, settings: ServiceSettings, fast: FastPath | None
) -> ASGIApp:
    """keel's request wrapper, then the service's middleware, then the fast path or FastAPI."""
    access = AccessLog(
        spec.name, enabled=settings.access_log, slow_seconds=settings.access_log_slow_ms / 1000
    )
    access.log_every = {(r.method, r.path): r.log_every for r in spec.fast_routes}
    inner: ASGIApp = partial(FastAPI.__call__, app)
    if spec.middleware:
        if fast is not None:
            inner = _FastDispatch(fast, inner)
        for cls, args, kwargs in reversed(spec.middleware):
            inner = cls(inner, *args, **kwargs)
        fast = None  # reached through the service's middleware instead
    return RequestPipeline(inner, access=access, max_body_bytes=settings.max_body_bytes, fast=fast)


class _FastDispatch:
    """The fast path behind a service's own middleware: fast routes here, the rest to FastAPI."""

    def __init__(self, fast: FastPath, app: ASGIApp) -> None:
        self.fast = fast
        self.app = app

    async def __call__(self, scope: AsgiScope, receive: Receive, send: Send) -> None:
        matched = self.fast.match(scope) if scope["type"] == "http" else None
        if matched is None:
            await self.app(scope, receive, send)
            return
        (_route, plan), params = matched
        response = await self.fast.serve(plan, params, scope, receive)
        await response(scope, receive, send)


class KeelApp(FastAPI):
    """FastAPI behind keel's one request wrapper (:class:`keel.core.pipeline.RequestPipeline`).

    Every request passes the wrapper once (request id, body limit, access log, metrics), then a
    service's own middleware, then either the fast path (:mod:`keel.core.fastpath`) or FastAPI.
    Everything else, including the documentation of the fast routes, is plain FastAPI.
    """

    pipeline: ASGIApp | None = None
    spec: ServiceSpec | None = None
    fast_path: FastPath | None = None  # None when KEEL_FAST_PATH=false

    async def __call__(self, scope: AsgiScope, receive: Receive, send: Send) -> None:
        scope["app"] = self
        if self.pipeline is None:
            await super().__call__(scope, receive, send)
            return
        await self.pipeline(scope, receive, send)
