"""``agentkeel tools`` and ``agentkeel plugins`` with a broken third-party plugin
installed, and how ``tools`` shows a tool that declares no permissions."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.cli.helpers import agentkeel, errors, fake_plugin

BROKEN = {
    "import": """\
        raise ImportError("broken_mod needs frobnicate, which is not installed")
        """,
    "bad-tool": """\
        from agentkeel import hookimpl, tool

        @tool(permissions=["read"], rollback="no_such_tool")
        async def wobble() -> dict:
            \"\"\"Wobble.\"\"\"
            return {}

        @hookimpl
        def agentkeel_register_tools(register):
            register(wobble)
        """,
}
OPEN = """\
    from agentkeel import hookimpl, tool

    @tool(idempotent=True)
    async def ping() -> dict:
        \"\"\"Answer pong; declares no permissions.\"\"\"
        return {"pong": True}

    @hookimpl
    def agentkeel_register_tools(register):
        register(ping)
    """
HINT = "AGENTKEEL_DISABLE_PLUGINS=broken"


@pytest.fixture(params=sorted(BROKEN))
def broken_site(request: pytest.FixtureRequest, tmp_path: Path) -> Path:
    """A site directory with one healthy extra plugin (``open``) and one broken one (``broken``)."""
    site = tmp_path / "site"
    fake_plugin(site, "open", OPEN)
    return fake_plugin(site, "broken", BROKEN[request.param])


def test_tools_lists_the_healthy_tools_and_the_broken_plugin(workdir: Path, broken_site: Path) -> None:
    proc = agentkeel("tools", cwd=workdir, path=broken_site)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = {line.split()[0]: line for line in proc.stdout.splitlines()}
    assert {"lookup_order", "issue_refund", "ping"} <= lines.keys()
    assert "wobble" not in lines
    assert "BROKEN" in lines["broken"] and HINT in lines["broken"]
    assert "Traceback" not in proc.stderr

    proc = agentkeel("tools", "--json", cwd=workdir, path=broken_site)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    names = {t["name"] for t in json.loads(proc.stdout)}
    assert {"lookup_order", "issue_refund", "ping"} <= names and "wobble" not in names
    assert any("'broken'" in line and HINT in line for line in errors(proc)), proc.stderr


def test_plugins_lists_the_broken_plugin_with_its_error(workdir: Path, broken_site: Path) -> None:
    proc = agentkeel("plugins", "--json", cwd=workdir, path=broken_site)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    plugins = {p["name"]: p for p in json.loads(proc.stdout)}
    assert plugins["support"]["hooks"] and not plugins["support"].get("error")
    assert plugins["open"]["hooks"] == ["agentkeel_register_tools"]
    assert HINT in plugins["broken"]["error"]
    assert [name for name, p in plugins.items() if p.get("error")] == ["broken"]

    proc = agentkeel("plugins", cwd=workdir, path=broken_site)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = {line.split()[0]: line for line in proc.stdout.splitlines()}
    assert "hooks:" in lines["support"] and "hooks:" in lines["open"]
    assert "BROKEN" in lines["broken"] and HINT in lines["broken"]


def test_other_commands_refuse_a_broken_plugin_in_one_line(workdir: Path, broken_site: Path) -> None:
    for args in (("run", "where is order 1003", "--user", "demo"), ("runs",)):
        proc = agentkeel(*args, cwd=workdir, path=broken_site)
        assert proc.returncode == 2, proc.stdout + proc.stderr
        assert "Traceback" not in proc.stderr
        (line,) = errors(proc)
        assert line.startswith("error: plugin 'broken'") and HINT in line, line
    proc = agentkeel("run", "where is order 1003", "--user", "demo", cwd=workdir, path=broken_site,
                     env={"AGENTKEEL_DISABLE_PLUGINS": "broken"})
    assert proc.returncode == 0, proc.stdout + proc.stderr  # the hint works


def test_tool_without_permissions_is_marked_explicit_grant_only(workdir: Path, tmp_path: Path) -> None:
    site = fake_plugin(tmp_path / "site", "open", OPEN)
    proc = agentkeel("tools", cwd=workdir, path=site)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = {line.split()[0]: line for line in proc.stdout.splitlines()}
    assert "perms=(none: explicit grant only)" in lines["ping"]
    assert "perms=read " in lines["lookup_order"]
    tools = {t["name"]: t for t in json.loads(agentkeel("tools", "--json", cwd=workdir, path=site).stdout)}
    assert tools["ping"]["permissions"] == []
