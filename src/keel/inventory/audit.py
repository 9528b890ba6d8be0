"""The stock audit: every item's counts checked against the orders and holds that explain them.

``keel inventory audit``, ``keel prove inventory`` and the bench run it on the database itself,
never on what the HTTP replies said.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from sqlalchemy import func, select
from sqlalchemy.engine import Connection

from keel.inventory.tables import holdings, items, orders, reservations


@dataclass
class StockAudit:
    items_checked: int = 0
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def audit_stock(conn: Connection) -> StockAudit:
    """Per item: the invariant, ``sold`` = placed orders, ``reserved`` = held reservations; per
    limited item and user: the holding."""
    report = StockAudit()
    placed = dict(
        conn.execute(
            select(orders.c.item_id, func.sum(orders.c.quantity))
            .where(orders.c.state == "placed")
            .group_by(orders.c.item_id)
        ).all()
    )
    held = dict(
        conn.execute(
            select(reservations.c.item_id, func.sum(reservations.c.quantity))
            .where(reservations.c.state == "held")
            .group_by(reservations.c.item_id)
        ).all()
    )
    for row in conn.execute(select(items)):
        report.items_checked += 1
        terms = (row.available, row.reserved, row.sold)
        if min(terms) < 0 or sum(terms) != row.initial + row.restocked:
            report.problems.append(
                f"item {row.id}: available {row.available} + reserved {row.reserved} + sold"
                f" {row.sold} != initial {row.initial} + restocked {row.restocked}"
            )
        if row.sold != int(placed.get(row.id) or 0):
            report.problems.append(
                f"item {row.id}: sold {row.sold} but placed orders hold {placed.get(row.id) or 0}"
            )
        if row.reserved != int(held.get(row.id) or 0):
            report.problems.append(
                f"item {row.id}: reserved {row.reserved} but holds total {held.get(row.id) or 0}"
            )
    _audit_holdings(conn, report)
    return report


def _audit_holdings(conn: Connection, report: StockAudit) -> None:
    """Per limited item and user: the holding = placed orders + held reservations, ≤ the limit.

    A holding that drifted up would refuse a buyer ``limit_exceeded`` (an undersell).
    """
    owed: dict[tuple[int, str], int] = {}
    for table, state in ((orders, "placed"), (reservations, "held")):
        rows = conn.execute(
            select(table.c.item_id, table.c.user_id, func.sum(table.c.quantity))
            .join(items, items.c.id == table.c.item_id)
            .where(table.c.state == state, items.c.max_per_user.is_not(None))
            .group_by(table.c.item_id, table.c.user_id)
        )
        for item_id, user_id, quantity in rows:
            owed[(item_id, user_id)] = owed.get((item_id, user_id), 0) + int(quantity)
    limits = dict(conn.execute(select(items.c.id, items.c.max_per_user)).all())
    held = {
        (row.item_id, row.user_id): row.quantity
        for row in conn.execute(select(holdings))
        if row.quantity or (row.item_id, row.user_id) in owed
    }
    for pair in sorted(set(owed) | set(held)):
        item_id, user_id = pair
        if held.get(pair, 0) != owed.get(pair, 0):
            report.problems.append(
                f"item {item_id}, user {user_id}: holding {held.get(pair, 0)} but orders and"
                f" holds total {owed.get(pair, 0)}"
            )
        limit = limits.get(item_id)
        if limit is not None and held.get(pair, 0) > limit:
            report.problems.append(
                f"item {item_id}, user {user_id}: holding {held[pair]} over the limit {limit}"
            )
