"""The default API key store: table ``api_keys`` in ``<home>/agentkeel.db``.

With ``[store] url`` (or ``url_env``) set, keys live in that PostgreSQL database
instead (``agentkeel.permissions.keys_pg.PostgresKeyStore``), shared by every replica.
Otherwise, with ``[journal] backend = "memory"`` (tests, benchmarks) keys are kept in
the process, like the journal and the budget store.
"""

from __future__ import annotations

from agentkeel.config import Config
from agentkeel.markers import hookimpl
from agentkeel.permissions.keys import KeyStore


@hookimpl(trylast=True)
def agentkeel_open_key_store(config: Config) -> KeyStore:
    from agentkeel.pg import store_url

    url = store_url(config)
    if url is not None:
        from agentkeel.permissions.keys_pg import PostgresKeyStore

        return PostgresKeyStore(url)
    if config.section("journal").get("backend", "sqlite") == "memory":
        from agentkeel.permissions.keys import MemoryKeyStore

        return MemoryKeyStore()
    from agentkeel.permissions.keys_sqlite import SQLiteKeyStore

    return SQLiteKeyStore(config.home)
