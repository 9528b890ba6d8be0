"""Types shared by every service's schemas: ids, cursors, pages."""

from __future__ import annotations

import base64
import binascii
from collections.abc import Sequence
from typing import Annotated, Any, Generic, TypeVar

from fastapi import Query
from pydantic import BaseModel, Field

from keel.core.errors import InvalidCursor

MAX_ID = 2**63 - 1
Id = Annotated[int, Field(ge=1, le=MAX_ID, strict=True)]
PathId = Annotated[int, Field(ge=1, le=MAX_ID)]
Limit = Annotated[int, Query(ge=1, le=100, description="Page size, at most 100.")]
Cursor = Annotated[
    str | None, Query(max_length=200, description="`next_cursor` of the previous page.")
]

T = TypeVar("T")


class Page(BaseModel, Generic[T]):
    """A page of a cursor-paginated listing."""

    items: list[T]
    next_cursor: str | None = Field(
        description="Pass as `cursor` for the next page; null at the end."
    )


M = TypeVar("M", bound=BaseModel)


def keyset_page(rows: Sequence[Any], limit: int, model: type[M]) -> Page[M]:
    """A page from ``limit + 1`` rows fetched in id order: the extra row says there is more."""
    items = [model.model_validate(row._mapping) for row in rows[:limit]]
    more = len(rows) > limit
    return Page(items=items, next_cursor=encode_cursor(rows[limit - 1].id) if more else None)


def encode_cursor(last_id: int) -> str:
    return base64.urlsafe_b64encode(f"id:{last_id}".encode()).decode().rstrip("=")


def decode_cursor(cursor: str | None) -> int | None:
    """The id a cursor points after, or None for the first page; 400 if it is not ours."""
    if cursor is None:
        return None
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
        prefix, _, value = raw.partition(":")
        last_id = int(value)
    except (binascii.Error, UnicodeDecodeError, ValueError):
        raise InvalidCursor("The cursor is not one this API returned.") from None
    if prefix != "id" or not 0 <= last_id <= MAX_ID:
        raise InvalidCursor("The cursor is not one this API returned.")
    return last_id
