"""Webhook signatures: how keel signs a delivery and how a receiver checks it (Stripe's scheme).

Every delivery carries ``Keel-Signature: t=<unix seconds>,v1=<hex>``, where ``<hex>`` is
HMAC-SHA256 keyed with the shared secret (``KEEL_<SERVICE>_WEBHOOK_SECRET``) over the bytes
``f"{t}."`` followed by the raw request body. A receiver:

1. reads the **raw** body before parsing it (re-serialised JSON would not match the bytes signed);
2. splits the header on ``,`` into ``key=value`` pairs, taking ``t`` and every ``v1``;
3. computes HMAC-SHA256(secret, ``f"{t}."`` + body) and compares it with each ``v1`` in constant
   time (accepting several ``v1`` leaves room to rotate secrets);
4. refuses ``t`` further than a tolerance (5 minutes) from its own clock, so a captured request
   cannot be replayed later; every attempt is signed afresh, so retries hours later still pass;
5. answers 2xx quickly, then dedupes on the event's ``id``, a UUID never reused (also sent as
   ``Keel-Event-Id``): delivery is at least once, so the same event can arrive more than once.

In Python, steps 2-4 are :func:`verify_signature`::

    from keel.core.outbox.signatures import verify_signature

    body = await request.body()
    if not verify_signature(SECRET, request.headers.get("Keel-Signature", ""), body):
        return Response(status_code=400)
"""

from __future__ import annotations

import hashlib
import hmac
import time

HEADER = "Keel-Signature"
DEFAULT_TOLERANCE_SECONDS = 300


def _digest(secret: str, timestamp: str, body: bytes) -> str:
    message = timestamp.encode() + b"." + body
    return hmac.new(secret.encode(), message, hashlib.sha256).hexdigest()


def sign(secret: str, body: bytes, timestamp: int | None = None) -> str:
    """The ``Keel-Signature`` value for ``body``, signed now unless ``timestamp`` is given."""
    t = str(int(time.time()) if timestamp is None else timestamp)
    return f"t={t},v1={_digest(secret, t, body)}"


def verify_signature(
    secret: str,
    header: str,
    body: bytes,
    tolerance: float = DEFAULT_TOLERANCE_SECONDS,
    *,
    now: float | None = None,
) -> bool:
    """True if ``header`` is a valid signature of ``body`` made within ``tolerance`` seconds."""
    timestamp: str | None = None
    candidates: list[str] = []
    for part in header.split(","):
        key, _, value = part.strip().partition("=")
        if key == "t":
            timestamp = value
        elif key == "v1":
            candidates.append(value)
    if timestamp is None or not candidates or not (timestamp.isascii() and timestamp.isdigit()):
        return False
    current = time.time() if now is None else now
    if abs(current - int(timestamp)) > tolerance:
        return False
    expected = _digest(secret, timestamp, body).encode()  # bytes: headers may be non-ASCII
    # Check every candidate, not just until the first match, so timing says nothing about which.
    matches = [hmac.compare_digest(expected, c.encode()) for c in candidates]
    return any(matches)
