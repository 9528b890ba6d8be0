"""The transactional outbox's webhook worker: a service's published events become signed POSTs.

A service publishes each event in the transaction of the change it announces
(:mod:`keel.core.outbox.publish`), so an event exists if and only if its change does.
:class:`OutboxWorker` then loops over its own service's rows, in any number of processes on any
number of hosts at once:

1. **dispatch**: claim the oldest undispatched events and write one ``pending`` delivery per
   configured URL, marking the events dispatched, in one write transaction. Events dispatched
   while no URL is configured get no deliveries: a URL added later receives only later events.
2. **deliver**: lease due deliveries (``lease_until``) in one conditional UPDATE, so no two workers
   hold the same row, and POST them signed (:mod:`keel.core.outbox.signatures`), up to
   ``webhook_batch_size`` at once; each round writes the answers that have arrived, dropping their
   leases, in one write transaction. 2xx is ``delivered``; anything else (a status, a timeout, a
   refused connection) is retried with exponential backoff until ``webhook_max_attempts``, then
   ``failed``.

All state is in the database, so nothing is lost across restarts: a worker that dies leaves its
leases to expire and the next one reclaims them; one that is stopped releases them at once.
Every process on one database must share ``webhook_urls`` and ``webhook_secret``: whichever
worker dispatches an event decides where it goes, and any worker may sign a retry.

Delivery is **at least once**: a receiver can see an event again (a worker died after the POST
but before recording it, or the receiver answered after the timeout). Receivers dedupe on the
event ``id`` in the (signed) body, a UUIDv7 never reused, also sent as ``Keel-Event-Id``.
Retention of settled history runs elsewhere, one process at a time (``outbox_purge_job``). Events
carry no ordering
promise. ``attempts`` counts attempts started (it is raised when a delivery is claimed), so even
a delivery that kills its worker every time ends ``failed`` rather than looping forever.
"""

from __future__ import annotations

import asyncio
import logging
from contextlib import suppress
from datetime import UTC, datetime
from typing import Literal
from urllib.parse import urlsplit, urlunsplit

import httpx
from prometheus_client import Counter

from keel import __version__
from keel.core.database import Database
from keel.core.outbox import signatures
from keel.core.outbox.settings import WebhookSettings
from keel.core.outbox.store import (
    ClaimedDelivery,
    Outcome,
    claim_due_deliveries,
    dispatch_events,
    give_up_exhausted,
    has_work,
    record_outcomes,
    release_leases,
)

log = logging.getLogger("keel.outbox")

DELIVERY_OUTCOMES = Counter(
    "keel_webhook_deliveries_total",
    "Webhook delivery attempts by outcome: delivered, retrying, failed (gave up), interrupted "
    "(the worker stopped mid-request) or stale (the lease had passed to another worker).",
    ["service", "outcome"],
)
EVENTS_DISPATCHED = Counter(
    "keel_outbox_events_dispatched_total",
    "Outbox events turned into webhook deliveries.",
    ["service"],
)
_MAX_ERROR_PAUSE = 30.0  # a worker facing a down database retries at least this often
_SHUTDOWN_WRITE_SECONDS = 5.0  # a stuck database must not hold up shutdown; leases expire anyway


async def post_delivery(
    client: httpx.AsyncClient, claimed: ClaimedDelivery, secret: str, time_limit: float
) -> Outcome:
    """POST one delivery, signed; never raises for what the receiver or the network does."""
    headers = {
        "Content-Type": "application/json",
        "Keel-Event-Id": str(claimed.event_id),
        "Keel-Delivery-Id": str(claimed.id),
        "Keel-Delivery-Attempt": str(claimed.attempt),
        signatures.HEADER: signatures.sign(secret, claimed.body),
    }
    try:
        # httpx's timeouts are per operation; the lease needs a bound on the whole exchange.
        async with asyncio.timeout(time_limit):
            request = client.stream("POST", claimed.url, content=claimed.body, headers=headers)
            async with request as response:  # the body is never read: only the status counts
                status = response.status_code
    except TimeoutError:
        return Outcome(claimed, None, f"timed out after {time_limit:g}s")
    except httpx.HTTPError as exc:
        return Outcome(claimed, None, f"{type(exc).__name__}: {exc}")
    except Exception as exc:  # e.g. a malformed URL: one bad delivery must not sink the batch
        # the class only: a malformed URL's message quotes the URL, credential and all
        name = type(exc).__name__
        log.warning("delivery %d to %s failed: %s", claimed.id, endpoint(claimed.url), name)
        return Outcome(claimed, None, f"{type(exc).__name__}: {exc}")
    return Outcome(claimed, status, None if 200 <= status < 300 else f"HTTP {status}")


