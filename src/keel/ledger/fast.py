"""The ledger's hot paths as lean routes (see :mod:`keel.core.fastpath`).

Same rules and answers as the FastAPI routes in :mod:`keel.ledger.api`, which stay the documented
contract: the bodies below mirror :mod:`keel.ledger.schemas` field for field.
"""

from __future__ import annotations

from typing import Annotated

import msgspec
from starlette.responses import Response

from keel.core.app import Platform
from keel.core.auth import Scope
from keel.core.errors import invalid_request
from keel.core.fastpath import FastRequest, FastRoute
from keel.core.schemas import MAX_ID
from keel.ledger import service
from keel.ledger.api import json_response, submit_posting
from keel.ledger.errors import SameAccountTransfer
from keel.ledger.postings import Posting
from keel.ledger.schemas import MAX_AMOUNT

_Id = Annotated[int, msgspec.Meta(ge=1, le=MAX_ID)]
_Description = Annotated[str, msgspec.Meta(max_length=500, pattern=r"^[^\x00]*$")]


class TransactionBody(msgspec.Struct, forbid_unknown_fields=True):
    user_id: _Id
    amount: Annotated[int, msgspec.Meta(ge=-MAX_AMOUNT, le=MAX_AMOUNT)]
    description: _Description = ""


class TransferBody(msgspec.Struct, forbid_unknown_fields=True):
    from_user_id: _Id
    to_user_id: _Id
    amount: Annotated[int, msgspec.Meta(ge=1, le=MAX_AMOUNT)]
    description: _Description = ""


def _invalid(loc: list[str], msg: str) -> Response:
    return invalid_request([{"loc": loc, "msg": msg}])


async def post_transaction(plat: Platform, request: FastRequest[TransactionBody]) -> Response:
    body = request.body
    if body.amount == 0:
        return _invalid(["body", "amount"], "amount must not be zero")
    idem = plat.idempotency.request(
        request.headers, request.key.id, "ledger.post_transaction", msgspec.structs.asdict(body)
    )
    posting = Posting.transaction(body.user_id, body.amount, body.description, idem)
    return await submit_posting(plat, posting)


async def post_transfer(plat: Platform, request: FastRequest[TransferBody]) -> Response:
    body = request.body
    if body.from_user_id == body.to_user_id:
        raise SameAccountTransfer("from_user_id and to_user_id must differ.")
    idem = plat.idempotency.request(
        request.headers, request.key.id, "ledger.post_transfer", msgspec.structs.asdict(body)
    )
    posting = Posting.transfer_between(
        body.from_user_id, body.to_user_id, body.amount, body.description, idem
    )
    return await submit_posting(plat, posting)


async def get_user(plat: Platform, request: FastRequest[None]) -> Response:
    raw = request.path_params["user_id"]
    user_id = int(raw) if raw.isascii() and raw.isdigit() else 0
    if not 1 <= user_id <= MAX_ID:
        return _invalid(["path", "user_id"], f"user_id must be an integer from 1 to {MAX_ID}")
    user = await plat.database.run_read(lambda conn: service.get_user(conn, user_id))
    return json_response(user.model_dump_json())


ROUTES = [
    FastRoute("POST", "/transactions", Scope.WRITE, post_transaction, TransactionBody),
    FastRoute("POST", "/transaction", Scope.WRITE, post_transaction, TransactionBody),
    FastRoute("POST", "/transfers", Scope.WRITE, post_transfer, TransferBody),
    FastRoute("GET", "/users/{user_id}", Scope.READ, get_user),
]
