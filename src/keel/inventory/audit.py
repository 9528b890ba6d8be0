"""The stock audit: every item's counts checked against the orders and holds that explain them.

``keel inventory audit``, ``keel prove inventory`` and the bench run it on the database itself,
never on what the HTTP replies said.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from sqlalchemy import func, select
from sqlalchemy.engine import Connection

from keel.inventory.tables import items, orders, reservations


@dataclass
class StockAudit:
    items_checked: int = 0
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def audit_stock(conn: Connection) -> StockAudit:
    """Per item: the invariant, ``sold`` = placed orders, ``reserved`` = held reservations."""
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
    return report
