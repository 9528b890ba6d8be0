"""The firehose's HTTP routes (contract: DESIGN.md, "firehose")."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated

from fastapi import Query, Request
from prometheus_client import Counter
from starlette.responses import Response

from keel.core.errors import invalid_request, problem_responses
from keel.core.platform import AdminKey, Platform, PlatformDep, ReadKey, WriteKey
from keel.core.routing import router as keel_router
from keel.core.schemas import Cursor, Limit, Page, decode_cursor
from keel.firehose import errors, service
from keel.firehose.buffers import Buffer
from keel.firehose.events import NO_NUL, EventRefused, decode_batch, decode_event, inflate, now_us
from keel.firehose.schemas import (
    Accepted,
    BatchAccepted,
    DeadLetter,
    Rejected,
    ReplayRequest,
    ReplayResult,
    Stats,
    StoredEvent,
    batch_request_body,
    event_request_body,
)

router = keel_router(tags=["firehose"])

ACCEPTED = Counter("keel_firehose_events_accepted_total", "Events acknowledged with a 202.")
REJECTED = Counter(
    "keel_firehose_events_rejected_total", "Events refused at ingest, by code.", ["code"]
)
_JSON = "application/json"
# What an accepted event leads to: reading it back by its user (the fuzzer's stateful phase
# follows these links).
READ_BACK = {
    "ReadBackByUser": {
        "operationId": "list_events_events_get",
        "parameters": {"user_id": "$request.body#/user_id"},
    }
}
_NDJSON = ("application/x-ndjson", "application/ndjson", "application/jsonl")
_BODY_PROBLEMS = (
    errors.InvalidJson,
    errors.InvalidUtf8,
    errors.TooDeep,
    errors.BadRequest,
    errors.UnsupportedEncoding,
    errors.UnsupportedMediaType,
    errors.PayloadTooLarge,
    errors.BufferFull,
    errors.BufferUnavailable,
)


def buffer_of(plat: Platform) -> Buffer:
    buffer: Buffer = plat.services["buffer"]
    return buffer


async def _body(request: Request, plat: Platform, accepted: tuple[str, ...]) -> tuple[bytes, str]:
    """The request body with gzip undone, and its media type (one of ``accepted``)."""
    headers = request.headers
    media = _media_type(headers.get("content-type"))
    if not (media in accepted or (_JSON in accepted and media.endswith("+json"))):
        raise errors.UnsupportedMediaType(f"Send {' or '.join(accepted)}.")
    body = await request.body()
    encoding = headers.get("content-encoding")
    if encoding is None:
        return body, media
    return inflate(body, encoding, plat.settings.max_body_bytes), media


_MEDIA_TYPES: dict[str, str] = {}


def _media_type(content_type: str | None) -> str:
    """``Content-Type`` without its parameters, lower case; remembered, as clients send a few."""
    if content_type is None:
        return ""
    media = _MEDIA_TYPES.get(content_type)
    if media is None:
        media = content_type.partition(";")[0].strip().lower()
        if len(_MEDIA_TYPES) < 256:  # never grows unbounded on clients' spellings
            _MEDIA_TYPES[content_type] = media
    return media


@router.post(
    "/events",
    status_code=202,
    summary="Ingest one event; 202 once it is durable",
    openapi_extra=event_request_body(),
    responses={
        202: {"model": Accepted, "links": READ_BACK},
        **problem_responses(
            *_BODY_PROBLEMS, errors.InvalidRequest, errors.EventTooLarge, errors.TimestampOutOfRange
        ),
    },
)
async def ingest_event(request: Request, plat: PlatformDep, _key: WriteKey) -> Response:
    body, _ = await _body(request, plat, (_JSON,))
    try:
        row = decode_event(body, now_us())
    except EventRefused as refused:
        REJECTED.labels(refused.code).inc()
        if refused.loc is not None:
            return invalid_request([{"loc": refused.loc, "msg": refused.detail}])
        raise refused.error(refused.detail) from None
    await buffer_of(plat).submit((row,))
    ACCEPTED.inc()
    return Response(
        b'{"status":"accepted","event_id":"%s"}' % str(row.event_id).encode(),
        status_code=202,
        media_type=_JSON,
    )


@router.post(
    "/events/batch",
    status_code=202,
    summary="Ingest up to 1,000 events (JSON array or NDJSON, gzip accepted)",
    openapi_extra=batch_request_body(),
    responses={
        202: {"model": BatchAccepted},
        **problem_responses(
            *_BODY_PROBLEMS, errors.InvalidRequest, errors.TooManyEvents, errors.InvalidEvents
        ),
    },
)
async def ingest_batch(request: Request, plat: PlatformDep, _key: WriteKey) -> Response:
    body, media = await _body(request, plat, (_JSON, *_NDJSON))
    rows, rejected = decode_batch(body, ndjson=media in _NDJSON, received_us=now_us())
    for rejection in rejected:
        REJECTED.labels(rejection.code).inc()
    if not rows:
        detail = "; ".join(f"[{r.index}] {r.code}: {r.detail}" for r in rejected[:20])
        raise errors.InvalidEvents(detail or "The batch holds no events.")
    await buffer_of(plat).submit(rows)
    ACCEPTED.inc(len(rows))
    result = BatchAccepted(
        accepted=len(rows),
        rejected=[Rejected(index=r.index, code=r.code, detail=r.detail) for r in rejected],
    )
    return Response(result.model_dump_json(), status_code=202, media_type=_JSON)


Since = Annotated[datetime | None, Query(description="Events at or after this time (RFC 3339).")]
Until = Annotated[datetime | None, Query(description="Events before this time (RFC 3339).")]


@router.get(
    "/events",
    response_model=Page[StoredEvent],
    summary="Stored events, newest first",
    description=(
        "Filtered by `user_id` or `name`, a page looks through the next 100,000 stored events"
        " only (no index serves those filters: each would slow ingest more than it helps): it"
        " may hold fewer than `limit` events, or none, and still have a `next_cursor`. Follow"
        " `next_cursor` until it is null to see every match, each once."
    ),
    responses=problem_responses(errors.InvalidCursor, errors.InvalidRequest),
)
async def list_events(
    plat: PlatformDep,
    _key: ReadKey,
    user_id: Annotated[str | None, Query(min_length=1, max_length=255, pattern=NO_NUL)] = None,
    name: Annotated[str | None, Query(min_length=1, max_length=200, pattern=NO_NUL)] = None,
    since: Since = None,
    until: Until = None,
    limit: Limit = 50,
    cursor: Cursor = None,
) -> Page[StoredEvent]:
    query = service.EventQuery(
        user_id=user_id,
        name=name,
        since_us=service.epoch_us(since),
        until_us=service.epoch_us(until),
        before_seq=decode_cursor(cursor),
        limit=limit,
    )
    async with plat.database.read() as conn:
        return await service.list_events(conn, query)


@router.get(
    "/stats",
    response_model=Stats,
    summary="Counts per minute and per name over a recent window",
)
async def stats(
    plat: PlatformDep,
    _key: ReadKey,
    window: Annotated[int, Query(ge=60, le=86_400, description="Seconds back from now.")] = 3600,
) -> Stats:
    async with plat.database.read() as conn:
        return await service.stats(conn, window)


@router.get(
    "/dead-letters",
    response_model=Page[DeadLetter],
    summary="Events the store refused, with its reason, oldest first",
    responses=problem_responses(errors.InvalidCursor),
)
async def list_dead_letters(
    plat: PlatformDep, _key: ReadKey, limit: Limit = 50, cursor: Cursor = None
) -> Page[DeadLetter]:
    async with plat.database.read() as conn:
        return await service.list_dead_letters(conn, decode_cursor(cursor), limit)


@router.post(
    "/dead-letters/replay",
    response_model=ReplayResult,
    summary="Send dead letters back through the buffer (refused again, they return)",
    responses=problem_responses(errors.BufferFull, errors.BufferUnavailable),
)
async def replay_dead_letters(
    plat: PlatformDep, _key: AdminKey, request: ReplayRequest | None = None
) -> ReplayResult:
    wanted = request or ReplayRequest()
    replayed, _ = await service.replay_dead_letters(
        plat.database, buffer_of(plat), ids=wanted.ids, limit=wanted.limit
    )
    return ReplayResult(replayed=replayed)
