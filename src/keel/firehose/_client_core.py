"""What the sync and async firehose clients share: events, batches, verdicts, retries, the books.

Everything here is free of I/O and of threads-versus-tasks, so the two clients differ only in how
they wait and how they send. The rules it holds:

* An event is encoded once, at ``capture()`` time, into a JSON *fragment* (the object without its
  closing brace). A caller's unserialisable metadata fails in the caller's own stack, not later in
  a background thread; and a batch's size is known before it is built, so fitting batches under
  the server's 1 MiB limit is arithmetic, not trial encoding. At send time each fragment gets
  ``"sent_at": <now>}`` appended: the server uses it to correct the device's clock skew, so it is
  the time of *this* attempt, not of the first.
* Every event carries a UUIDv7 ``event_id`` from ``capture()`` on. The server stores an id once, so
  re-sending a batch whose outcome is unknown (502, a timeout, a dropped connection) is safe.
* A response is judged into a :class:`Verdict`: accepted (with per-index rejections), retry
  (503/429/408/5xx, transport errors; ``Retry-After`` honoured), split (413), or refused (any
  other 4xx: retrying cannot help, so the events are reported through ``on_error`` and dropped).
"""

from __future__ import annotations

import gzip
import json
import logging
import math
import random
import threading
import time
from collections.abc import Callable, Generator, Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime
from email.utils import parsedate_to_datetime
from typing import Any
from uuid import UUID

import httpx

from keel.core.uuid7 import uuid7

log = logging.getLogger("keel.firehose.client")

MAX_BATCH_EVENTS = 1000
# The server's limit is 1 MiB both decompressed and compressed. gzip of incompressible data is a
# little larger than the data, so the decompressed budget keeps some headroom under the limit.
MAX_BATCH_BYTES = 1024 * 1024 - 8 * 1024
BATCH_PATH = "/events/batch"
CLOSED_UNSENT = "the client stopped before these events were sent"
CLOSE_TIMEOUT = 30.0  # seconds close() (and interpreter exit) waits for the queue to be sent
RETRYABLE_STATUSES = frozenset({408, 429}) | frozenset(range(500, 600))

ErrorCallback = Callable[[list[dict[str, Any]], str, str], None]
"""``on_error(events, code, detail)``: events the server refused or the client gave up on."""

Timestamp = float | int | str | datetime


class QueueFull(Exception):
    """``capture()`` found ``max_queue`` events waiting: the event was *not* queued.

    Raised rather than blocking (the caller may be serving a request) or dropping silently (the
    caller would never know). The queue fills when the collector is unreachable or slower than
    the capture rate; the caller decides whether to shed, wait and retry, or spill elsewhere.
    """


class ClientClosed(RuntimeError):
    """``capture()`` after ``close()``: a closed client sends nothing more."""


@dataclass(frozen=True)
class Backoff:
    """Exponential backoff with jitter: attempt *n* waits between half and all of
    ``min(max, base * 2**n)`` seconds ("equal jitter": clients that failed together spread out,
    yet none retries at once). With a ``Retry-After``, it waits that plus a jitter."""

    base: float = 0.1
    max: float = 10.0

    def delay(self, attempt: int, retry_after: float | None = None) -> float:
        ceiling = min(self.max, math.ldexp(self.base, attempt))
        jittered = ceiling / 2 + random.uniform(0, ceiling / 2)
        if retry_after is None:
            return jittered
        # On top of Retry-After, not instead: every client the same 503 refused would otherwise
        # come back in the same millisecond.
        return retry_after + random.uniform(0, jittered)


@dataclass
class ClientStats:
    """Event counts since the client started (``retried`` counts re-sends, so an event sent three
    times adds two). ``queued`` counts every event ``capture()`` accepted; the others count how
    they ended: ``sent`` (the server accepted them), ``rejected`` (the server refused them: bad
    event, bad key), ``dropped`` (the client gave up: retries exhausted, or closed before sending).
    """

    queued: int = 0
    sent: int = 0
    rejected: int = 0
    retried: int = 0
    dropped: int = 0


