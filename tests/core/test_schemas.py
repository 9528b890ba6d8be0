"""Pagination cursors: opaque to clients, and refused with 400 unless keel made them."""

from __future__ import annotations

import base64

import pytest
from hypothesis import given
from hypothesis import strategies as st

from keel.core.errors import InvalidCursor
from keel.core.schemas import CURSOR_PATTERN, MAX_ID, decode_cursor, encode_cursor


@given(st.integers(min_value=0, max_value=MAX_ID))
def test_cursor_round_trips(last_id: int) -> None:
    cursor = encode_cursor(last_id)
    assert decode_cursor(cursor) == last_id
    assert "=" not in cursor and "/" not in cursor and "+" not in cursor  # URL-safe, unpadded


def test_no_cursor_is_the_first_page() -> None:
    assert decode_cursor(None) is None
    assert decode_cursor("") is None  # what `?cursor=` sends


@given(st.from_regex(CURSOR_PATTERN, fullmatch=True))
def test_every_cursor_the_documented_pattern_admits_is_accepted(cursor: str) -> None:
    """The OpenAPI documents CURSOR_PATTERN: a client (or fuzzer) keeping to it is never refused."""
    last_id = decode_cursor(cursor)
    assert last_id is None or 0 <= last_id <= MAX_ID


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


@pytest.mark.parametrize(
    "cursor",
    [
        "!!!!",
        "é",
        _b64(b"id:"),
        _b64(b"id:abc"),
        _b64(b"id:-1"),
        _b64(f"id:{MAX_ID + 1}".encode()),
        _b64(b"page:5"),
        _b64(b"5"),
        _b64(b"\xff\xfe"),
        _b64(b"id:1.5"),
        encode_cursor(5) + "\n",
        encode_cursor(5)[:-1],
        encode_cursor(5) + "A",
        "g" + encode_cursor(5)[1:],  # past MAX_ID
        encode_cursor(5)[:-1] + "B",  # padding bits set
    ],
)
def test_foreign_cursors_are_refused(cursor: str) -> None:
    with pytest.raises(InvalidCursor) as refused:
        decode_cursor(cursor)
    assert refused.value.status == 400
    assert refused.value.code == "invalid_cursor"


@given(st.text(max_size=200))
def test_decoding_any_text_returns_an_id_or_refuses(cursor: str) -> None:
    try:
        last_id = decode_cursor(cursor)
    except InvalidCursor:
        return
    assert last_id is None if cursor == "" else last_id is not None and 0 <= last_id <= MAX_ID
