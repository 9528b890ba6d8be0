"""``keel prove inventory``'s engine: a real flash sale against real servers, judged from the
database.

1. The database: a fresh SQLite file in a temporary directory, or the one given, migrated.
2. An admin key and one new item with the stock (and per-user limit) asked for.
3. ``servers`` separate ``keel serve inventory --workers <processes>`` on free ports, all on that
   one database, as separate hosts would be.
4. Every buyer at once, round-robin over the servers (:mod:`keel.inventory.flash_sale`); with
   reservations, once the holds have settled, the buyers refused meanwhile try once more.
5. The verdict from the database (:mod:`keel.inventory.sale_audit`); the key is revoked.
"""

from __future__ import annotations

import asyncio
import contextlib
import tempfile
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from sqlalchemy import update

from keel.core import migrate
from keel.core.auth import Scope, create_api_key
from keel.core.database import Database, create_engine
from keel.core.tables import api_keys
from keel.inventory import service
from keel.inventory.flash_sale import Buyer, FlashSale, SaleRecord, Shop, plan_buyers
from keel.inventory.flash_sale import wanting_refused as refused_meanwhile
from keel.inventory.registration import MIGRATIONS, SERVICE
from keel.inventory.sale_audit import Check, SaleState, judge, read_sale
from keel.inventory.schemas import ItemCreate
from keel.serving import ServiceProcess, wait_until

# The proof is about stock, not about the per-key rate limit all its buyers share.
SERVER_ENV = {"KEEL_INVENTORY_RATE_LIMIT": "1000000/second", "KEEL_INVENTORY_ACCESS_LOG": "false"}
SETTLE_SECONDS = 30.0  # how long lapsed holds may take to be swept back into stock


@dataclass(frozen=True)
class SalePlan:
    """What to prove: how many buyers, how much stock, how many servers and processes."""

    buyers: int = 1000
    stock: int = 100
    processes: int = 4
    servers: int = 1
    database_url: str | None = None  # None: a fresh SQLite file in a temporary directory
    max_per_user: int | None = None
    users: int | None = None  # None: every buyer is a user of their own
    with_reservations: bool = False
    retries: bool = False
    # Kept-alive HTTP connections across all servers, opened before the clock starts. The lean
    # client (keel.inventory.lean_http) spends ~0.1-0.2 ms of CPU a request, so the sale measures
    # the server; 200 keep all four processes busy (each listens on a socket of its own, and the
    # kernel spreads the connections over them: keel.listen).
    connections: int = 200


@dataclass
class Sale:
    """A prepared sale: where, with which key, on which item."""

    database_url: str
    api_key: str
    item_id: int
    run: str = field(default_factory=lambda: uuid.uuid4().hex[:8])


@dataclass
class ProofResult:
    plan: SalePlan
    sale: Sale
    checks: list[Check]
    record: SaleRecord
    purchases_by_process: list[int]  # purchases each server process served, most first

    @property
    def ok(self) -> bool:
        return all(c.ok for c in self.checks)


class Observer:
    """What the proof reports while it runs; the CLI draws it, tests ignore it."""

    def status(self, text: str) -> None:
        """A new phase has begun."""

    def buyer_done(self, done: int, total: int) -> None:
        """One more buyer's script has ended."""


async def prepare_sale(database_url: str, stock: int, max_per_user: int | None) -> Sale:
    """Migrate the database, then make an admin key and a new item there."""
    await migrate.upgrade(database_url, [MIGRATIONS])
    database = Database(create_engine(database_url))
    run = uuid.uuid4().hex[:8]
    body = ItemCreate(
        sku=f"prove-{run}", name="keel prove flash sale", stock=stock, max_per_user=max_per_user
    )
    try:
        async with database.write() as conn:
            key = await create_api_key(conn, scope=Scope.ADMIN, name=f"keel prove {run}")
            item = await conn.run_sync(service.create_item, body)
    finally:
        await database.dispose()
    return Sale(database_url, key, item.id, run)


async def revoke_key(sale: Sale) -> None:
    database = Database(create_engine(sale.database_url))
    try:
        async with database.write() as conn:
            await conn.execute(
                update(api_keys)
                .where(api_keys.c.prefix == sale.api_key[:13])
                .values(revoked_at=datetime.now(UTC))
            )
    finally:
        await database.dispose()


