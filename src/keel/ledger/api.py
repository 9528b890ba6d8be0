"""The ledger's HTTP routes (contract: DESIGN.md, "ledger")."""

from __future__ import annotations

from typing import Annotated

from fastapi import Path, Query, Request
from starlette.responses import Response

from keel.core.batching import GroupCommitter
from keel.core.errors import InvalidCursor, problem_responses
from keel.core.idempotency import StoredResponse
from keel.core.openapi import IDEMPOTENT
from keel.core.platform import AdminKey, Platform, PlatformDep, ReadKey, WriteKey, platform
from keel.core.routing import router as keel_router
from keel.core.schemas import Cursor, Limit, Page, decode_cursor
from keel.ledger import service
from keel.ledger.errors import (
    BalanceOutOfRange,
    InsufficientFunds,
    SameAccountTransfer,
    UsernameTaken,
    UserNotFound,
)
from keel.ledger.postings import Posting
from keel.ledger.schemas import (
    AuditReport,
    Transaction,
    TransactionCreate,
    Transfer,
    TransferCreate,
    User,
    UserCreate,
)

router = keel_router()

# Each route lists its own problems; keel.core.openapi adds the platform's (auth, limits,
# validation, outages, Idempotency-Key) to the documentation.
UserId = Annotated[int, Path(ge=1, lt=2**63)]  # lt: 2**63 - 1 is not exact as a float


PostingCommitter = GroupCommitter[Posting, Transaction | Transfer | StoredResponse]


def json_response(body: str, status: int = 200) -> Response:
    return Response(body, status_code=status, media_type="application/json")


async def submit_posting(plat: Platform, posting: Posting) -> Response:
    """Submit a posting through the group committer, honouring its idempotency key."""
    postings: PostingCommitter = plat.services["postings"]
    return await plat.idempotency.submit(postings, posting, posting.idempotency)


@router.post(
    "/users",
    status_code=201,
    response_model=User,
    tags=["users"],
    summary="Open an account (admin)",
    responses=problem_responses(UsernameTaken),
    openapi_extra=IDEMPOTENT,
)
async def create_user(
    body: UserCreate, request: Request, key: AdminKey, plat: PlatformDep
) -> Response:
    idem = plat.idempotency.request(
        request.headers, key.id, "ledger.create_user", body.model_dump()
    )
    return await plat.idempotency.run(
        plat.database, idem, lambda conn: service.create_user(conn, body)
    )


@router.get(
    "/users/{user_id}",
    response_model=User,
    tags=["users"],
    summary="One account and its balance",
    responses=problem_responses(UserNotFound),
)
async def get_user(user_id: UserId, _key: ReadKey, plat: PlatformDep) -> Response:
    user = await plat.database.run_read(lambda conn: service.get_user(conn, user_id))
    return json_response(user.model_dump_json())


@router.get(
    "/search",
    response_model=Page[User],
    tags=["users"],
    summary="Users whose username contains q (case-insensitive, literal)",
    responses=problem_responses(InvalidCursor),
)
async def search_users(
    _key: ReadKey,
    plat: PlatformDep,
    q: Annotated[str, Query(min_length=1, max_length=64, pattern=r"^[^\x00-\x1f\x7f]+$")],
    limit: Limit = 20,
    cursor: Cursor = None,
) -> Page[User]:
    after = decode_cursor(cursor)
    async with plat.database.read() as conn:
        return await service.search_users(conn, q, limit, after)


_POSTING_ERRORS = (UserNotFound, InsufficientFunds, BalanceOutOfRange)


@router.post(
    "/transactions",
    status_code=201,
    response_model=Transaction,
    tags=["transactions"],
    summary="Post a deposit (amount > 0) or withdrawal (amount < 0)",
    responses=problem_responses(*_POSTING_ERRORS),
    openapi_extra=IDEMPOTENT,
)
@router.post("/transaction", status_code=201, response_model=Transaction, include_in_schema=False)
async def post_transaction(
    body: TransactionCreate,
    request: Request,
    key: WriteKey,
    plat: PlatformDep,
) -> Response:
    idem = plat.idempotency.request(
        request.headers, key.id, "ledger.post_transaction", body.model_dump()
    )
    posting = Posting.transaction(body.user_id, body.amount, body.description, idem)
    return await submit_posting(plat, posting)


@router.post(
    "/transfers",
    status_code=201,
    response_model=Transfer,
    tags=["transactions"],
    summary="Move money between two accounts: both entries or neither",
    responses=problem_responses(*_POSTING_ERRORS, SameAccountTransfer),
    openapi_extra=IDEMPOTENT,
)
async def post_transfer(
    body: TransferCreate, request: Request, key: WriteKey, plat: PlatformDep
) -> Response:
    if body.from_user_id == body.to_user_id:
        raise SameAccountTransfer("from_user_id and to_user_id must differ.")
    idem = plat.idempotency.request(
        request.headers, key.id, "ledger.post_transfer", body.model_dump()
    )
    posting = Posting.transfer_between(
        body.from_user_id, body.to_user_id, body.amount, body.description, idem
    )
    return await submit_posting(plat, posting)


@router.get(
    "/users/{user_id}/transactions",
    response_model=Page[Transaction],
    tags=["transactions"],
    summary="An account's entries, newest first, each with balance_after",
    responses=problem_responses(UserNotFound, InvalidCursor),
)
async def list_transactions(
    user_id: UserId, _key: ReadKey, plat: PlatformDep, limit: Limit = 20, cursor: Cursor = None
) -> Page[Transaction]:
    before = decode_cursor(cursor)
    async with plat.database.read() as conn:
        return await service.list_transactions(conn, user_id, limit, before)


@router.get(
    "/audit",
    response_model=AuditReport,
    tags=["audit"],
    summary="Check every balance against the sum of its entries (admin)",
)
async def audit(_key: AdminKey, plat: PlatformDep) -> AuditReport:
    async with plat.database.read() as conn:
        return await service.audit(conn)


__all__ = ["platform", "router"]
