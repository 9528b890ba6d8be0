"""The flash sale's verdict, read from the database and held against what the buyers were told.

Every check reads the rows the service wrote (the item's counters, its orders, holds, per-user
holdings and outbox events), never the HTTP replies alone: a reply can only be checked against
the database, not trusted instead of it.
"""

from __future__ import annotations

import json
from collections import Counter, defaultdict
from dataclasses import dataclass
from typing import Any

from sqlalchemy import select

from keel.core.database import Database, create_engine
from keel.core.outbox.tables import events
from keel.inventory.flash_sale import Answer, Buyer, Role
from keel.inventory.tables import holdings, items, orders, reservations

ALLOWED = {"purchase": {201}, "hold": {201}, "confirm": {201}, "release": {204}}


@dataclass(frozen=True)
class Check:
    name: str
    ok: bool
    detail: str


@dataclass
class SaleState:
    """The item's rows as the database holds them after the sale."""

    item: Any
    orders: list[Any]
    reservations: list[Any]
    holdings: dict[str, int]
    announced: Counter[int]  # order id -> order.placed events naming it

    @property
    def placed(self) -> list[Any]:
        return [o for o in self.orders if o.state == "placed"]


async def read_sale(database_url: str, item_id: int) -> SaleState:
    database = Database(create_engine(database_url))
    try:
        async with database.read() as conn:
            item = (await conn.execute(select(items).where(items.c.id == item_id))).one()
            sold = (await conn.execute(select(orders).where(orders.c.item_id == item_id))).all()
            held = await conn.execute(select(reservations).where(reservations.c.item_id == item_id))
            owned = await conn.execute(
                select(holdings.c.user_id, holdings.c.quantity).where(holdings.c.item_id == item_id)
            )
            payloads = await conn.execute(
                select(events.c.payload).where(
                    events.c.service == "inventory", events.c.event_type == "order.placed"
                )
            )
            announced: Counter[int] = Counter()
            for (payload,) in payloads:
                data = json.loads(payload)
                if data.get("item_id") == item_id:
                    announced[data["order_id"]] += 1
            return SaleState(item, list(sold), list(held.all()), dict(owned.all()), announced)
    finally:
        await database.dispose()


def expected_sold(buyers: list[Buyer], stock: int, max_per_user: int | None) -> int:
    """Units the sale must sell, no more and no fewer: every wanting buyer's unit while stock
    lasts, at most ``max_per_user`` of them per user."""
    wanting = Counter(b.user_id for b in buyers if b.role.wants_unit)
    demand = sum(min(n, max_per_user or n) for n in wanting.values())
    return min(stock, demand)


def judge(
    buyers: list[Buyer],
    answers: list[Answer],
    state: SaleState,
    stock: int,
    max_per_user: int | None,
    retries: bool,
) -> list[Check]:
    """Every invariant of the sale, each as one :class:`Check`."""
    item, placed = state.item, state.placed
    sold_units = sum(o.quantity for o in placed)
    expected = expected_sold(buyers, stock, max_per_user)
    checks = [
        _answered(buyers, answers),
        _no_server_errors(answers),
        Check(
            "never oversold, never undersold",
            sold_units == item.sold == expected,
            f"expected {expected}; orders hold {sold_units} in {len(placed)} orders;"
            f" item.sold = {item.sold}",
        ),
        Check(
            "stock conserved",
            item.available == stock - item.sold - item.reserved
            and item.available + item.reserved + item.sold == item.initial + item.restocked
            and min(item.available, item.reserved, item.sold) >= 0,
            f"available {item.available} + reserved {item.reserved} + sold {item.sold}"
            f" = initial {item.initial} + restocked {item.restocked}",
        ),
        Check(
            "no hold left behind",
            item.reserved == 0 and not [r for r in state.reservations if r.state == "held"],
            f"reserved {item.reserved}",
        ),
        _per_user(state, max_per_user),
        *_acknowledged(answers, state),
        _announced(state),
    ]
    if retries:
        checks.append(_retries(answers))
    if any(b.role is not Role.BUY for b in buyers):
        checks.append(_holds(buyers, answers, state))
    return checks


