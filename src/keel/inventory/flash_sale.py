"""The buyers of a flash sale, over real HTTP, and what each was told.

Every buyer wants one unit and runs one short script against the inventory's API: most buy at
once (``POST /purchase``); with reservations, some hold first and then confirm, release, or let a
one-second hold lapse. All of them start together, spread round-robin over the servers, on many
connections. Each reply is kept as an :class:`Answer`, so the proof can hold the database to
what the buyers were told (and never judge the service by its replies alone).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from keel.inventory.lean_http import Pool, Reply, TransportError

EXPIRING_HOLD_SECONDS = 1  # the shortest hold the API takes
REFUSALS = frozenset({"sold_out", "limit_exceeded"})


class Role(StrEnum):
    """What a buyer does; reservations give one buyer in ten each hold role."""

    BUY = "buy"
    HOLD_CONFIRM = "hold, then confirm"
    HOLD_RELEASE = "hold, then release"
    HOLD_EXPIRE = "hold, let it lapse"

    @property
    def wants_unit(self) -> bool:
        return self in (Role.BUY, Role.HOLD_CONFIRM)


@dataclass(frozen=True)
class Buyer:
    index: int
    user_id: str
    role: Role
    run: str  # makes Idempotency-Keys unique to one sale

    @property
    def key(self) -> str:
        return f"{self.run}-buyer-{self.index}"


def plan_buyers(buyers: int, users: int, run: str, with_reservations: bool) -> list[Buyer]:
    """``buyers`` buyers over ``users`` user ids (round-robin); with reservations one in ten
    holds and confirms, one holds and releases, one holds and lets the hold lapse."""
    holds = [Role.HOLD_CONFIRM, Role.HOLD_RELEASE, Role.HOLD_EXPIRE]
    return [
        Buyer(
            i,
            f"{run}-user-{i % users}",
            holds[i % 10] if with_reservations and i % 10 < len(holds) else Role.BUY,
            run,
        )
        for i in range(buyers)
    ]


@dataclass
class Answer:
    """One request a buyer sent and what came back; ``status`` None: no answer (the connection
    failed or the server died with the request in flight)."""

    buyer: int
    kind: str  # purchase | hold | confirm | release
    status: int | None
    code: str | None = None
    order_id: int | None = None
    reservation_id: int | None = None
    replayed: bool = False
    error: str | None = None
    resent: int = 0  # times the request was sent again after its connection dropped

    @property
    def refused(self) -> bool:
        return self.status == 409 and self.code in REFUSALS


@dataclass
class SaleRecord:
    """Everything the buyers were told, and when the first request left and the last answer came."""

    answers: list[Answer] = field(default_factory=list)
    started: float = 0.0
    finished: float = 0.0

    @property
    def seconds(self) -> float:
        return self.finished - self.started


class Shop:
    """The buyers' connections: one pool of kept-alive connections to each server.

    The client is :mod:`keel.inventory.lean_http`, not httpx: at about 3 ms of CPU a request,
    httpx spent more of the two cores than the server's four processes did, and the sale
    measured the client.
    """

    def __init__(self, base_urls: list[str], api_key: str, connections: int) -> None:
        headers = {"Authorization": f"Bearer {api_key}"}
        self.pools = [
            Pool(url, headers, max(1, (connections + i) // len(base_urls)))
            for i, url in enumerate(base_urls)
        ]

    def for_buyer(self, buyer: Buyer) -> Pool:
        """Buyers go round-robin over the servers."""
        return self.pools[buyer.index % len(self.pools)]

    async def open_connections(self) -> None:
        """Open every connection before the sale starts, as shoppers wait on an open page."""
        await asyncio.gather(*(pool.open() for pool in self.pools))

    async def aclose(self) -> None:
        await asyncio.gather(*(pool.aclose() for pool in self.pools))


class FlashSale:
    """Runs the buyers' scripts against one item and records every answer."""

    def __init__(
        self,
        shop: Shop,
        item_id: int,
        retries: bool = False,
        on_answer: Callable[[Answer], None] | None = None,
        resends: int = 2,
    ) -> None:
        self.shop = shop
        self.item_id = item_id
        self.retries = retries
        self.resends = resends
        self.on_answer = on_answer
        self.record = SaleRecord()

    async def run(self, buyers: list[Buyer], finished: Callable[[Buyer], None]) -> SaleRecord:
        """Start every buyer at once; ``finished`` is told as each buyer's script ends."""

        async def one(buyer: Buyer) -> None:
            await self.run_buyer(buyer)
            finished(buyer)

        self.record.started = time.perf_counter()
        await asyncio.gather(*(one(buyer) for buyer in buyers))
        self.record.finished = time.perf_counter()
        return self.record

    async def run_buyer(self, buyer: Buyer) -> None:
        if buyer.role is Role.BUY:
            await self.purchase(buyer, buyer.key)
            return
        ttl = EXPIRING_HOLD_SECONDS if buyer.role is Role.HOLD_EXPIRE else 300
        held = await self.send(
            buyer,
            "hold",
            "POST",
            "/reservations",
            {"item_id": self.item_id, "user_id": buyer.user_id, "ttl_seconds": ttl},
            key=f"{buyer.key}-hold",
        )
        if held.status != 201 or held.reservation_id is None:
            return
        if buyer.role is Role.HOLD_CONFIRM:
            path = f"/reservations/{held.reservation_id}/confirm"
            await self.send(buyer, "confirm", "POST", path, None, key=f"{buyer.key}-confirm")
        elif buyer.role is Role.HOLD_RELEASE:
            await self.send(buyer, "release", "DELETE", f"/reservations/{held.reservation_id}")

    async def purchase(self, buyer: Buyer, key: str) -> None:
        """One purchase; with retries sent twice under the same key, at once for even buyers
        and after the first answer for odd ones."""
        body = {"item_id": self.item_id, "user_id": buyer.user_id}

        async def send() -> None:
            await self.send(buyer, "purchase", "POST", "/purchase", body, key=key)

        if not self.retries:
            await send()
        elif buyer.index % 2 == 0:
            await asyncio.gather(send(), send())
        else:
            await send()
            await send()

    async def send(
        self,
        buyer: Buyer,
        kind: str,
        method: str,
        path: str,
        body: dict[str, Any] | None = None,
        key: str | None = None,
    ) -> Answer:
        """Send one request; a dropped connection is resent (up to ``resends`` times) when the
        request is safe to repeat: under its Idempotency-Key, or a release (idempotent)."""
        headers = {"Idempotency-Key": key} if key else {}
        pool = self.shop.for_buyer(buyer)
        repeatable = key is not None or method == "DELETE"
        resent = 0
        while True:
            try:
                reply = await pool.request(method, path, body, headers)
            except TransportError as exc:
                if repeatable and resent < self.resends:
                    resent += 1
                    continue
                answer = Answer(buyer.index, kind, None, error=str(exc))
            else:
                answer = _answer(buyer, kind, reply)
            break
        answer.resent = resent
        self.record.answers.append(answer)
        if self.on_answer is not None:
            self.on_answer(answer)
        return answer


def _answer(buyer: Buyer, kind: str, reply: Reply) -> Answer:
    answer = Answer(buyer.index, kind, reply.status)
    answer.replayed = reply.headers.get("idempotent-replayed") == "true"
    if reply.status == 204:
        return answer
    try:
        data = reply.json()
    except ValueError:
        answer.error = reply.body[:200].decode(errors="replace")
        return answer
    if reply.status >= 400:
        answer.code = data.get("code")
    else:
        answer.order_id = data.get("order_id")
        answer.reservation_id = data.get("reservation_id")
    return answer


def wanting_refused(buyers: list[Buyer], answers: list[Answer]) -> list[Buyer]:
    """Buyers who want a unit, have no order, and were refused: after the holds settle, stock a
    hold gave back may be theirs, so they try once more."""
    ordered = {a.buyer for a in answers if a.order_id is not None}
    refused = {a.buyer for a in answers if a.refused}
    return [b for b in buyers if b.role.wants_unit and b.index in refused - ordered]
