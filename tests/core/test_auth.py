"""The API-key verifier: scopes, revocation within the cache window, and no stampede on a miss."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import pytest
from sqlalchemy import update
from starlette.datastructures import Headers

from keel.core import auth
from keel.core.auth import ApiKey, ApiKeyVerifier, Scope, create_api_key, generate_key, hash_key
from keel.core.database import Database
from keel.core.errors import Forbidden, Unauthorized
from keel.core.tables import api_keys

pytestmark = pytest.mark.anyio

CACHE_SECONDS = 5.0
BOGUS = "keel_00000000_not-a-real-key"


class Clock:
    """The verifier's clock, moved by hand, so cache ages move without waiting."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class CountingVerifier(ApiKeyVerifier):
    """The real verifier against the real database, counting the lookups it makes."""

    def __init__(self, database: Database, clock: Clock | None = None, **options: Any) -> None:
        super().__init__(database, CACHE_SECONDS, clock=clock or Clock(), **options)
        self.lookups = 0

    async def _fetch(self, digest: bytes) -> ApiKey | None:
        self.lookups += 1
        return await super()._fetch(digest)


@pytest.fixture
def clock() -> Clock:
    return Clock()


def bearer(raw: str) -> Headers:
    return Headers({"authorization": f"Bearer {raw}"})


async def revoke(database: Database, raw: str) -> None:
    async with database.write() as conn:
        await conn.execute(
            update(api_keys)
            .where(api_keys.c.key_hash == hash_key(raw))
            .values(revoked_at=datetime.now(UTC))
        )


async def test_scopes_rank_read_below_write_below_admin(database: Database, make_key: Any) -> None:
    verifier = ApiKeyVerifier(database, CACHE_SECONDS)
    write_key = await make_key(Scope.WRITE)
    assert (await verifier.authenticate(bearer(write_key), Scope.READ)).scope is Scope.WRITE
    assert (await verifier.authenticate(bearer(write_key), Scope.WRITE)).scope is Scope.WRITE
    with pytest.raises(Forbidden):
        await verifier.authenticate(bearer(write_key), Scope.ADMIN)


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"authorization": "Basic dXNlcjpwYXNz"},
        {"authorization": "Bearer "},
        {"authorization": "Bearer keel_00000000_not-a-real-key"},
        {"x-api-key": "keel_00000000_not-a-real-key"},
    ],
)
async def test_missing_or_unknown_keys_are_refused(
    database: Database, headers: dict[str, str]
) -> None:
    with pytest.raises(Unauthorized):
        await ApiKeyVerifier(database, CACHE_SECONDS).authenticate(Headers(headers), Scope.READ)


async def test_a_revoked_key_stops_working_once_its_cache_entry_expires(
    database: Database, make_key: Any, clock: Clock
) -> None:
    verifier = ApiKeyVerifier(database, CACHE_SECONDS, clock=clock)
    raw = await make_key(Scope.ADMIN)
    await verifier.authenticate(bearer(raw), Scope.READ)
    await revoke(database, raw)

    clock.now += CACHE_SECONDS / 2  # still fresh: the cache answers
    await verifier.authenticate(bearer(raw), Scope.READ)

    clock.now += CACHE_SECONDS  # expired: the database answers
    with pytest.raises(Unauthorized):
        await verifier.authenticate(bearer(raw), Scope.READ)


async def test_concurrent_misses_share_one_lookup(
    database: Database, make_key: Callable[..., Any]
) -> None:
    verifier = CountingVerifier(database)
    raw = await make_key(Scope.WRITE)
    keys = await asyncio.gather(
        *(verifier.authenticate(bearer(raw), Scope.WRITE) for _ in range(64))
    )
    assert {key.id for key in keys} == {keys[0].id}
    assert verifier.lookups == 1


async def test_a_nearly_stale_key_is_refreshed_without_making_requests_wait(
    database: Database, make_key: Any, clock: Clock
) -> None:
    verifier = CountingVerifier(database, clock)
    raw = await make_key(Scope.ADMIN)
    await verifier.authenticate(bearer(raw), Scope.READ)
    await revoke(database, raw)

    clock.now += CACHE_SECONDS * 0.9  # in the last fifth of its life
    # Answered from the cache at once; a refresh starts behind it.
    await verifier.authenticate(bearer(raw), Scope.READ)
    refreshing = list(verifier._fetching.values())
    assert len(refreshing) == 1
    await asyncio.gather(*refreshing)
    assert verifier.lookups == 2

    # The refresh saw the revocation, so the next request is refused before the old entry expires.
    with pytest.raises(Unauthorized):
        await verifier.authenticate(bearer(raw), Scope.READ)
    assert verifier.lookups == 2


