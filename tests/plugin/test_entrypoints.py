"""Entry-point plugins: each failure names the entry point that failed, with the way out."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import pytest
from agentkeel.errors import PluginError
from agentkeel.plugin.manager import build_plugin_manager


def install(root: Path, dist: str, entry_points: dict[str, str], modules: dict[str, str]) -> None:
    """A minimal installed distribution: a dist-info with an ``agentkeel`` entry-point group."""
    info = root / f"{dist}-1.0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 1.0\n")
    lines = "\n".join(f"{name} = {value}" for name, value in entry_points.items())
    (info / "entry_points.txt").write_text(f"[agentkeel]\n{lines}\n")
    for name, source in modules.items():
        (root / f"{name}.py").write_text(source)


@pytest.fixture
def site(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.syspath_prepend(str(tmp_path))
    importlib.invalidate_caches()
    yield tmp_path
    for name in ("ep_good", "ep_broken", "ep_klass"):
        sys.modules.pop(name, None)


GOOD = "from agentkeel import hookimpl\n\n@hookimpl\ndef agentkeel_event(event):\n    pass\n"


def test_an_import_failure_names_its_entry_point_even_when_another_is_blocked(
    site: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    install(site, "good-dist", {"good": "ep_good"}, {"ep_good": GOOD})
    install(site, "broken-dist", {"broken": "ep_broken"}, {"ep_broken": "raise ImportError('no such thing')\n"})
    monkeypatch.setenv("AGENTKEEL_DISABLE_PLUGINS", "good")
    with pytest.raises(PluginError) as info:
        build_plugin_manager()
    assert info.value.plugin == "broken"
    assert "no such thing" in str(info.value) and "broken-dist" in str(info.value)
    assert "AGENTKEEL_DISABLE_PLUGINS=broken" in str(info.value)


def test_an_entry_point_naming_a_class_is_refused_with_a_working_alternative(site: Path) -> None:
    install(site, "klass-dist", {"klass": "ep_klass:Planner"},
            {"ep_klass": "class Planner:\n    def agentkeel_plan(self):\n        return None\n"})
    with pytest.raises(PluginError, match="names a class") as info:
        build_plugin_manager()
    assert info.value.plugin == "klass" and "instance" in str(info.value)


def test_tolerant_loading_keeps_the_healthy_and_lists_the_broken(site: Path) -> None:
    install(site, "good-dist", {"good": "ep_good"}, {"ep_good": GOOD})
    install(site, "broken-dist", {"broken": "ep_broken"}, {"ep_broken": "raise ImportError('no such thing')\n"})
    loaded = build_plugin_manager(tolerant=True)
    assert loaded.pm.has_plugin("good")
    assert [b.name for b in loaded.broken] == ["broken"]
    assert loaded.distributions["good"] == ("good-dist", "1.0")


def test_an_entry_point_named_like_a_default_is_its_own_plugin(site: Path) -> None:
    install(site, "third-party", {"journal": "ep_good"}, {"ep_good": GOOD})
    loaded = build_plugin_manager()
    assert loaded.pm.has_plugin("journal") and loaded.pm.has_plugin("agentkeel.journal.default")


def test_legacy_short_names_still_disable_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AGENTKEEL_DISABLE_PLUGINS", "memory_sqlite")
    loaded = build_plugin_manager(load_entrypoints=False)
    assert not loaded.pm.has_plugin("agentkeel.memory.sqlite")
    assert loaded.pm.is_blocked("agentkeel.memory.sqlite")
