"""Events on the wire and as stored rows: decoding, the time rules, and each event's refusal.

Ingest is the hot path, so events are decoded with msgspec (about 1 µs an event, where a pydantic
model costs ten times that) straight into :class:`EventRow` tuples, the shape every buffer and
the store take. The rules are written once here and serve ``POST /events`` and every event of
``POST /events/batch``; the OpenAPI schema of both is :mod:`keel.firehose.schemas`.
"""

from __future__ import annotations

import time
import zlib
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Annotated, NamedTuple
from uuid import UUID

import msgspec

from keel.core.uuid7 import uuid7
from keel.firehose import errors

METADATA_MAX_BYTES = 32 * 1024
BATCH_MAX_EVENTS = 1_000
# Timestamps outside these years are refused (timestamp_out_of_range), before and after skew.
EARLIEST_US = 946_684_800 * 1_000_000  # 2000-01-01T00:00:00Z
LATEST_US = 4_102_444_800 * 1_000_000  # 2100-01-01T00:00:00Z
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)

# No NUL in user_id or name: PostgreSQL text cannot hold one, so such an event could never be
# stored or found. The OpenAPI schema says it with this pattern; ingest checks it in
# :func:`to_row`, because msgspec's regex per string cost 0.7 µs an event, 40 % of its decode.
NO_NUL = "^[^\x00]*$"
UserId = Annotated[str, msgspec.Meta(min_length=1, max_length=255)]
Name = Annotated[str, msgspec.Meta(min_length=1, max_length=200)]


class EventIn(msgspec.Struct, gc=False):
    """One event as a client sends it (unknown fields are ignored, as collectors do).

    ``gc=False``: its fields (strings, numbers, times, a UUID, raw JSON) can never refer back to
    it, so the cyclic collector need not track the 500 of every batch.
    """

    user_id: UserId | Annotated[int, msgspec.Meta(ge=-(2**63), le=2**63 - 1)]
    timestamp: float | datetime  # epoch seconds or RFC 3339
    event_id: UUID | None = None
    name: Name | None = None
    sent_at: float | datetime | None = None
    metadata: msgspec.Raw = msgspec.Raw()  # kept as the client's JSON text, checked, not rebuilt


class EventRow(NamedTuple):
    """One accepted event, as buffers hold it and the store keeps it. Times in epoch µs."""

    event_id: UUID
    user_id: str
    name: str | None
    timestamp_us: int  # corrected by the client's clock skew when it sent ``sent_at``
    original_timestamp_us: int  # as the client sent it
    sent_at_us: int | None
    received_at_us: int
    metadata: str | None  # a JSON object's text


@dataclass(frozen=True, slots=True)
class Rejection:
    index: int
    code: str
    detail: str


class EventRefused(Exception):
    """Why one event cannot be accepted: a stable ``code`` and the error that says it to HTTP."""

    def __init__(self, error: type[errors.KeelError], detail: str, loc: list[str] | None = None):
        super().__init__(detail)
        self.error = error
        self.code = error.code
        self.detail = detail
        self.loc = loc


_decode_event = msgspec.json.Decoder(EventIn).decode
_RESERVED_IDS = frozenset((0, 2**128 - 1))  # the nil and max UUIDs, as integers
_decode_array = msgspec.json.Decoder(list[msgspec.Raw]).decode
_decode_events = msgspec.json.Decoder(list[EventIn]).decode


def now_us() -> int:
    return time.time_ns() // 1_000


def decode_event(raw: bytes | msgspec.Raw, received_us: int) -> EventRow:
    """One event's row, or :class:`EventRefused` saying why not."""
    try:
        event = _decode_event(raw)
    except msgspec.ValidationError as exc:
        message, _, where = str(exc).partition(" - at `$")
        loc = ["body", *[part for part in where.rstrip("`").split(".") if part]]
        if loc[1:] in (["timestamp"], ["sent_at"]) and "out of range" in message:
            raise EventRefused(errors.TimestampOutOfRange, f"{loc[1]}: {message}") from None
        raise EventRefused(errors.InvalidRequest, message, loc) from None
    except msgspec.DecodeError as exc:
        raise EventRefused(errors.InvalidJson, str(exc)) from None
    except UnicodeDecodeError:
        raise EventRefused(errors.InvalidUtf8, "a string is not valid UTF-8") from None
    except RecursionError:
        raise EventRefused(errors.TooDeep, "JSON nested too deeply") from None
    return to_row(event, received_us)


