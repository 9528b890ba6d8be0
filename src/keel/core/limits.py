"""Request body limit: 413 before a body is read past ``max_bytes``."""

from __future__ import annotations

from starlette.exceptions import HTTPException
from starlette.types import Message, Receive

from keel.core.errors import PayloadTooLarge


class BodyTooLarge(HTTPException):
    """Raised inside ``receive`` when a streamed body passes the limit.

    An HTTPException, so the framework's own body reading lets it through to the problem
    renderer (413 ``payload_too_large``) instead of turning it into a generic 400.
    """


def too_large(max_bytes: int) -> PayloadTooLarge:
    return PayloadTooLarge(f"The request body must be at most {max_bytes} bytes.")


def declared_length_refused(value: bytes, max_bytes: int) -> bool:
    """Whether a ``Content-Length`` header value is malformed or over the limit."""
    return not value.isdigit() or int(value) > max_bytes


def limited(receive: Receive, max_bytes: int) -> Receive:
    """``receive`` that raises :class:`BodyTooLarge` once the body passes ``max_bytes``.

    Only needed without a ``Content-Length`` (a chunked body): with one, the server delivers
    exactly that many bytes, and the header was checked already.
    """
    received = 0

    async def limited_receive() -> Message:
        nonlocal received
        message = await receive()
        if message["type"] == "http.request":
            received += len(message.get("body", b""))
            if received > max_bytes:
                raise BodyTooLarge(413, too_large(max_bytes).detail)
        return message

    return limited_receive
