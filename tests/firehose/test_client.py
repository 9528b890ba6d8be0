"""The firehose client against a fake collector that keeps the HTTP contract (collector.py).

Every wait is a ``flush()`` (or ``close()``) with a deadline; backoffs are a few milliseconds,
except where a test checks that ``Retry-After`` is honoured.
"""

from __future__ import annotations

import gzip
import json
import threading
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from keel.firehose import AsyncClient, Client
from keel.firehose.client import Backoff, ClientClosed, ClientStats, QueueFull
from tests.firehose.collector import (
    API_KEY,
    DEADLINE,
    MIB,
    Answer,
    Collector,
    gunzip,
    serving,
)

FAST = Backoff(base=0.005, max=0.02)


@pytest.fixture(scope="module")
def server() -> Iterator[Collector]:
    with serving(Collector()) as running:
        yield running


@pytest.fixture
def collector(server: Collector) -> Collector:
    """The module's collector, emptied (a server per test would cost more than the tests)."""
    server.reset()
    return server


class Errors:
    """An ``on_error`` callback that remembers what it was told."""

    def __init__(self) -> None:
        self.calls: list[tuple[list[dict[str, Any]], str, str]] = []

    def __call__(self, events: list[dict[str, Any]], code: str, detail: str) -> None:
        self.calls.append((events, code, detail))


def client(collector: Collector, **options: Any) -> Client:
    settings: dict[str, Any] = {"flush_interval": 60.0, "backoff": FAST} | options
    return Client(collector.url, API_KEY, **settings)


def test_ids_are_uuid7_and_kept_across_a_retry_after_502(collector: Collector) -> None:
    collector.plan(Answer(502, "outcome_unknown", store_first=True))
    with client(collector) as firehose:
        ids = [firehose.capture(f"user-{n}", "clicked") for n in range(3)]
        assert firehose.flush(DEADLINE)
        stats = firehose.stats
    assert all(i.version == 7 for i in ids)
    first, second = collector.attempts
    assert first.ids == second.ids == [str(i) for i in ids]
    assert (first.status, second.status) == (502, 202)
    assert all(collector.deliveries[str(i)] == 2 for i in ids)  # received twice...
    assert sorted(collector.stored) == sorted(str(i) for i in ids)  # ...stored once
    assert stats == ClientStats(queued=3, sent=3, rejected=0, retried=3, dropped=0)
    # sent_at is the time of each attempt, not of the first.
    assert second.events[0]["sent_at"] > first.events[0]["sent_at"]


def test_a_caller_supplied_event_id_is_kept(collector: Collector) -> None:
    mine = uuid.uuid4()
    with client(collector) as firehose:
        assert firehose.capture("user-1", event_id=str(mine)) == mine
    assert list(collector.stored) == [str(mine)]


@pytest.mark.parametrize(
    ("status", "code"), [(503, "buffer_full"), (429, "rate_limited")], ids=["503", "429"]
)
def test_retry_after_is_honoured(collector: Collector, status: int, code: str) -> None:
    collector.plan(Answer(status, code, retry_after="1"))
    with client(collector) as firehose:
        event_id = firehose.capture("user-1", "viewed")
        assert firehose.flush(DEADLINE)
    first, second = collector.attempts
    assert first.ids == second.ids == [str(event_id)]
    assert second.at - first.at >= 1.0
    assert str(event_id) in collector.stored


def test_batches_by_size(collector: Collector) -> None:
    with client(collector, batch_size=10) as firehose:
        for n in range(25):
            firehose.capture("user-1", f"step-{n}")
        assert firehose.flush(DEADLINE)
    assert [len(a.events) for a in collector.attempts] == [10, 10, 5]
    sent = [e["name"] for a in collector.attempts for e in a.events]
    assert sent == [f"step-{n}" for n in range(25)]  # in capture order


def test_sends_by_age_without_a_flush(collector: Collector) -> None:
    from tests.support.live_server import wait_until

    with client(collector, flush_interval=0.05) as firehose:
        firehose.capture("user-1")
        wait_until(lambda: len(collector.stored) == 1, DEADLINE, "the interval's batch")


def test_batches_are_gzipped_and_carry_sent_at(collector: Collector) -> None:
    with client(collector) as firehose:
        firehose.capture("user-1", "opened", timestamp=1_700_000_000.5, metadata={"a": [1, "é"]})
    (attempt,) = collector.attempts
    assert attempt.headers["content-encoding"] == "gzip"
    (event,) = gunzip(attempt.body)
    assert event["timestamp"] == 1_700_000_000.5
    assert event["metadata"] == {"a": [1, "é"]}
    assert isinstance(event["sent_at"], float) and event["sent_at"] > event["timestamp"]


