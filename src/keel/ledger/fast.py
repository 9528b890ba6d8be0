"""The ledger's hot routes, served on the fast path (see :mod:`keel.core.fastpath`).

They are the FastAPI routes of :mod:`keel.ledger.api`, named here: the fast path calls the same
endpoints with the same schemas, auth and errors.
"""

from __future__ import annotations

from keel.core.fastpath import FastRoute

ROUTES = [
    FastRoute("POST", "/transactions"),
    FastRoute("POST", "/transaction"),
    FastRoute("POST", "/transfers"),
    FastRoute("GET", "/users/{user_id}"),
]
