"""The firehose's documented shapes. Ingest decodes with :mod:`keel.firehose.events`; these
models describe the same rules to OpenAPI, and shape what the read routes return."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any
from uuid import UUID

from pydantic import BaseModel, Field, StrictInt

from keel.core.schemas import Id
from keel.firehose.events import BATCH_MAX_EVENTS, NO_NUL

# Epoch seconds, or RFC 3339 in the years keel accepts (2000-2099, UTC or with an offset).
EPOCH_SECONDS = {"type": "number", "minimum": 946_684_800, "exclusiveMaximum": 4_102_444_800}
RFC3339 = {
    "type": "string",
    "format": "date-time",
    "pattern": r"^20[0-9]{2}-[0-9]{2}-[0-9]{2}[Tt ][0-9]{2}:[0-9]{2}:[0-9]{2}(\.[0-9]+)?"
    r"([Zz]|[+-][0-9]{2}:[0-9]{2})$",
}
TIME = {"anyOf": [EPOCH_SECONDS, RFC3339]}
NULL = {"type": "null"}


EVENT_SCHEMA: dict[str, Any] = {
    "title": "Event",
    "type": "object",
    "required": ["user_id", "timestamp"],
    "additionalProperties": True,  # unknown fields are ignored, as collectors do
    # An optional field may be absent or null: null means absent, as the decoder reads it.
    "properties": {
        "event_id": {
            "anyOf": [{"type": "string", "format": "uuid"}, NULL],
            "description": "Deduplication key: an event is stored once per id. Generated "
            "(UUIDv7) if absent; a client that retries must send the same id each time.",
        },
        "user_id": {
            "anyOf": [
                {"type": "string", "minLength": 1, "maxLength": 255, "pattern": NO_NUL},
                {"type": "integer", "minimum": -(2**63), "exclusiveMaximum": 2**63},
            ]
        },
        "name": {
            "anyOf": [{"type": "string", "minLength": 1, "maxLength": 200, "pattern": NO_NUL}, NULL]
        },
        "timestamp": {**TIME, "description": "When it happened: epoch seconds or RFC 3339."},
        "sent_at": {
            "anyOf": [*TIME["anyOf"], NULL],
            "description": "When the client sent it, by its own clock: the timestamp is then "
            "corrected by the difference to the server's clock (both are kept).",
        },
        "metadata": {
            "anyOf": [{"type": "object"}, NULL],
            "description": "Any JSON object up to 32 KiB encoded.",
        },
    },
}


def event_schema() -> dict[str, Any]:
    return EVENT_SCHEMA


def event_request_body() -> dict[str, Any]:
    return {
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": event_schema()}},
        }
    }


def batch_request_body() -> dict[str, Any]:
    return {
        "requestBody": {
            "required": True,
            "description": f"Up to {BATCH_MAX_EVENTS} events and 1 MiB (after gzip is undone). "
            "`Content-Encoding: gzip` is accepted.",
            "content": {
                "application/json": {
                    "schema": {
                        "type": "array",
                        # Any item may be sent: each that is not an Event is refused by its
                        # index and the others are stored, so the schema cannot refuse it.
                        "items": {"description": "An Event, as `POST /events` takes it."},
                        "maxItems": BATCH_MAX_EVENTS,
                    }
                },
                "application/x-ndjson": {
                    "schema": {"type": "string", "description": "One event object per line."}
                },
            },
        }
    }


class Accepted(BaseModel):
    status: str = Field(default="accepted", description="Durable in the buffer: never lost.")
    event_id: UUID


class Rejected(BaseModel):
    index: int = Field(description="Position of the event in the batch, from 0.")
    code: str
    detail: str


class BatchAccepted(BaseModel):
    accepted: int = Field(description="Events now durable in the buffer.")
    rejected: list[Rejected]


def rfc3339(micros: int | None) -> str | None:
    if micros is None:
        return None
    return datetime.fromtimestamp(micros / 1_000_000, UTC).isoformat().replace("+00:00", "Z")


class StoredEvent(BaseModel):
    seq: int = Field(description="Position in the store, in arrival order.")
    event_id: UUID
    user_id: str
    name: str | None
    timestamp: str = Field(description="Corrected for the client's clock skew, RFC 3339.")
    original_timestamp: str = Field(description="As the client sent it.")
    sent_at: str | None
    received_at: str
    metadata: dict[str, Any] | None


class MinuteCount(BaseModel):
    minute: str
    count: int


class NameCount(BaseModel):
    name: str | None
    count: int


class Stats(BaseModel):
    since: str
    until: str
    total: int
    per_minute: list[MinuteCount]
    per_name: list[NameCount]


class DeadLetter(BaseModel):
    id: int
    event_id: UUID
    reason: str = Field(description="What the store said when it refused the event.")
    failed_at: str
    event: dict[str, Any]


class ReplayRequest(BaseModel):
    # Strict integers: JSON true is not 1, nor "1" an id, as the schema says.
    ids: list[Id] | None = Field(
        default=None, max_length=1000, description="Dead letters to replay; absent: the oldest."
    )
    limit: StrictInt = Field(default=1000, ge=1, le=1000)


class ReplayResult(BaseModel):
    replayed: int = Field(description="Dead letters sent back into the buffer (and removed).")