def to_row(event: EventIn, received_us: int) -> EventRow:
    # Written for speed (it runs for every event): a float timestamp in range, a string
    # user_id and a given id take no function call; the rest goes the long way.
    value = event.timestamp
    if type(value) is float and _EARLIEST_S <= value < _LATEST_S:
        original = round(value * 1_000_000)
        if original >= LATEST_US:  # rounded up onto the bound
            _in_range(original, "timestamp")
    else:
        original = _epoch_us(value, "timestamp")
    timestamp, sent_at = original, None
    if event.sent_at is not None:
        sent_at = _epoch_us(event.sent_at, "sent_at")
        timestamp = original + (received_us - sent_at)  # the client's clock skew, taken out
        _in_range(timestamp, "timestamp, corrected by the skew of sent_at,")
    user_id, name = event.user_id, event.name
    if type(user_id) is not str:
        user_id = str(user_id)
    elif "\x00" in user_id:
        raise EventRefused(errors.InvalidRequest, "user_id may not hold NUL", ["body", "user_id"])
    if name is not None and "\x00" in name:
        raise EventRefused(errors.InvalidRequest, "name may not hold NUL", ["body", "name"])
    event_id = event.event_id
    if event_id is None:
        event_id = uuid7()
    elif event_id.int in _RESERVED_IDS:
        raise EventRefused(
            errors.InvalidRequest,
            "event_id may not be the nil or max UUID (an id never set?)",
            ["body", "event_id"],
        )
    metadata = _metadata(event.metadata)
    row = (event_id, user_id, name, timestamp, original, sent_at, received_us, metadata)
    return _new_row(EventRow, row)  # EventRow(*row) without the Python-level __new__


_new_row = tuple.__new__
_EARLIEST_S = EARLIEST_US / 1_000_000
_LATEST_S = LATEST_US / 1_000_000


def _epoch_us(value: float | datetime, field: str) -> int:
    if isinstance(value, datetime):
        aware = value if value.tzinfo is not None else value.replace(tzinfo=UTC)
        micros = (aware - _EPOCH) // _ONE_MICROSECOND
    elif EARLIEST_US / 1e6 <= value < LATEST_US / 1e6:  # also refuses inf, and overflow below
        micros = round(value * 1_000_000)
    else:
        micros = LATEST_US
    _in_range(micros, field)
    return micros


def _in_range(micros: int, field: str) -> None:
    if not EARLIEST_US <= micros < LATEST_US:
        raise EventRefused(
            errors.TimestampOutOfRange, f"{field} must fall in the years 2000 to 2099 (UTC)"
        )


def _metadata(raw: msgspec.Raw) -> str | None:
    data = bytes(raw)
    if not data or data == b"null":
        return None
    if data[:1] != b"{":
        raise EventRefused(
            errors.InvalidRequest, "metadata must be a JSON object", ["body", "metadata"]
        )
    if len(data) > METADATA_MAX_BYTES:
        raise EventRefused(
            errors.EventTooLarge, f"metadata is over {METADATA_MAX_BYTES // 1024} KiB encoded"
        )
    try:
        text = data.decode()
        msgspec.json.decode(data)  # every number must read back (1e999 does not)
    except UnicodeDecodeError:
        raise EventRefused(errors.InvalidUtf8, "metadata is not valid UTF-8") from None
    except msgspec.ValidationError as exc:
        raise EventRefused(
            errors.InvalidRequest, f"metadata: {exc}", ["body", "metadata"]
        ) from None
    return text


