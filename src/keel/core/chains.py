"""Migration chains by name: what a service hands to :mod:`keel.core.migrate`.

Kept apart from ``migrate`` so that declaring a chain imports neither Alembic nor SQLAlchemy.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass


@dataclass(frozen=True)
class MigrationChain:
    """One Alembic script directory and the version table that records how far it has run."""

    name: str
    script_location: str  # an Alembic location, e.g. "package.module:migrations"

    @property
    def version_table(self) -> str:
        return f"alembic_version_{self.name}"


CORE_CHAIN = MigrationChain("core", "keel.core:migrations")


def with_core(chains: Iterable[MigrationChain]) -> list[MigrationChain]:
    """The core chain first (every service's tables may refer to it), then the rest in order."""
    ordered = [CORE_CHAIN]
    for chain in chains:
        if chain not in ordered:
            ordered.append(chain)
    return ordered