def _answered(buyers: list[Buyer], answers: list[Answer]) -> Check:
    wrong = [
        a
        for a in answers
        if a.status not in ALLOWED[a.kind] and not (a.kind in ("purchase", "hold") and a.refused)
    ]
    seen = {a.buyer for a in answers}
    unheard = [b.index for b in buyers if b.index not in seen]
    sample = ", ".join(f"{a.kind} {a.status} {a.code or a.error or ''}" for a in wrong[:3])
    return Check(
        "every buyer answered: 201, or 409 sold_out / limit_exceeded",
        not wrong and not unheard,
        f"{len(answers)} answers to {len(buyers)} buyers; {len(wrong)} other"
        + (f" ({sample})" if sample else ""),
    )


def _no_server_errors(answers: list[Answer]) -> Check:
    failed = [a for a in answers if a.status is None or a.status >= 500]
    resent = sum(a.resent for a in answers)
    return Check(
        "no 5xx, no request left unanswered",
        not failed,
        f"{len(failed)} failed; {resent} dropped connections resent under the same key",
    )


def _per_user(state: SaleState, max_per_user: int | None) -> Check:
    owned: Counter[str] = Counter()
    for order in state.placed:
        owned[order.user_id] += order.quantity
    most = max(owned.values(), default=0)
    if max_per_user is None:
        return Check("per-user limit (none set)", True, f"most bought by one user: {most}")
    # Holdings count held and bought units; the holds are all settled by now.
    matches = {u: n for u, n in state.holdings.items() if n} == dict(owned)
    return Check(
        f"nobody holds more than max_per_user = {max_per_user}",
        most <= max_per_user and matches,
        f"most bought by one user: {most}; holdings match orders: {matches}",
    )


def _acknowledged(answers: list[Answer], state: SaleState) -> list[Check]:
    told = {a.order_id for a in answers if a.status == 201 and a.order_id is not None}
    stored = {o.id for o in state.orders}
    missing, unreported = told - stored, stored - told
    return [
        Check(
            "every 201 is an order in the database",
            not missing,
            f"{len(told)} orders acknowledged; {len(missing)} missing",
        ),
        Check(
            "no order that no 201 reported",
            not unreported,
            f"{len(stored)} orders stored; {len(unreported)} never acknowledged",
        ),
    ]


def _announced(state: SaleState) -> Check:
    ids = {o.id for o in state.orders}
    wrong = [i for i in ids if state.announced[i] != 1] + [
        i for i in state.announced if i not in ids
    ]
    return Check("each order published once (order.placed)", not wrong, f"{len(wrong)} orders off")


def _retries(answers: list[Answer]) -> Check:
    by_buyer: dict[int, set[int]] = defaultdict(set)
    for a in answers:
        if a.kind == "purchase" and a.order_id is not None:
            by_buyer[a.buyer].add(a.order_id)
    twice = [b for b, ids in by_buyer.items() if len(ids) > 1]
    replays = sum(a.replayed for a in answers)
    return Check(
        "a retry under the same Idempotency-Key places no second order",
        not twice,
        f"{replays} replies replayed; {len(twice)} buyers with two orders",
    )


def _holds(buyers: list[Buyer], answers: list[Answer], state: SaleState) -> Check:
    """Each hold ended as its buyer's script said: confirmed into its order, released, expired."""
    want = {
        Role.HOLD_CONFIRM: "confirmed",
        Role.HOLD_RELEASE: "released",
        Role.HOLD_EXPIRE: "expired",
    }
    role = {b.index: b.role for b in buyers}
    made = {a.reservation_id: a.buyer for a in answers if a.kind == "hold" and a.status == 201}
    rows = {r.id: r for r in state.reservations}
    wrong = [rid for rid, b in made.items() if rid not in rows or rows[rid].state != want[role[b]]]
    confirmed = {a.buyer: a.order_id for a in answers if a.kind == "confirm" and a.status == 201}
    linked = all(
        rows[rid].order_id == confirmed.get(b)
        for rid, b in made.items()
        if role[b] is Role.HOLD_CONFIRM and rid in rows
    )
    states = Counter(r.state for r in state.reservations)
    return Check(
        "every hold confirmed, released or expired as its buyer did",
        not wrong and linked and set(rows) == set(made),
        ", ".join(f"{n} {s}" for s, n in sorted(states.items())) or "no holds made",
    )
