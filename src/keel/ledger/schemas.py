"""The ledger's request and response bodies."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, field_validator

from keel.core.schemas import Id

# Amounts are integer minor units (cents). Strict: 10.5, "10" and true are refused, not coerced,
# and so is 10.0, which JSON Schema counts as an integer but a parser cannot tell from 10.000001.
MAX_AMOUNT = 10**12
_WHOLE = "Written as a JSON integer: a fraction or exponent (`10.0`, `1e3`) is refused."
Amount = Annotated[
    int,
    Field(
        strict=True,
        ge=-MAX_AMOUNT,
        le=MAX_AMOUNT,
        description=f"Minor units, not zero; negative withdraws. {_WHOLE}",
        json_schema_extra={"not": {"const": 0}},
    ),
]
PositiveAmount = Annotated[
    int, Field(strict=True, ge=1, le=MAX_AMOUNT, description=f"Minor units. {_WHOLE}")
]
Username = Annotated[
    str, StringConstraints(min_length=1, max_length=64), Field(pattern=r"^[^\x00-\x1f\x7f]+$")
]
# No "\s": JSON Schema's (ECMA) and the validator's (Rust) disagree on it (U+0085, U+FEFF), so
# the excluded spaces and controls are spelled out and both read the same set.
_EMAIL_PART = (
    r"[^@\x00-\x20\x7f-\x9f\u00a0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000\ufeff]+"
)
Email = Annotated[
    str, StringConstraints(max_length=254), Field(pattern=f"^{_EMAIL_PART}@{_EMAIL_PART}$")
]
Description = Annotated[str, StringConstraints(max_length=500), Field(pattern=r"^[^\x00]*$")]


class StrictModel(BaseModel):
    model_config = ConfigDict(extra="forbid")


class UserCreate(StrictModel):
    username: Username
    email: Email | None = None
    overdraft_limit: Annotated[
        int, Field(strict=True, ge=0, le=MAX_AMOUNT, description=f"Minor units. {_WHOLE}")
    ] = 0


class User(BaseModel):
    id: int
    username: str
    email: str | None
    balance: int
    overdraft_limit: int
    created_at: datetime


class TransactionCreate(StrictModel):
    user_id: Id
    amount: Amount
    description: Description = ""

    @field_validator("amount")
    @classmethod
    def _non_zero(cls, amount: int) -> int:
        if amount == 0:
            raise ValueError("amount must not be zero")
        return amount


class Transaction(BaseModel):
    id: int
    user_id: int
    amount: int
    balance_after: int
    description: str
    status: Literal["posted"] = "posted"
    transfer_id: int | None = None
    created_at: datetime


class TransferCreate(StrictModel):
    """Two different accounts: the same id twice is 422 `same_account_transfer`."""

    from_user_id: Id
    to_user_id: Id
    amount: PositiveAmount
    description: Description = ""


class Transfer(BaseModel):
    id: int
    from_user_id: int
    to_user_id: int
    amount: int
    description: str
    status: Literal["posted"] = "posted"
    created_at: datetime
    entries: list[Transaction]


class AccountAudit(BaseModel):
    user_id: int
    balance: int
    entries_sum: int
    entries: int
    ok: bool


class AuditReport(BaseModel):
    ok: bool
    accounts_checked: int
    mismatches: list[AccountAudit]
    checked_at: datetime