async def test_a_cached_key_is_not_hashed_again(
    database: Database, make_key: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    hashed: list[str] = []

    def counting_hash(raw: str) -> bytes:
        hashed.append(raw)
        return hash_key(raw)

    raw = await make_key(Scope.READ)
    monkeypatch.setattr(auth, "hash_key", counting_hash)
    verifier = ApiKeyVerifier(database, CACHE_SECONDS)
    for _ in range(100):
        await verifier.authenticate(bearer(raw), Scope.READ)
    assert hashed == [raw]  # once, for the database lookup


async def test_an_unknown_key_is_looked_up_once_per_negative_window(
    database: Database, clock: Clock
) -> None:
    verifier = CountingVerifier(database, clock, negative_cache_seconds=1.0)
    for _ in range(20):
        with pytest.raises(Unauthorized):
            await verifier.authenticate(bearer(BOGUS), Scope.READ)
    assert verifier.lookups == 1
    clock.now += 1.0
    with pytest.raises(Unauthorized):
        await verifier.authenticate(bearer(BOGUS), Scope.READ)
    assert verifier.lookups == 2


async def test_a_key_created_after_it_was_refused_works_once_the_negative_window_ends(
    database: Database, clock: Clock
) -> None:
    """The documented delay: at most ``api_key_negative_cache_seconds`` (1 s by default)."""
    verifier = ApiKeyVerifier(database, CACHE_SECONDS, 1.0, clock=clock)
    raw = generate_key()
    with pytest.raises(Unauthorized):
        await verifier.authenticate(bearer(raw), Scope.READ)
    async with database.write() as conn:
        await create_api_key(conn, scope=Scope.WRITE, raw_key=raw)
    clock.now += 0.5  # still within the negative window: the cached refusal stands
    with pytest.raises(Unauthorized):
        await verifier.authenticate(bearer(raw), Scope.READ)
    clock.now += 0.5
    assert (await verifier.authenticate(bearer(raw), Scope.WRITE)).scope is Scope.WRITE


async def test_random_bogus_keys_neither_grow_memory_nor_evict_real_keys(
    database: Database, make_key: Any, clock: Clock
) -> None:
    verifier = CountingVerifier(database, clock, max_entries=50)
    raw = await make_key(Scope.READ)
    await verifier.authenticate(bearer(raw), Scope.READ)
    for _ in range(300):
        with pytest.raises(Unauthorized):
            await verifier.authenticate(bearer(generate_key()), Scope.READ)
    assert len(verifier._unknown) == 50  # bounded: the oldest answers went first
    assert len(verifier._known) == 1
    lookups = verifier.lookups
    await verifier.authenticate(bearer(raw), Scope.READ)
    assert verifier.lookups == lookups  # the real key is still answered from its cache

    clock.now += 1.0  # once expired, the next answer stored sweeps the old ones out
    with pytest.raises(Unauthorized):
        await verifier.authenticate(bearer(generate_key()), Scope.READ)
    assert len(verifier._unknown) == 1


async def test_an_overlong_key_is_refused_without_a_lookup(database: Database) -> None:
    verifier = CountingVerifier(database)
    with pytest.raises(Unauthorized):
        await verifier.authenticate(bearer("keel_" + "x" * 10_000), Scope.READ)
    assert verifier.lookups == 0 and len(verifier._unknown) == 0


class GatedVerifier(ApiKeyVerifier):
    """Holds every database lookup at a gate, counting how many are held at once."""

    def __init__(self, database: Database, **options: Any) -> None:
        super().__init__(database, CACHE_SECONDS, **options)
        self.gate = asyncio.Event()
        self.waiting = 0
        self.most_at_once = 0

    async def _fetch(self, digest: bytes) -> ApiKey | None:
        self.waiting += 1
        self.most_at_once = max(self.most_at_once, self.waiting)
        await self.gate.wait()
        self.waiting -= 1
        return await super()._fetch(digest)


async def test_a_flood_of_random_keys_holds_few_connections_and_known_keys_still_refresh(
    database: Database, make_key: Callable[..., Any], clock: Clock
) -> None:
    verifier = GatedVerifier(database, max_new_lookups=3)
    raw = await make_key(Scope.WRITE)
    verifier.gate.set()
    known = await verifier.authenticate(bearer(raw), Scope.WRITE)
    verifier.gate.clear()
    bogus = [
        asyncio.ensure_future(verifier.authenticate(bearer(f"keel_{n:08x}_bogus"), Scope.READ))
        for n in range(50)
    ]
    while verifier.waiting < 3:  # the first three reach the database; the rest queue
        await asyncio.sleep(0)
    for _ in range(20):
        await asyncio.sleep(0)
    assert verifier.most_at_once == 3
    refresh = verifier._refresh(raw)  # a known key's refresh does not queue behind the flood
    while verifier.waiting < 4:
        await asyncio.sleep(0)
    verifier.gate.set()
    assert await refresh == known
    results = await asyncio.gather(*bogus, return_exceptions=True)
    assert all(isinstance(r, Unauthorized) for r in results)
    assert verifier.most_at_once == 4


@pytest.mark.parametrize("backend", ["postgres"], indirect=True)
async def test_while_the_database_is_away_a_recently_confirmed_key_still_works(
    database_url: str, make_key: Any, clock: Clock
) -> None:
    """A buffering service (the firehose) keeps its clients through a database outage."""
    from sqlalchemy.engine import make_url

    from keel.core.database import create_engine
    from tests.support.cutting_proxy import CuttingProxy

    url = make_url(database_url)
    proxy = await CuttingProxy(url.host or "127.0.0.1", url.port or 5432).start()
    through = Database(
        create_engine(url.set(host="127.0.0.1", port=proxy.port).render_as_string(False))
    )
    verifier = ApiKeyVerifier(through, CACHE_SECONDS, clock=clock, stale_seconds=60)
    known, never_seen = await make_key(Scope.WRITE), await make_key(Scope.WRITE)
    try:
        await verifier.authenticate(bearer(known), Scope.WRITE)
        await proxy.close()  # the database is gone: connections cut, new ones refused
        clock.now += CACHE_SECONDS * 2  # past its freshness: a lookup is tried, and fails
        assert (await verifier.authenticate(bearer(known), Scope.WRITE)).scope == Scope.WRITE
        with pytest.raises(Exception):  # noqa: B017 - a key it never confirmed: no answer
            await verifier.authenticate(bearer(never_seen), Scope.WRITE)
        clock.now += 60  # past stale_seconds too: the key is not vouched for any more
        with pytest.raises(Exception):  # noqa: B017
            await verifier.authenticate(bearer(known), Scope.WRITE)
    finally:
        await through.dispose()
