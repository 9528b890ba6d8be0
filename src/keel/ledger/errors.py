"""The ledger's domain errors."""

from keel.core.errors import Conflict, NotFound, UnprocessableEntity


class UserNotFound(NotFound):
    code, title = "user_not_found", "User not found"


class UsernameTaken(Conflict):
    code, title = "username_taken", "Username already taken"


class InsufficientFunds(UnprocessableEntity):
    code, title = "insufficient_funds", "Insufficient funds"


class SameAccountTransfer(UnprocessableEntity):
    code, title = "same_account_transfer", "Transfer to the same account"


class BalanceOutOfRange(UnprocessableEntity):
    code, title = "balance_out_of_range", "Balance would leave the supported range"
