"""The firehose's problems, each with its stable ``code``."""

from __future__ import annotations

from keel.core.errors import (
    BadRequest,
    InvalidCursor,
    InvalidJson,
    InvalidRequest,
    KeelError,
    PayloadTooLarge,
    ServiceUnavailable,
)

__all__ = [
    "BadRequest",
    "BufferFull",
    "BufferUnavailable",
    "EventTooLarge",
    "InvalidCursor",
    "InvalidEvents",
    "InvalidJson",
    "InvalidRequest",
    "InvalidUtf8",
    "KeelError",
    "PayloadTooLarge",
    "TimestampOutOfRange",
    "TooDeep",
    "TooManyEvents",
    "UnsupportedEncoding",
    "UnsupportedMediaType",
]


class BufferFull(ServiceUnavailable):
    code, title = "buffer_full", "The event buffer is full"


class BufferUnavailable(ServiceUnavailable):
    code, title = "buffer_unavailable", "The event buffer cannot take events"


class InvalidUtf8(BadRequest):
    code, title = "invalid_utf8", "The body is not valid UTF-8"


class TooDeep(BadRequest):
    code, title = "too_deep", "JSON nested too deeply"


class UnsupportedEncoding(KeelError):
    status, code, title = 415, "unsupported_encoding", "Unsupported Content-Encoding"


class UnsupportedMediaType(KeelError):
    status, code, title = 415, "unsupported_media_type", "Unsupported Content-Type"


class TooManyEvents(PayloadTooLarge):
    code, title = "too_many_events", "Too many events in one batch"


class EventTooLarge(PayloadTooLarge):
    code, title = "event_too_large", "An event is too large"


class InvalidEvents(KeelError):
    status, code, title = 422, "invalid_events", "No event in the batch is valid"


class TimestampOutOfRange(KeelError):
    status, code, title = 422, "timestamp_out_of_range", "Timestamp out of range"
