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

import httpx

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
    """HTTP clients for the servers: many small pools, each bound to one server.

    One httpx pool with hundreds of connections spends more time choosing a connection than the
    server spends answering (measured on two cores: 1,000 requests over one pool of 100
    connections took several times as long as over ten pools of 10), so connections are spread
    over many clients.
    """

    POOL = 10  # connections per client

    def __init__(self, base_urls: list[str], api_key: str, connections: int) -> None:
        count = max(len(base_urls), connections // self.POOL)
        self.clients = [
            httpx.AsyncClient(
                base_url=base_urls[i % len(base_urls)],
                headers={"Authorization": f"Bearer {api_key}"},
                # Never reuse a connection idle long enough that the server (uvicorn: 5 s) may
                # be closing it: that race drops the request with a ReadError.
                limits=httpx.Limits(
                    max_connections=self.POOL, max_keepalive_connections=None, keepalive_expiry=2
                ),
                timeout=httpx.Timeout(60.0, pool=None),
            )
            for i in range(count)
        ]

    def for_buyer(self, buyer: Buyer) -> httpx.AsyncClient:
        """Buyers go round-robin over the clients, and so over the servers."""
        return self.clients[buyer.index % len(self.clients)]

    async def open_connections(self) -> None:
        """Open every connection before the sale starts, as shoppers wait on an open page."""

        async def touch(client: httpx.AsyncClient) -> None:
            # /health, not /ready: a thousand readiness checks at once would queue on the
            # database pool; any reply at all means the connection is open.
            await asyncio.gather(*(client.get("/health") for _ in range(self.POOL)))

        await asyncio.gather(*(touch(client) for client in self.clients))

    async def aclose(self) -> None:
        await asyncio.gather(*(client.aclose() for client in self.clients))


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
        client = self.shop.for_buyer(buyer)
        repeatable = key is not None or method == "DELETE"
        resent = 0
        while True:
            try:
                reply = await client.request(method, path, json=body, headers=headers)
            except httpx.TransportError as exc:
                if repeatable and resent < self.resends:
                    resent += 1
                    continue
                answer = Answer(buyer.index, kind, None, error=f"{type(exc).__name__}: {exc}")
            else:
                answer = _answer(buyer, kind, reply)
            break
        answer.resent = resent
        self.record.answers.append(answer)
        if self.on_answer is not None:
            self.on_answer(answer)
        return answer


def _answer(buyer: Buyer, kind: str, reply: httpx.Response) -> Answer:
    answer = Answer(buyer.index, kind, reply.status_code)
    answer.replayed = reply.headers.get("idempotent-replayed") == "true"
    if reply.status_code == 204:
        return answer
    try:
        data = reply.json()
    except ValueError:
        answer.error = reply.text[:200]
        return answer
    if reply.status_code >= 400:
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