def encode_event(
    user_id: str,
    name: str | None,
    *,
    timestamp: Timestamp | None,
    metadata: Mapping[str, Any] | None,
    event_id: UUID | str | None,
) -> tuple[UUID, bytes]:
    """The event's id and its JSON fragment (the object without its closing brace)."""
    if not isinstance(user_id, str) or not user_id:
        raise ValueError("user_id must be a non-empty string")
    eid = uuid7() if event_id is None else _as_uuid(event_id)
    body: dict[str, Any] = {"event_id": str(eid), "user_id": user_id}
    if name is not None:
        body["name"] = name
    body["timestamp"] = _wire_time(time.time() if timestamp is None else timestamp)
    if metadata is not None:
        body["metadata"] = dict(metadata)
    encoded = json.dumps(body, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    return eid, encoded[:-1].encode()


def _as_uuid(value: UUID | str) -> UUID:
    return value if isinstance(value, UUID) else UUID(value)


def _wire_time(value: Timestamp) -> float | str:
    """Epoch seconds, or an RFC 3339 string passed as given (the server parses and judges it).

    A naive ``datetime`` means local time, as :meth:`datetime.timestamp` has it.
    """
    if isinstance(value, datetime):
        return value.timestamp()
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise TypeError(f"timestamp must be epoch seconds, RFC 3339 or a datetime: {value!r}")
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError("timestamp must be finite")
    return value if isinstance(value, str) else float(value)


def decode_events(fragments: Iterable[bytes]) -> list[dict[str, Any]]:
    """Fragments back into the dicts ``on_error`` hands the caller."""
    return [json.loads(fragment + b"}") for fragment in fragments]


def _suffix(send_at: bool) -> bytes:
    return f',"sent_at":{time.time():.6f}}}'.encode() if send_at else b"}"


def fit_batches(fragments: list[bytes], send_at: bool) -> tuple[list[list[bytes]], list[bytes]]:
    """Cut ``fragments`` into batches under the server's event and byte limits, in order.

    Also returns the events too large to send even alone (the server would refuse them with 413).
    """
    extra = len(_suffix(send_at)) + 1  # the suffix, and the comma (or bracket) before it
    batches: list[list[bytes]] = []
    oversized: list[bytes] = []
    current: list[bytes] = []
    size = 1  # the closing bracket
    for fragment in fragments:
        cost = len(fragment) + extra
        if cost + 1 > MAX_BATCH_BYTES:
            oversized.append(fragment)
            continue
        if current and (len(current) == MAX_BATCH_EVENTS or size + cost > MAX_BATCH_BYTES):
            batches.append(current)
            current, size = [], 1
        current.append(fragment)
        size += cost
    if current:
        batches.append(current)
    return batches, oversized


def build_request(
    fragments: list[bytes], *, send_at: bool, compress: bool
) -> tuple[bytes, dict[str, str]]:
    """The body and headers of one ``POST /events/batch`` attempt, stamped with ``sent_at`` now."""
    suffix = _suffix(send_at)
    body = b"[" + b",".join(fragment + suffix for fragment in fragments) + b"]"
    headers = {"Content-Type": "application/json"}
    if compress:
        body = gzip.compress(body, compresslevel=5)
        headers["Content-Encoding"] = "gzip"
    return body, headers


@dataclass(frozen=True)
class Verdict:
    """What one attempt's outcome means for its batch."""

    kind: str  # "accepted" | "retry" | "split" | "refused"
    code: str = ""
    detail: str = ""
    retry_after: float | None = None
    # For "accepted": (index, code, detail) of each event the server refused.
    rejected: tuple[tuple[int, str, str], ...] = ()


def judge(response: httpx.Response) -> Verdict:
    """Read the server's answer to one batch."""
    if response.status_code == 202:
        rejected = tuple(
            (int(r["index"]), str(r.get("code", "rejected")), str(r.get("detail", "")))
            for r in _json(response).get("rejected", ())
        )
        return Verdict("accepted", rejected=rejected)
    problem = _json(response)
    code = str(problem.get("code") or f"http_{response.status_code}")
    detail = str(problem.get("detail") or problem.get("title") or response.reason_phrase)
    if response.status_code in RETRYABLE_STATUSES:
        return Verdict("retry", code, detail, retry_after(response.headers.get("Retry-After")))
    if response.status_code == 413:
        return Verdict("split", code, detail)
    return Verdict("refused", code, detail)


def transport_failure(error: httpx.RequestError) -> Verdict:
    """No answer (refused connection, timeout, reset): the batch may or may not be stored."""
    return Verdict("retry", "transport_error", f"{type(error).__name__}: {error}")


def _json(response: httpx.Response) -> dict[str, Any]:
    try:
        value = response.json()
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


def retry_after(header: str | None) -> float | None:
    """``Retry-After`` in seconds: delta-seconds (fractions tolerated) or an HTTP date."""
    if not header:
        return None
    try:
        seconds = float(header)
    except ValueError:
        try:
            seconds = parsedate_to_datetime(header).timestamp() - time.time()
        except (TypeError, ValueError):
            return None
    return max(0.0, seconds) if math.isfinite(seconds) else None


class Books:
    """The client's counts and its ``on_error`` reports, safe to update from any thread."""

    def __init__(self, on_error: ErrorCallback | None) -> None:
        self._on_error = on_error
        self._lock = threading.Lock()
        self._stats = ClientStats()

    def snapshot(self) -> ClientStats:
        with self._lock:
            return ClientStats(**vars(self._stats))

    def count(self, **deltas: int) -> None:
        with self._lock:
            for name, delta in deltas.items():
                setattr(self._stats, name, getattr(self._stats, name) + delta)

    def settle(self, fragments: list[bytes], verdict: Verdict) -> None:
        """Record an accepted batch, reporting each event the server refused."""
        rejected = {
            i: (code, detail) for i, code, detail in verdict.rejected if 0 <= i < len(fragments)
        }
        self.count(sent=len(fragments) - len(rejected), rejected=len(rejected))
        for index, (code, detail) in sorted(rejected.items()):
            self.report([fragments[index]], code, detail)

    def give_up(self, fragments: list[bytes], code: str, detail: str, *, refused: bool) -> None:
        """Record events that will not be sent: refused by the server, or dropped by the client."""
        self.count(**{"rejected" if refused else "dropped": len(fragments)})
        self.report(fragments, code, detail)

    def report(self, fragments: list[bytes], code: str, detail: str) -> None:
        log.warning("firehose: %d event(s) not stored: %s: %s", len(fragments), code, detail)
        if self._on_error is None:
            return
        try:
            self._on_error(decode_events(fragments), code, detail)
        except Exception:  # the sender must outlive a faulty callback
            log.exception("firehose: on_error callback failed")


@dataclass(frozen=True)
class Send:
    """Post this body to ``/events/batch``; answer with the response or the transport error."""

    body: bytes
    headers: dict[str, str]


@dataclass(frozen=True)
class Wait:
    """Wait this long before retrying; answer True if the client gave up meanwhile (closing)."""

    seconds: float


Outcome = httpx.Response | httpx.RequestError | bool
Delivery = Generator[Send | Wait, Outcome, None]


def deliver(
    fragments: list[bytes],
    books: Books,
    *,
    send_at: bool,
    compress: bool,
    max_retries: int,
    backoff: Backoff,
) -> Delivery:
    """Send a taken batch to its end (sent, refused or dropped), as a coroutine of I/O requests.

    The sync client drives it with blocking calls and the async client with awaits, so both follow
    one set of rules. Each batch keeps its events (and so their ids) across every retry. Whatever
    stops it early (``close()`` giving up, the driver closing it, a bug) reports what it had not
    sent, so no event leaves the client unaccounted for.
    """
    batches, oversized = fit_batches(fragments, send_at)
    if oversized:
        detail = f"an event over {MAX_BATCH_BYTES} bytes"
        books.give_up(oversized, "event_too_large", detail, refused=True)
    code, detail = "client_closed", CLOSED_UNSENT
    try:
        while batches:
            # Settled: nothing replaces it; too large for the server (413): its two halves do.
            batches[:1] = yield from _send_batch(
                batches[0], books, send_at, compress, max_retries, backoff
            )
    except _Abandoned:
        return
    except Exception as error:
        code, detail = "client_error", repr(error)
        raise
    finally:
        for unsent in batches:
            books.give_up(unsent, code, detail, refused=False)


class _Abandoned(Exception):
    """The client closed while a batch waited to be retried."""


def _send_batch(
    batch: list[bytes],
    books: Books,
    send_at: bool,
    compress: bool,
    max_retries: int,
    backoff: Backoff,
) -> Generator[Send | Wait, Outcome, list[list[bytes]]]:
    """One batch's attempts; returns what must still be sent in its place."""
    for attempt in range(max_retries + 1):
        if attempt:
            books.count(retried=len(batch))
        outcome = yield Send(*build_request(batch, send_at=send_at, compress=compress))
        assert not isinstance(outcome, bool)
        if isinstance(outcome, httpx.RequestError):
            verdict = transport_failure(outcome)
        else:
            verdict = judge(outcome)
        if verdict.kind == "accepted":
            books.settle(batch, verdict)
            return []
        if verdict.kind == "split" and len(batch) > 1:
            return [batch[: len(batch) // 2], batch[len(batch) // 2 :]]
        if verdict.kind != "retry":
            books.give_up(batch, verdict.code, verdict.detail, refused=True)
            return []
        if attempt == max_retries:
            detail = f"gave up after {attempt + 1} attempts: {verdict.detail}"
            books.give_up(batch, verdict.code, detail, refused=False)
            return []
        if (yield Wait(backoff.delay(attempt, verdict.retry_after))) is True:
            raise _Abandoned
    raise AssertionError("unreachable: the last attempt returns")


class Settings:
    """The tuning both clients take, checked once, and the books they keep."""

    def __init__(
        self,
        *,
        batch_size: int,
        flush_interval: float,
        max_queue: int,
        gzip: bool,
        max_retries: int,
        backoff: Backoff,
        send_at: bool,
        on_error: ErrorCallback | None,
    ) -> None:
        if not 1 <= batch_size <= MAX_BATCH_EVENTS:
            raise ValueError(f"batch_size must be between 1 and {MAX_BATCH_EVENTS}")
        if max_queue < 1 or max_retries < 0 or flush_interval < 0:
            raise ValueError(
                "max_queue must be positive, max_retries and flush_interval not negative"
            )
        self.batch_size = batch_size
        self.flush_interval = flush_interval
        self.max_queue = max_queue
        self.gzip = gzip
        self.max_retries = max_retries
        self.backoff = backoff
        self.send_at = send_at
        self.books = Books(on_error)

    def delivery(self, fragments: list[bytes]) -> Delivery:
        return deliver(
            fragments,
            self.books,
            send_at=self.send_at,
            compress=self.gzip,
            max_retries=self.max_retries,
            backoff=self.backoff,
        )


def auth_headers(api_key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {api_key}", "User-Agent": "keel-firehose-client/0.1"}
