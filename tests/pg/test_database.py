"""The shared PostgreSQL layer: migrations applied once (replicas racing included), a newer
schema refused, errors that name the server and never the password."""

from __future__ import annotations

import threading

import psycopg
import pytest

from agentkeel import pg
from agentkeel.config import Config
from agentkeel.errors import ConfigError, StoreError
from agentkeel.testing.services import free_port


def test_migrations_run_once_even_when_replicas_start_together(pg_url: str) -> None:
    errors: list[BaseException] = []

    def open_one() -> None:
        try:
            pg.Database(pg_url).run("probe", lambda conn: conn.execute("SELECT 1").fetchone())
        except BaseException as exc:  # noqa: BLE001 - collected for the assertion
            errors.append(exc)

    threads = [threading.Thread(target=open_one) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    with psycopg.connect(pg_url) as conn:
        rows = conn.execute("SELECT version, component FROM agentkeel_schema ORDER BY version").fetchall()
    assert [r[0] for r in rows] == list(range(1, len(pg.PG_MIGRATIONS) + 1))
    assert [r[1] for r in rows] == [m.component for m in pg.PG_MIGRATIONS]


def test_a_newer_schema_is_refused(pg_url: str) -> None:
    pg.Database(pg_url).run("probe", lambda conn: None)
    with psycopg.connect(pg_url) as conn:
        conn.execute("INSERT INTO agentkeel_schema (version, component) VALUES (%s, 'future')",
                     (len(pg.PG_MIGRATIONS) + 1,))
    with pytest.raises(StoreError, match="newer than this agentkeel knows"):
        pg.Database(pg_url).run("probe", lambda conn: None)


def test_an_unreachable_server_names_it_without_the_password() -> None:
    url = f"postgresql://agentkeel:s3cret@127.0.0.1:{free_port()}/nowhere"
    with pytest.raises(StoreError) as info:
        pg.Database(url).run("probe", lambda conn: None)
    assert "127.0.0.1" in str(info.value) and "s3cret" not in str(info.value)


def test_store_url_from_config_or_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    assert pg.store_url(Config.from_dict({})) is None
    assert pg.store_url(Config.from_dict({"store": {"url": "postgresql://h/db"}})) == "postgresql://h/db"
    monkeypatch.setenv("AK_PG", "postgresql://u:pw@h/db")
    assert pg.store_url(Config.from_dict({"store": {"url_env": "AK_PG"}})) == "postgresql://u:pw@h/db"
    with pytest.raises(ConfigError, match="not set"):
        pg.store_url(Config.from_dict({"store": {"url_env": "AK_NOPE"}}))
    with pytest.raises(ConfigError, match="postgresql://") as info:
        pg.store_url(Config.from_dict({"store": {"url": "mysql://u:topsecret@h/db"}}))
    assert "topsecret" not in str(info.value)