def test_gzip_and_sent_at_can_be_turned_off(collector: Collector) -> None:
    with client(collector, gzip=False, send_at=False) as firehose:
        firehose.capture("user-1", timestamp="2026-11-26T08:00:00+00:00")
    (attempt,) = collector.attempts
    assert "content-encoding" not in attempt.headers
    assert json.loads(attempt.body) == attempt.events
    assert "sent_at" not in attempt.events[0]
    assert attempt.events[0]["timestamp"] == "2026-11-26T08:00:00+00:00"


def test_close_flushes(collector: Collector) -> None:
    with client(collector) as firehose:  # flush_interval=60: only close() can send these
        ids = {str(firehose.capture("user-1")) for _ in range(5)}
    assert set(collector.stored) == ids
    with pytest.raises(ClientClosed):
        firehose.capture("user-1")


def test_a_refused_batch_is_reported_and_not_retried(collector: Collector) -> None:
    errors = Errors()
    with Client(collector.url, "wrong-key", backoff=FAST, on_error=errors) as firehose:
        ids = [str(firehose.capture("user-1", f"e{n}")) for n in range(4)]
        assert firehose.flush(DEADLINE)
        stats = firehose.stats
    assert [a.status for a in collector.attempts] == [401]
    ((events, code, _),) = errors.calls
    assert code == "unauthorized"
    assert [e["event_id"] for e in events] == ids
    assert (stats.rejected, stats.sent, stats.retried) == (4, 0, 0)


def test_a_planned_400_is_not_retried(collector: Collector) -> None:
    errors = Errors()
    collector.plan(Answer(400, "invalid_body"))
    with client(collector, on_error=errors) as firehose:
        firehose.capture("user-1")
        assert firehose.flush(DEADLINE)
        assert firehose.stats.rejected == 1
    assert len(collector.attempts) == 1
    assert [code for _, code, _ in errors.calls] == ["invalid_body"]
    assert collector.stored == {}


def test_rejected_events_in_a_202_are_reported(collector: Collector) -> None:
    errors = Errors()
    with client(collector, on_error=errors) as firehose:
        good = firehose.capture("user-1", timestamp=1_700_000_000)
        bad = firehose.capture("user-1", timestamp="yesterday-ish")
        assert firehose.flush(DEADLINE)
        stats = firehose.stats
    assert list(collector.stored) == [str(good)]
    ((events, code, _),) = errors.calls
    assert (code, [e["event_id"] for e in events]) == ("invalid_timestamp", [str(bad)])
    assert (stats.sent, stats.rejected, stats.retried) == (1, 1, 0)


def test_a_batch_of_only_invalid_events_is_reported_once(collector: Collector) -> None:
    errors = Errors()
    with client(collector, on_error=errors) as firehose:
        firehose.capture("user-1", timestamp="not a time")
        firehose.capture("user-2", timestamp="nor this")
        assert firehose.flush(DEADLINE)
        assert firehose.stats.rejected == 2
    assert len(collector.attempts) == 1
    ((events, code, _),) = errors.calls
    assert (code, len(events)) == ("invalid_events", 2)


def test_gives_up_after_max_retries_and_reports_the_drop(collector: Collector) -> None:
    errors = Errors()
    collector.plan(*[Answer(500, "internal")] * 3)
    with client(collector, max_retries=2, on_error=errors) as firehose:
        firehose.capture("user-1")
        assert firehose.flush(DEADLINE)
        stats = firehose.stats
    assert len(collector.attempts) == 3
    assert (stats.dropped, stats.retried, stats.sent) == (1, 2, 0)
    ((_, code, detail),) = errors.calls
    assert code == "internal" and "3 attempts" in detail


def test_a_413_splits_the_batch_in_halves(collector: Collector) -> None:
    collector.plan(Answer(413, "payload_too_large"))
    with client(collector) as firehose:
        ids = {str(firehose.capture("user-1")) for _ in range(6)}
        assert firehose.flush(DEADLINE)
    assert [len(a.events) for a in collector.attempts] == [6, 3, 3]
    assert set(collector.stored) == ids


def test_close_gives_up_on_a_long_retry_after_and_reports_it(collector: Collector) -> None:
    errors = Errors()
    collector.plan(Answer(503, "buffer_full", retry_after="3600"))
    firehose = client(collector, on_error=errors)
    in_flight = firehose.capture("user-1")
    assert firehose.flush(timeout=0.2) is False  # waiting out the Retry-After
    waiting = firehose.capture("user-2")
    firehose.close(timeout=0.2)
    reported = sorted(e["event_id"] for events, code, _ in errors.calls for e in events)
    assert {code for _, code, _ in errors.calls} == {"client_closed"}
    assert reported == sorted([str(in_flight), str(waiting)])
    assert firehose.stats.dropped == 2
    assert len(collector.attempts) == 1


def test_queue_full_raises_and_queues_nothing(collector: Collector) -> None:
    with client(collector, max_queue=5, batch_size=100) as firehose:
        for _ in range(5):
            firehose.capture("user-1")
        with pytest.raises(QueueFull):
            firehose.capture("user-1")
        assert firehose.stats.queued == 5
    assert len(collector.stored) == 5


