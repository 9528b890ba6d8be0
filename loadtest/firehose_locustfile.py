"""Load for the firehose's ingest path: single events and batches, over its raw HTTP API.

    uvx locust -f loadtest/firehose_locustfile.py --host http://127.0.0.1:8000

Reads from the environment:

* ``KEEL_API_KEY``: a key with the write scope (``keel apikey create --scope write``; ``make run``
  prints a dev admin key). Required.
* ``KEEL_LOCUST_BATCH_SIZE``: events per ``POST /events/batch`` (default 100, at most 1,000).
* ``KEEL_LOCUST_BATCH_WEIGHT``: how many batch requests per single-event request (default 1).

It speaks HTTP itself rather than through ``keel.firehose.Client``, so each locust request is one
ingest request and its latency is the server's. Event ids are fresh UUIDv7s (``keel.core.uuid7``
when keel is importable, as the client makes them; random UUIDs otherwise, which the server also
accepts, with a less sequential index). A 503 or 429 is counted as a failure with its code, so a
run shows where back-pressure starts.
"""

from __future__ import annotations

import json
import os
import random
import time
import uuid
from typing import Any

from locust import HttpUser, between, task

try:
    from keel.core.uuid7 import uuid7 as new_event_id
except ImportError:  # locust run outside keel's environment (uvx)
    new_event_id = uuid.uuid4

API_KEY = os.environ.get("KEEL_API_KEY", "")
BATCH_SIZE = min(1000, max(1, int(os.environ.get("KEEL_LOCUST_BATCH_SIZE", "100"))))
BATCH_WEIGHT = max(0, int(os.environ.get("KEEL_LOCUST_BATCH_WEIGHT", "1")))
NAMES = ("page_viewed", "button_clicked", "signed_up", "item_added", "checkout_started")


def event() -> dict[str, Any]:
    """One event as a device would send it: its own clock's timestamp and some metadata."""
    now = time.time()
    return {
        "event_id": str(new_event_id()),
        "user_id": f"user-{random.randrange(100_000)}",
        "name": random.choice(NAMES),
        "timestamp": now - random.uniform(0, 5),
        "sent_at": now,
        "metadata": {"path": f"/p/{random.randrange(1000)}", "ab": random.choice("AB")},
    }


class Device(HttpUser):
    """A client app reporting events: mostly batched, sometimes one at a time."""

    wait_time = between(0.0, 0.1)

    def on_start(self) -> None:
        if not API_KEY:
            raise RuntimeError("set KEEL_API_KEY to a firehose key with the write scope")
        self.client.headers["Authorization"] = f"Bearer {API_KEY}"

    @task(1)
    def send_one(self) -> None:
        with self.client.post("/events", json=event(), catch_response=True) as reply:
            if reply.status_code != 202:
                reply.failure(f"{reply.status_code} {code_of(reply)}")

    @task(BATCH_WEIGHT)
    def send_batch(self) -> None:
        body = json.dumps([event() for _ in range(BATCH_SIZE)])
        with self.client.post(
            "/events/batch",
            data=body,
            headers={"Content-Type": "application/json"},
            name=f"/events/batch [{BATCH_SIZE}]",
            catch_response=True,
        ) as reply:
            if reply.status_code != 202:
                reply.failure(f"{reply.status_code} {code_of(reply)}")
            elif reply.json().get("rejected"):
                reply.failure(f"rejected events: {reply.json()['rejected'][:3]}")


def code_of(reply: Any) -> str:
    """The problem+json ``code`` of an error reply, to group failures by cause."""
    try:
        return str(reply.json().get("code", ""))
    except ValueError:
        return ""
