"""Load for the inventory's flash sale: many shoppers buying one item, over its raw HTTP API.

    KEEL_API_KEY=… KEEL_ITEM_ID=… uvx locust -f loadtest/inventory_locustfile.py \\
        --host http://127.0.0.1:8001 --users 500 --spawn-rate 100

Reads from the environment:

* ``KEEL_API_KEY``: a key with the write scope (``keel apikey create --scope write --service
  inventory``; ``make run`` prints a dev admin key). Required.
* ``KEEL_ITEM_ID``: the item on sale. Make one with an admin key, e.g.
  ``curl -H "Authorization: Bearer $KEY" -d '{"sku": "drop-1", "name": "Drop", "stock": 100}'
  -H 'Content-Type: application/json' http://127.0.0.1:8001/items``. Required.
* ``KEEL_LOCUST_HOLD_WEIGHT``: how many hold-then-confirm-or-release shoppers per direct buyer
  (default 0: everyone buys at once).

Each shopper is a user id of its own and sends every purchase with a fresh ``Idempotency-Key``.
A 201 and a 409 ``sold_out`` / ``limit_exceeded`` are both correct answers and count as
successes (named apart, so the split shows in the table); anything else (5xx, 429, a dropped
connection) is a failure with its status and code. Once the item is sold out every purchase is a
fast 409: restock it (``POST /items/{id}/restock``) to keep selling. Whether the sale was ever
oversold is not locust's to judge: ``keel prove inventory`` checks that from the database.
"""

from __future__ import annotations

import os
import random
import uuid
from typing import Any

from locust import HttpUser, between, task

API_KEY = os.environ.get("KEEL_API_KEY", "")
ITEM_ID = int(os.environ.get("KEEL_ITEM_ID", "0"))
HOLD_WEIGHT = max(0, int(os.environ.get("KEEL_LOCUST_HOLD_WEIGHT", "0")))
REFUSALS = {"sold_out", "limit_exceeded"}


def code_of(reply: Any) -> str:
    try:
        return str(reply.json().get("code", ""))
    except ValueError:
        return ""


class Shopper(HttpUser):
    """One shopper refreshing the drop page and buying the moment it opens."""

    wait_time = between(0.0, 0.05)

    def on_start(self) -> None:
        if not API_KEY or not ITEM_ID:
            raise RuntimeError("set KEEL_API_KEY (write scope) and KEEL_ITEM_ID (the item on sale)")
        self.client.headers["Authorization"] = f"Bearer {API_KEY}"
        self.user_id = f"locust-{uuid.uuid4().hex[:12]}"

    def _judged(self, reply: Any, expected: int, name: str) -> None:
        code = code_of(reply) if reply.status_code >= 400 else ""
        if reply.status_code == expected:
            reply.success()
        elif reply.status_code == 409 and code in REFUSALS:
            reply.request_meta["name"] = f"{name} [409 {code}]"
            reply.success()
        else:
            reply.failure(f"{reply.status_code} {code}")

    @task(1)
    def buy(self) -> None:
        with self.client.post(
            "/purchase",
            json={"item_id": ITEM_ID, "user_id": self.user_id},
            headers={"Idempotency-Key": str(uuid.uuid4())},
            name="/purchase",
            catch_response=True,
        ) as reply:
            self._judged(reply, 201, "/purchase")

    @task(HOLD_WEIGHT)
    def hold_then_decide(self) -> None:
        with self.client.post(
            "/reservations",
            json={"item_id": ITEM_ID, "user_id": self.user_id, "ttl_seconds": 60},
            name="/reservations",
            catch_response=True,
        ) as reply:
            self._judged(reply, 201, "/reservations")
            if reply.status_code != 201:
                return
            held = reply.json()["reservation_id"]
        if random.random() < 0.5:
            with self.client.post(
                f"/reservations/{held}/confirm",
                headers={"Idempotency-Key": str(uuid.uuid4())},
                name="/reservations/{id}/confirm",
                catch_response=True,
            ) as reply:
                self._judged(reply, 201, "/reservations/{id}/confirm")
        else:
            with self.client.delete(
                f"/reservations/{held}", name="/reservations/{id}", catch_response=True
            ) as reply:
                self._judged(reply, 204, "/reservations/{id}")
