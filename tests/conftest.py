"""Every test gets its own state directory: nothing touches the user's real data."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(autouse=True)
def isolated_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    home = tmp_path / "agentkeel-home"
    monkeypatch.setenv("AGENTKEEL_HOME", str(home))
    monkeypatch.setenv("AGENTKEEL_SHOP_DB", str(tmp_path / "shop.db"))
    monkeypatch.delenv("AGENTKEEL_CONFIG", raising=False)
    monkeypatch.delenv("AGENTKEEL_LOAD_PLUGINS", raising=False)
    monkeypatch.delenv("AGENTKEEL_DISABLE_PLUGINS", raising=False)
    return home