def decode_batch(
    body: bytes, *, ndjson: bool, received_us: int
) -> tuple[list[EventRow], list[Rejection]]:
    """The valid events of a batch and a rejection for each invalid one, by index.

    A body that is not a batch at all (malformed JSON array, too many events) is refused whole.
    In NDJSON each line stands alone, so a malformed line is one rejection; blank lines are skipped.
    """
    if not ndjson:
        try:  # the common case, every event well-formed: one decoder call for the whole array
            events = _decode_events(body)
        except (msgspec.DecodeError, UnicodeDecodeError, RecursionError):
            pass  # decoded again below, event by event, to say which ones and why
        else:
            if len(events) > BATCH_MAX_EVENTS:
                raise errors.TooManyEvents(f"A batch holds at most {BATCH_MAX_EVENTS} events.")
            return _rows(events, received_us)
    items: list[bytes] | list[msgspec.Raw]
    if ndjson:
        # Count before splitting: 1 MiB of empty lines must not become a million objects.
        if body.count(b"\n") > 4 * BATCH_MAX_EVENTS:
            raise errors.TooManyEvents(f"A batch holds at most {BATCH_MAX_EVENTS} events.")
        items = [line for line in body.split(b"\n") if line.strip()]
    else:
        try:
            items = _decode_array(body)
        except msgspec.ValidationError:
            raise errors.InvalidRequest(
                "A batch is a JSON array of events, or NDJSON (Content-Type application/x-ndjson)."
            ) from None
        except msgspec.DecodeError as exc:
            raise errors.InvalidJson(str(exc)) from None
        except RecursionError:
            raise errors.TooDeep("JSON nested too deeply.") from None
    if len(items) > BATCH_MAX_EVENTS:
        raise errors.TooManyEvents(f"A batch holds at most {BATCH_MAX_EVENTS} events.")
    rows: list[EventRow] = []
    rejected: list[Rejection] = []
    for index, item in enumerate(items):
        try:
            rows.append(decode_event(item, received_us))
        except EventRefused as refused:
            rejected.append(Rejection(index, refused.code, refused.detail))
    return rows, rejected


def _rows(events: list[EventIn], received_us: int) -> tuple[list[EventRow], list[Rejection]]:
    """Rows of events msgspec already decoded; the time and metadata rules may still refuse."""
    rows: list[EventRow] = []
    rejected: list[Rejection] = []
    for index, event in enumerate(events):
        try:
            rows.append(to_row(event, received_us))
        except EventRefused as refused:
            rejected.append(Rejection(index, refused.code, refused.detail))
    return rows, rejected


def inflate(body: bytes, encoding: str | None, limit: int) -> bytes:
    """The body with its ``Content-Encoding`` undone; refused if it inflates past ``limit``.

    A gzip body may be several members one after another (``cat a.gz b.gz``, pigz, streaming
    writers): each is inflated in turn, the limit counting them all. Bytes after the last member
    that are not gzip are refused, never ignored: nothing a client sent is silently dropped.
    """
    if not encoding or encoding.strip().lower() == "identity":
        return body
    if encoding.strip().lower() not in ("gzip", "x-gzip"):
        raise errors.UnsupportedEncoding(f"Content-Encoding {encoding[:40]!r}: send gzip or none.")
    parts: list[bytes] = []
    size, rest = 0, body
    while True:
        inflater = zlib.decompressobj(wbits=16 + zlib.MAX_WBITS)
        try:
            part = inflater.decompress(rest, limit + 1 - size)
        except zlib.error:
            raise errors.BadRequest("The gzip body is corrupt.") from None
        size += len(part)
        if size > limit or inflater.unconsumed_tail:
            raise errors.PayloadTooLarge(f"The body inflates past {limit} bytes.")
        if not inflater.eof:
            raise errors.BadRequest("The gzip body is truncated.")
        parts.append(part)
        rest = inflater.unused_data
        if not rest:
            return b"".join(parts)


_ONE_MICROSECOND = datetime(1970, 1, 1, 0, 0, 0, 1, tzinfo=UTC) - _EPOCH
