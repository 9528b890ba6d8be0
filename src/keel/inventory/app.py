"""The inventory app: ``keel serve inventory``.

Or ``uvicorn --factory keel.inventory.app:create_app``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from keel.core.app import ServiceSpec, create_service_app
from keel.core.database import Database
from keel.core.fastpath import FastRoute
from keel.core.platform import Platform
from keel.inventory import service
from keel.inventory.api import router
from keel.inventory.purchases import purchase_committer
from keel.inventory.registration import MIGRATIONS
from keel.inventory.settings import InventorySettings
from keel.inventory.tables import OUTBOX

log = logging.getLogger("keel.inventory")


async def sweep_expired_holds(database: Database, every: float) -> None:
    """Return expired holds' stock, every ``every`` seconds, in every process (each hold once)."""
    while True:
        try:
            while await database.run_read(service.any_due):
                if await database.run_write(service.expire_due) < service.SWEEP_ROWS:
                    break
        except Exception as exc:  # the database may be down: try again next round
            log.warning("expiry sweep failed: %r", exc)
        await asyncio.sleep(every)


@asynccontextmanager
async def inventory_workers(plat: Platform) -> AsyncIterator[None]:
    settings = plat.settings
    assert isinstance(settings, InventorySettings)
    purchases = purchase_committer(plat.database, plat.idempotency.store, settings.max_batch)
    purchases.start()
    plat.services["purchases"] = purchases
    plat.add_readiness_check(purchases.unready)
    sweeper = asyncio.create_task(sweep_expired_holds(plat.database, settings.sweep_every_seconds))
    try:
        yield
    finally:
        sweeper.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await sweeper
        await purchases.stop()


SPEC = ServiceSpec(
    name="inventory",
    title="inventory",
    description="Flash sales: never oversold, never undersold, across processes and servers.",
    routers=[router],
    migrations=MIGRATIONS,
    fast_routes=[FastRoute("POST", "/purchase", log_every=10)],
    workers=inventory_workers,
    outbox=OUTBOX,
)


def create_app(settings: InventorySettings | None = None) -> FastAPI:
    return create_service_app(SPEC, settings or InventorySettings())