def start_servers(sale: Sale, plan: SalePlan, workdir: Path) -> list[ServiceProcess]:
    """``plan.servers`` servers on the sale's database, started side by side."""
    servers = [
        ServiceProcess(SERVICE.name, sale.database_url, workdir, plan.processes, SERVER_ENV)
        for _ in range(plan.servers)
    ]
    with ThreadPoolExecutor(max_workers=len(servers)) as pool:
        started = [pool.submit(server.start) for server in servers]
    try:
        for future in started:
            future.result()
    except BaseException:
        for server in servers:
            server.stop()
        raise
    return servers


async def sell(
    sale: Sale, plan: SalePlan, buyers: list[Buyer], urls: list[str], observer: Observer
) -> SaleRecord:
    """Run every buyer; with holds, wait until they settle and let the refused try again."""
    done = 0

    def finished(_: Buyer) -> None:
        nonlocal done
        done += 1
        observer.buyer_done(done, len(buyers))

    shop = Shop(urls, sale.api_key, min(plan.buyers, plan.connections))
    try:
        await shop.open_connections()
        flash = FlashSale(shop, sale.item_id, retries=plan.retries)
        record = await flash.run(buyers, finished)
        if plan.with_reservations:
            observer.status("waiting for lapsed holds to return to stock")
            await settled(sale)
            again = refused_meanwhile(buyers, record.answers)
            observer.status(f"{len(again)} refused buyers try again")
            await asyncio.gather(*(flash.purchase(b, f"{b.key}-again") for b in again))
        return record
    finally:
        await shop.aclose()


async def settled(sale: Sale) -> SaleState:
    """Wait (polling, with a deadline) until no unit of the item is held."""
    deadline = time.monotonic() + SETTLE_SECONDS
    while True:
        state = await read_sale(sale.database_url, sale.item_id)
        if state.item.reserved == 0:
            return state
        if time.monotonic() > deadline:
            raise TimeoutError(f"{state.item.reserved} units still held after {SETTLE_SECONDS} s")
        await asyncio.sleep(0.1)


def purchases_served(servers: list[ServiceProcess], record: SaleRecord) -> list[int]:
    """How many purchases each server process served: evidence the race really ran in many."""
    answered = sum(a.kind == "purchase" and a.status is not None for a in record.answers)

    def counts() -> list[int]:
        served = (s.requests_served("POST", "/purchase") for s in servers)
        return sorted((int(n) for each in served for n in each.values()), reverse=True)

    with contextlib.suppress(TimeoutError):  # a count that lags is shown as it stands
        wait_until(lambda: sum(counts()) >= answered, 10, "the purchase counts")
    return counts()


def run_proof(plan: SalePlan, observer: Observer | None = None) -> ProofResult:
    """Prepare, serve, sell and judge (see the module docstring)."""
    observer = observer or Observer()
    with tempfile.TemporaryDirectory(prefix="keel-prove-") as tmp:
        workdir = Path(tmp)
        url = plan.database_url or f"sqlite:///{workdir / 'inventory.db'}"
        observer.status("migrating, creating the item")
        sale = asyncio.run(prepare_sale(url, plan.stock, plan.max_per_user))
        observer.status(f"starting {plan.servers} server(s) x {plan.processes} process(es)")
        servers = start_servers(sale, plan, workdir)
        try:
            users = plan.users or plan.buyers
            buyers = plan_buyers(plan.buyers, users, sale.run, plan.with_reservations)
            observer.status(f"{plan.buyers} buyers")
            urls = [s.base_url for s in servers]
            record = asyncio.run(sell(sale, plan, buyers, urls, observer))
            by_process = purchases_served(servers, record)
        finally:
            for server in servers:
                server.stop()
        observer.status("checking the database")
        state = asyncio.run(settled(sale))
        asyncio.run(revoke_key(sale))
    checks = judge(buyers, record.answers, state, plan.stock, plan.max_per_user, plan.retries)
    return ProofResult(plan, sale, checks, record, by_process)
