"""The flash-sale verdict itself: each check fails when the database shows what it guards against.

``keel prove inventory`` is only worth its PROVEN if its checks can say VIOLATED; these feed the
judge database states no correct service could leave behind.
"""

from __future__ import annotations

from collections import Counter
from types import SimpleNamespace
from typing import Any

from keel.inventory.flash_sale import Answer, Buyer, Role, plan_buyers
from keel.inventory.sale_audit import SaleState, expected_sold, judge

BUYERS = plan_buyers(6, 6, "t", with_reservations=False)


def _state(sold: int, orders: list[Any], announced: list[int] | None = None) -> SaleState:
    item = SimpleNamespace(
        available=4 - sold, reserved=0, sold=sold, initial=4, restocked=0, max_per_user=None
    )
    ids = [o.id for o in orders] if announced is None else announced
    return SaleState(item, orders, [], {}, Counter(ids))


def _order(order_id: int, buyer: Buyer) -> Any:
    return SimpleNamespace(
        id=order_id, user_id=buyer.user_id, quantity=1, state="placed", reservation_id=None
    )


def _sale(granted: int) -> tuple[list[Answer], list[Any]]:
    answers = [Answer(b.index, "purchase", 201, order_id=b.index + 1) for b in BUYERS[:granted]]
    answers += [Answer(b.index, "purchase", 409, code="sold_out") for b in BUYERS[granted:]]
    return answers, [_order(b.index + 1, b) for b in BUYERS[:granted]]


def _failed(answers: list[Answer], state: SaleState, max_per_user: int | None = None) -> set[str]:
    return {c.name for c in judge(BUYERS, answers, state, 4, max_per_user, False) if not c.ok}


def test_a_correct_sale_passes() -> None:
    answers, orders = _sale(4)
    assert _failed(answers, _state(4, orders)) == set()


def test_oversold_undersold_and_unconserved_stock_fail() -> None:
    answers, orders = _sale(5)
    assert "never oversold, never undersold" in _failed(answers, _state(5, orders))
    answers, orders = _sale(3)
    assert "never oversold, never undersold" in _failed(answers, _state(3, orders))
    answers, orders = _sale(4)
    state = _state(4, orders)
    state.item.available = 1
    assert "stock conserved" in _failed(answers, state)


def test_orders_and_replies_must_match_both_ways() -> None:
    answers, orders = _sale(4)
    assert "every 201 is an order in the database" in _failed(answers, _state(4, orders[:3]))
    answers[0] = Answer(0, "purchase", 409, code="sold_out")
    assert "no order that no 201 reported" in _failed(answers, _state(4, orders))


def test_server_errors_unanswered_buyers_and_unpublished_orders_fail() -> None:
    answers, orders = _sale(4)
    answers[5] = Answer(5, "purchase", 503, code="overloaded")
    failed = _failed(answers, _state(4, orders))
    assert {"no 5xx, no request left unanswered"} <= failed
    assert "every buyer answered: 201, or 409 sold_out / limit_exceeded" in failed
    answers, orders = _sale(4)
    failed = _failed(answers[:5], _state(4, orders, announced=[1, 2, 3, 3]))
    assert "every buyer answered: 201, or 409 sold_out / limit_exceeded" in failed
    assert "each order published once (order.placed)" in failed


def test_the_per_user_limit_and_retries_are_checked() -> None:
    answers, orders = _sale(4)
    for order in orders:
        order.user_id = "same"
    assert "nobody holds more than max_per_user = 2" in _failed(answers, _state(4, orders), 2)
    twice = [*answers, Answer(0, "purchase", 201, order_id=99)]
    checks = judge(BUYERS, twice, _state(4, orders), 4, None, retries=True)
    assert not next(c for c in checks if c.name.startswith("a retry")).ok


def test_expected_sales_count_wanting_buyers_within_the_limit() -> None:
    buyers = plan_buyers(20, 4, "t", with_reservations=True)
    wanting = [b for b in buyers if b.role.wants_unit]
    assert {b.role for b in buyers} == set(Role)
    assert expected_sold(buyers, 100, None) == len(wanting)
    assert expected_sold(buyers, 100, 2) == 8  # 4 users, each wanting at least 2
    assert expected_sold(buyers, 3, 2) == 3
