"""Every test gets its own state directory: nothing touches the user's real data."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from agentkeel.testing.services import PostgresServer, RedisServer


@pytest.fixture(autouse=True)
def isolated_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    home = tmp_path / "agentkeel-home"
    monkeypatch.setenv("AGENTKEEL_HOME", str(home))
    monkeypatch.setenv("AGENTKEEL_SHOP_DB", str(tmp_path / "shop.db"))
    monkeypatch.delenv("AGENTKEEL_CONFIG", raising=False)
    monkeypatch.delenv("AGENTKEEL_LOAD_PLUGINS", raising=False)
    monkeypatch.delenv("AGENTKEEL_DISABLE_PLUGINS", raising=False)
    return home


# --- real PostgreSQL and Redis servers (agentkeel.testing.services) ---------------------


def _service_or_skip(missing: str | None) -> None:
    if missing is None:
        return
    import os

    if os.environ.get("CI") == "true":
        pytest.fail(f"{missing}; CI=true needs it (.ci/test installs it)")
    pytest.skip(missing)


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresServer]:
    """One PostgreSQL server for the session, on a free loopback port."""
    _service_or_skip(PostgresServer.missing())
    with PostgresServer() as server:
        yield server


@pytest.fixture
def pg_url(postgres: PostgresServer) -> Iterator[str]:
    """A fresh, empty database of its own for each test."""
    from agentkeel import pg

    yield postgres.new_database()
    pg.close_all()


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    """One Redis server for the session, on a free loopback port."""
    _service_or_skip(RedisServer.missing())
    with RedisServer() as server:
        yield server


@pytest.fixture
def redis_url(redis_server: RedisServer) -> str:
    """The session's Redis, emptied for each test."""
    import redis

    client = redis.Redis.from_url(redis_server.url)
    try:
        client.flushall()
    finally:
        client.close()
    return redis_server.url
