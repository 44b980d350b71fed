"""The default API key store: table ``api_keys`` in ``<home>/agentkeel.db``.

With ``[journal] backend = "memory"`` (tests, benchmarks) keys are kept in the
process instead, like the journal and the budget store.
"""

from __future__ import annotations

from agentkeel.config import Config
from agentkeel.markers import hookimpl
from agentkeel.permissions.keys import KeyStore


@hookimpl(trylast=True)
def agentkeel_open_key_store(config: Config) -> KeyStore:
    if config.section("journal").get("backend", "sqlite") == "memory":
        from agentkeel.permissions.keys import MemoryKeyStore

        return MemoryKeyStore()
    from agentkeel.permissions.keys_sqlite import SQLiteKeyStore

    return SQLiteKeyStore(config.home)