def endpoint(url: str) -> str:
    """``url`` for a log line: without user-info, query or fragment, where its credential lives."""
    try:
        parts = urlsplit(url)
        host = f"[{parts.hostname}]" if ":" in (parts.hostname or "") else parts.hostname or ""
        port = f":{parts.port}" if parts.port is not None else ""
    except ValueError:
        return "(an unparsable URL)"
    return urlunsplit((parts.scheme, host + port, parts.path, "", ""))


def _observe(service: str, outcome: Outcome, label: str) -> None:
    DELIVERY_OUTCOMES.labels(service, label).inc()
    if label in ("retrying", "failed"):
        claimed = outcome.delivery
        log.log(
            logging.WARNING if label == "failed" else logging.INFO,
            "webhook delivery %d (event %s, attempt %d) to %s: %s; %s",
            claimed.id,
            claimed.event_id,
            claimed.attempt,
            endpoint(claimed.url),
            outcome.error,
            "giving up" if label == "failed" else "will retry",
        )


class OutboxWorker:
    """Dispatches outbox events and delivers webhooks until stopped.

    Up to ``webhook_batch_size`` requests are in flight at once, and a slot is refilled as soon as
    its request ends, so one receiver that hangs until the timeout holds one slot, not the worker.
    """

    def __init__(self, database: Database, settings: WebhookSettings, service: str) -> None:
        self._database = database
        self._settings = settings
        self.service = service
        self._stopping = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._client: httpx.AsyncClient | None = None
        self._in_flight: dict[asyncio.Task[Outcome], ClaimedDelivery] = {}
        self._unrecorded: list[Outcome] = []  # answered, not yet written (the database was down)
        self.consecutive_errors = 0
        self.last_error: str | None = None  # the class only: /health is unauthenticated

    @property
    def state(self) -> Literal["running", "stopped"]:
        """Whether the loop is alive, for GET /health."""
        return "running" if self._task is not None and not self._task.done() else "stopped"

    def start(self) -> None:
        """Open the HTTP client and start the loop."""
        slots = self._settings.webhook_batch_size
        httpx_log = logging.getLogger("httpx")
        if httpx_log.level == logging.NOTSET:  # it logs every request at INFO: a line per webhook
            httpx_log.setLevel(logging.WARNING)
        self._client = httpx.AsyncClient(
            timeout=self._settings.webhook_timeout_seconds,
            limits=httpx.Limits(max_connections=slots, max_keepalive_connections=slots),
            follow_redirects=False,  # a redirect means a misconfigured URL: show it as a failure
            headers={"User-Agent": f"keel-webhooks/{__version__}"},
        )
        self._task = asyncio.create_task(self._run(), name=f"{self.service}-outbox-worker")

    async def stop(self, grace_seconds: float = 10.0) -> None:
        """Cut off in-flight requests, record what finished, release the rest, and stop."""
        self._stopping.set()
        if self._task is not None:
            try:
                await asyncio.wait_for(asyncio.shield(self._task), grace_seconds)
            except TimeoutError:  # stuck in the database: its leases expire by themselves
                log.warning("outbox worker did not stop within %gs; cancelling", grace_seconds)
                self._task.cancel()
                with suppress(asyncio.CancelledError):
                    await self._task
        if self._client is not None:
            await self._client.aclose()

    async def _run(self) -> None:
        stopping = asyncio.create_task(self._stopping.wait())
        try:
            while not self._stopping.is_set():
                pause = await self._round()
                if pause:
                    # Wake early when a request ends, so its slot is refilled and recorded.
                    await asyncio.wait(
                        {stopping, *self._in_flight},
                        timeout=pause,
                        return_when=asyncio.FIRST_COMPLETED,
                    )
        finally:
            stopping.cancel()
            await self._shut_down()

    async def _round(self) -> float:
        """One round, errors logged and absorbed; returns how long to pause (0: go on at once)."""
        try:
            busy = await self.run_once()
        except Exception as exc:
            self.consecutive_errors += 1
            # The message can carry SQL, bound values or a URL's token: it goes to the log only.
            self.last_error = type(exc).__name__
            pause = min(
                self._settings.outbox_poll_seconds * 2.0 ** min(self.consecutive_errors, 10),
                _MAX_ERROR_PAUSE,
            )
            log.warning(
                "outbox round failed (%d in a row), retrying in %.1fs: %r",
                self.consecutive_errors,
                pause,
                exc,
                exc_info=self.consecutive_errors == 1,  # one traceback per outage is enough
            )
            return pause
        self.consecutive_errors = 0
        return 0.0 if busy else self._settings.outbox_poll_seconds

    async def run_once(self) -> bool:
        """Record answers, dispatch events, fill free request slots; True if a backlog remains.

        A round that caught up reports idle even if it did some work: under steady posting load
        the worker then writes a few large batches a second instead of contending for the
        database's write lock with a small one after every commit of the postings.
        """
        await self._record(self._collect_answers(), [])
        async with self._database.read() as conn:
            work = (await conn.execute(has_work(self.service, datetime.now(UTC)))).one()
        dispatched = await self._dispatch() if work.events else 0
        free = self._settings.webhook_batch_size - len(self._in_flight) - len(self._unrecorded)
        claimed = 0
        if free > 0 and (work.deliveries or dispatched) and not self._stopping.is_set():
            claimed = await self._claim(free)
        return dispatched >= self._settings.outbox_batch_size or (claimed > 0 and claimed >= free)

    async def _dispatch(self) -> int:
        async with self._database.write() as conn:
            count = await dispatch_events(
                conn,
                self.service,
                self._settings.webhook_urls,
                self._settings.outbox_batch_size,
                datetime.now(UTC),
            )
        EVENTS_DISPATCHED.labels(self.service).inc(count)
        return count

    async def _claim(self, limit: int) -> int:
        settings = self._settings
        async with self._database.write() as conn:
            now = datetime.now(UTC)
            given_up = await give_up_exhausted(
                conn, self.service, now, settings.webhook_max_attempts
            )
            claimed = await claim_due_deliveries(
                conn,
                self.service,
                now=now,
                lease_seconds=settings.webhook_lease_seconds,
                limit=limit,
                max_attempts=settings.webhook_max_attempts,
            )
        DELIVERY_OUTCOMES.labels(self.service, "failed").inc(given_up)
        assert self._client is not None, "start() opens the client"
        for delivery in claimed:
            request = post_delivery(
                self._client, delivery, settings.webhook_secret, settings.webhook_timeout_seconds
            )
            self._in_flight[asyncio.create_task(request)] = delivery
        return len(claimed)

    def _collect_answers(self) -> list[Outcome]:
        for task in [t for t in self._in_flight if t.done()]:
            del self._in_flight[task]
            if not task.cancelled():
                self._unrecorded.append(task.result())
        return self._unrecorded

    async def _record(self, answered: list[Outcome], interrupted: list[ClaimedDelivery]) -> int:
        """Write outcomes and release interrupted leases in one transaction; returns how many."""
        if not answered and not interrupted:
            return 0
        # If this write fails the outcomes stay queued; should their leases expire first, the
        # deliveries go out again: at least once.
        async with self._database.write() as conn:
            labels = await record_outcomes(
                conn, answered, now=datetime.now(UTC), settings=self._settings
            )
            await release_leases(conn, interrupted)
        for outcome, label in zip(answered, labels, strict=True):
            _observe(self.service, outcome, label)
        DELIVERY_OUTCOMES.labels(self.service, "interrupted").inc(len(interrupted))
        count = len(answered) + len(interrupted)
        self._unrecorded = []
        return count

    async def _shut_down(self) -> None:
        """Cancel requests still running (HTTP only, never a statement) and record the rest."""
        for task in self._in_flight:
            task.cancel()
        if self._in_flight:
            await asyncio.wait(self._in_flight)
        interrupted = [d for t, d in self._in_flight.items() if t.cancelled()]
        answered = self._collect_answers()
        try:
            async with asyncio.timeout(_SHUTDOWN_WRITE_SECONDS):
                await self._record(answered, interrupted)
        except Exception as exc:  # their leases expire and the next worker takes them over
            log.warning("could not record %d deliveries at shutdown: %r", len(answered), exc)
