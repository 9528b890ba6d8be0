"""What a running service holds, and the FastAPI dependencies that reach it.

:class:`Platform` is built in the app's lifespan (:mod:`keel.core.app`) and kept on
``app.state.platform``. Routes take it as ``PlatformDep`` and authenticate with ``ReadKey``,
``WriteKey`` or ``AdminKey``; core routers (the outbox's) use the same names, so this module
imports no app.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Annotated, Any

from fastapi import Depends, Request
from starlette.datastructures import Headers

from keel.core.auth import ApiKey, ApiKeyVerifier, Scope
from keel.core.database import Database
from keel.core.idempotency import Idempotency
from keel.core.ratelimit import RateLimiter
from keel.core.settings import ServiceSettings

# Returns None while ready, else why not (e.g. "ledger_postings: committer died"); must be cheap.
ReadinessCheck = Callable[[], str | None]


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
    # Set by a service whose writes wait in a durable buffer while its database is down (a
    # spool file, Redis): /ready then stays 200 through an outage, once the database
    # has been seen migrated, so that a load balancer keeps sending it the writes it can keep.
    buffers_database_outages: bool = False
    migrations_verified: bool = False

    def add_readiness_check(self, check: ReadinessCheck) -> None:
        """Make ``GET /ready`` answer 503 ``not_ready`` whenever ``check`` returns a reason."""
        self.readiness_checks.append(check)

    async def authorize(self, headers: Headers, scope: Scope) -> ApiKey:
        """The caller's key, checked for ``scope`` and counted against its rate limit.

        The one auth path: FastAPI's ``require`` dependency and the fast path both call it.
        """
        key = await self.api_keys.authenticate(headers, scope)
        await self.rate_limiter.check(str(key.id))
        return key


async def platform(request: Request) -> Platform:
    """The running service's platform (a FastAPI dependency; async so it skips the threadpool)."""
    value: Platform = request.app.state.platform
    return value


PlatformDep = Annotated[Platform, Depends(platform)]


def require(scope: Scope) -> Callable[..., Awaitable[ApiKey]]:
    """A dependency that authenticates the caller, checks ``scope`` and counts the rate limit."""

    async def authenticated(request: Request) -> ApiKey:
        plat: Platform = request.app.state.platform
        return await plat.authorize(request.headers, scope)

    authenticated.__name__ = f"require_{scope.value}"
    authenticated.keel_scope = scope  # type: ignore[attr-defined]  # the fast path and core.openapi read it
    return authenticated


ReadKey = Annotated[ApiKey, Depends(require(Scope.READ))]
WriteKey = Annotated[ApiKey, Depends(require(Scope.WRITE))]
AdminKey = Annotated[ApiKey, Depends(require(Scope.ADMIN))]