def test_big_events_are_split_under_one_mib(collector: Collector) -> None:
    blob = "x" * (30 * 1024)
    with client(collector, batch_size=100, gzip=False) as firehose:
        ids = {str(firehose.capture("user-1", metadata={"blob": blob})) for _ in range(80)}
        assert firehose.flush(DEADLINE)
    assert set(collector.stored) == ids
    assert len(collector.attempts) >= 3
    assert all(len(a.body) <= MIB for a in collector.attempts)


def test_an_event_too_big_to_send_alone_is_rejected_not_sent(collector: Collector) -> None:
    errors = Errors()
    with client(collector, on_error=errors) as firehose:
        firehose.capture("user-1", metadata={"blob": "x" * MIB})
        small = firehose.capture("user-1")
    assert list(collector.stored) == [str(small)]
    assert [code for _, code, _ in errors.calls] == ["event_too_large"]


def test_capture_from_many_threads(collector: Collector) -> None:
    ids: list[uuid.UUID] = []
    with client(collector, batch_size=50, flush_interval=0.01) as firehose:

        def capture_many() -> None:
            ids.extend(firehose.capture("user-1") for _ in range(200))

        threads = [threading.Thread(target=capture_many) for _ in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(DEADLINE)
        assert firehose.flush(DEADLINE)
    assert len(set(ids)) == 1600
    assert set(collector.stored) == {str(i) for i in ids}


def test_unsendable_events_fail_in_the_callers_stack(collector: Collector) -> None:
    with client(collector) as firehose:
        with pytest.raises(TypeError):
            firehose.capture("user-1", metadata={"when": object()})
        with pytest.raises(ValueError):
            firehose.capture("")
        with pytest.raises(ValueError):
            firehose.capture("user-1", event_id="not-a-uuid")
        assert firehose.stats.queued == 0


class FailFirst(httpx.AsyncBaseTransport):
    """A network that drops the first connection: the client cannot know what was stored."""

    def __init__(self, inner: httpx.AsyncBaseTransport) -> None:
        self.inner = inner
        self.failed = False

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        if not self.failed:
            self.failed = True
            raise httpx.ConnectError("connection reset", request=request)
        return await self.inner.handle_async_request(request)


async def test_async_client_sends_retries_and_closes() -> None:
    fake = Collector()
    fake.plan(Answer(502, "outcome_unknown", store_first=True))
    transport = FailFirst(httpx.ASGITransport(app=fake.app()))
    async with AsyncClient(
        fake.url, API_KEY, batch_size=10, flush_interval=60.0, backoff=FAST, transport=transport
    ) as firehose:
        ids = [firehose.capture("user-1", f"n{n}") for n in range(25)]
        await firehose.flush()
        stats = firehose.stats
        late = firehose.capture("user-2")  # sent by close()
    assert all(i.version == 7 for i in ids)
    assert set(fake.stored) == {str(i) for i in [*ids, late]}
    assert fake.attempts[0].ids == fake.attempts[1].ids  # the 502'd batch, re-sent as it was
    assert [len(a.events) for a in fake.attempts] == [10, 10, 10, 5, 1]
    assert (stats.sent, stats.retried) == (25, 20)  # 10 after the reset, 10 after the 502
    assert gzip.decompress(fake.attempts[0].body)


async def test_async_client_honours_retry_after() -> None:
    fake = Collector()
    fake.plan(Answer(503, "overloaded", retry_after="1"))
    transport = httpx.ASGITransport(app=fake.app())
    async with AsyncClient(fake.url, API_KEY, backoff=FAST, transport=transport) as firehose:
        firehose.capture("user-1")
        await firehose.flush()
    first, second = fake.attempts
    assert second.at - first.at >= 1.0
    assert first.ids == second.ids


async def test_async_close_gives_up_on_a_long_retry_after() -> None:
    fake, errors = Collector(), Errors()
    fake.plan(Answer(503, "buffer_full", retry_after="3600"))
    transport = httpx.ASGITransport(app=fake.app())
    firehose = AsyncClient(fake.url, API_KEY, on_error=errors, transport=transport)
    event_id = firehose.capture("user-1")
    await firehose.close(timeout=0.3)
    ((events, code, _),) = errors.calls
    assert (code, [e["event_id"] for e in events]) == ("client_closed", [str(event_id)])
    assert firehose.stats.dropped == 1


async def test_async_queue_full() -> None:
    fake = Collector()
    transport = httpx.ASGITransport(app=fake.app())
    async with AsyncClient(
        fake.url, API_KEY, max_queue=2, batch_size=10, flush_interval=60.0, transport=transport
    ) as firehose:
        firehose.capture("user-1")
        firehose.capture("user-1")
        with pytest.raises(QueueFull):
            firehose.capture("user-1")
    assert len(fake.stored) == 2
