"""PostgreSQL tables of the memory (see ``agentkeel.pg_schema``)."""

from __future__ import annotations

V1: tuple[str, ...] = ()
"""Version 1 of the memory's tables."""
