"""The flash sale proven against real servers, through the code of ``keel prove inventory``.

Each test starts real ``keel serve inventory`` processes (several workers, sometimes two servers
on one database, as two hosts), fires the buyers at once over HTTP, and judges the sale from the
database: never oversold, never undersold, every 201 an order and every order a 201.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest
from typer.testing import CliRunner

from keel.cli import app
from keel.inventory.flash_sale import Answer, Buyer, FlashSale, SaleRecord, Shop, plan_buyers
from keel.inventory.proof import SERVER_ENV, ProofResult, Sale, SalePlan, prepare_sale, run_proof
from keel.inventory.sale_audit import judge, read_sale
from keel.serving import ServiceProcess
from tests import backends

pytestmark = pytest.mark.slow

runner = CliRunner()
postgres_only = pytest.mark.parametrize("backend", ["postgres"], indirect=True)


@pytest.fixture
def fresh_postgres(backend: str) -> Iterator[str]:
    """A new empty PostgreSQL database of the test's own (the proof migrates it)."""
    url = asyncio.run(backends.create_postgres_database())
    yield url
    asyncio.run(backends.drop_postgres_database(url))


def assert_proven(result: ProofResult) -> None:
    failed = [f"{c.name}: {c.detail}" for c in result.checks if not c.ok]
    assert failed == []


def placed_orders(result: ProofResult) -> int:
    return sum(a.status == 201 and not a.replayed for a in result.record.answers)


def test_keel_prove_inventory_on_sqlite_with_4_processes() -> None:
    done = runner.invoke(app, ["prove", "inventory", "--buyers", "1000", "--stock", "100"])
    assert done.exit_code == 0, done.output
    assert "PROVEN: every invariant holds" in done.output
    assert "1000 buyers answered in" in done.output
    assert "✗" not in done.output
    assert "purchases served per server process:" in done.output


@postgres_only
def test_1000_buyers_100_units_4_processes_on_postgres(fresh_postgres: str) -> None:
    result = run_proof(SalePlan(buyers=1000, stock=100, processes=4, database_url=fresh_postgres))
    assert_proven(result)
    assert placed_orders(result) == 100
    assert len(result.purchases_by_process) >= 2, "the race ran in several processes"


@postgres_only
def test_two_servers_share_one_postgres_database(fresh_postgres: str) -> None:
    result = run_proof(
        SalePlan(buyers=1000, stock=100, processes=2, servers=2, database_url=fresh_postgres)
    )
    assert_proven(result)
    assert placed_orders(result) == 100
    assert len(result.purchases_by_process) >= 2, "several processes sold"


def test_every_buyer_retrying_under_one_key_still_places_exactly_100_orders() -> None:
    result = run_proof(SalePlan(buyers=1000, stock=100, processes=2, retries=True))
    assert_proven(result)
    purchases = [a for a in result.record.answers if a.kind == "purchase"]
    assert len(purchases) == 2000
    assert placed_orders(result) == 100
    # Every acknowledged purchase was acknowledged twice, the second time as a replay.
    assert sum(a.status == 201 and a.replayed for a in purchases) == 100


def test_100_users_trying_5_times_never_get_more_than_2_each() -> None:
    result = run_proof(SalePlan(buyers=500, users=100, stock=1000, max_per_user=2, processes=2))
    assert_proven(result)
    assert placed_orders(result) == 200  # each of the 100 users got exactly 2
    refused = {a.code for a in result.record.answers if a.status == 409}
    assert refused == {"limit_exceeded"}


def test_holds_confirmed_released_and_lapsed_leave_nothing_unsold() -> None:
    result = run_proof(SalePlan(buyers=300, stock=50, processes=2, with_reservations=True))
    assert_proven(result)
    kinds = {a.kind for a in result.record.answers}
    assert kinds >= {"purchase", "hold"}


KILL_AFTER = 40  # acknowledged purchases seen before the kill


async def _sell_until_killed(server: ServiceProcess, sale: Sale, buyers: list[Buyer]) -> SaleRecord:
    acknowledged = 0
    enough = asyncio.Event()

    def counted(answer: Answer) -> None:
        nonlocal acknowledged
        acknowledged += answer.status == 201
        if acknowledged >= KILL_AFTER:
            enough.set()

    shop = Shop([server.base_url], sale.api_key, 200)
    try:
        await shop.open_connections()
        flash = FlashSale(shop, sale.item_id, on_answer=counted, resends=0)
        selling = asyncio.create_task(flash.run(buyers, lambda _: None))
        await asyncio.wait_for(enough.wait(), 120)
        server.kill()  # SIGKILL to every process of the server, purchases in flight
        return await asyncio.wait_for(selling, 120)
    finally:
        await shop.aclose()


async def _resend(server: ServiceProcess, sale: Sale, buyers: list[Buyer]) -> SaleRecord:
    shop = Shop([server.base_url], sale.api_key, 100)
    try:
        return await FlashSale(shop, sale.item_id).run(buyers, lambda _: None)
    finally:
        await shop.aclose()


def test_kill_9_under_purchase_load_loses_no_acknowledged_order(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'inventory.db'}"
    sale = asyncio.run(prepare_sale(url, stock=300, max_per_user=None))
    buyers = plan_buyers(1000, 1000, sale.run, with_reservations=False)
    server = ServiceProcess("inventory", url, tmp_path, workers=2, env=SERVER_ENV).start()
    try:
        killed = asyncio.run(_sell_until_killed(server, sale, buyers))
        cut = {a.buyer for a in killed.answers if a.status is None}
        assert cut, "the kill should have cut purchases off mid-flight"

        # Straight after the crash: every 201 is an order, and the stock adds up.
        state = asyncio.run(read_sale(url, sale.item_id))
        answered = [a for a in killed.answers if a.buyer not in cut]
        checks = {c.name: c for c in judge(buyers, answered, state, 300, None, False)}
        for name in ("every 201 is an order in the database", "stock conserved"):
            assert checks[name].ok, checks[name].detail

        # A new server on the same database; the cut-off buyers resend under their keys: a
        # purchase that committed before the kill is replayed, one that did not runs now.
        server.start()
        resent = asyncio.run(_resend(server, sale, [b for b in buyers if b.index in cut]))
        state = asyncio.run(read_sale(url, sale.item_id))
    finally:
        server.stop()
    verdict = judge(buyers, answered + resent.answers, state, 300, None, False)
    assert [f"{c.name}: {c.detail}" for c in verdict if not c.ok] == []
    assert len(state.placed) == 300
