"""Types shared by every service's schemas: ids, cursors, pages."""

from __future__ import annotations

import base64
import re
from collections.abc import Sequence
from typing import Annotated, Any, Generic, TypeVar

from fastapi import Query
from pydantic import BaseModel, Field, WithJsonSchema

from keel.core.errors import InvalidCursor

MAX_ID = 2**63 - 1


def below_2_63(schema: dict[str, Any]) -> None:
    """Bound an id schema by 2**63 exclusive: FastAPI writes component bounds as floats, and
    MAX_ID as a float is 2**63, one past the largest id; 2**63 itself is exact."""
    schema.pop("maximum", None)
    schema["exclusiveMaximum"] = MAX_ID + 1


Id = Annotated[int, Field(ge=1, le=MAX_ID, strict=True, json_schema_extra=below_2_63)]
PathId = Annotated[int, Field(ge=1, lt=MAX_ID + 1)]  # lt: MAX_ID is not exact as a float
Limit = Annotated[int, Query(ge=1, le=100, description="Page size, at most 100.")]
# A cursor is the last id seen, 8 bytes big-endian in unpadded URL-safe base64: 11 characters,
# the first below "g" (ids are at most 2**63 - 1) and the last carrying 2 zero bits. Every string
# this pattern admits decodes to a valid position, so the documented pattern is the whole rule.
CURSOR_PATTERN = "^([A-Za-f][A-Za-z0-9_-]{9}[AEIMQUYcgkosw048])?$"
_CURSOR = re.compile(CURSOR_PATTERN)
Cursor = Annotated[
    str | None,
    Query(max_length=200),
    WithJsonSchema(
        {
            "type": "string",
            "pattern": CURSOR_PATTERN,
            "description": "`next_cursor` of the previous page; absent or empty for the first.",
        }
    ),
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
    return base64.urlsafe_b64encode(last_id.to_bytes(8, "big")).decode().rstrip("=")


def decode_cursor(cursor: str | None) -> int | None:
    """The id a cursor points after, or None for the first page; 400 if it is not ours."""
    if not cursor:
        return None
    if not _CURSOR.fullmatch(cursor):
        raise InvalidCursor(f"A cursor matches {CURSOR_PATTERN}: pass back a `next_cursor`.")
    return int.from_bytes(base64.urlsafe_b64decode(cursor + "="), "big")
