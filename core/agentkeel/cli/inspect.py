"""``agentkeel tools`` and ``agentkeel plugins``: what the installed plugins provide.

Both load the plugins tolerantly: a plugin that fails to load or registers
something invalid is listed with its error instead of hiding every other plugin.
Every other command refuses to start with such a plugin installed.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import click

from agentkeel.cli.common import build_system, config_option, echo_json, json_option, load_config, with_disable_hint

if TYPE_CHECKING:
    from agentkeel.runtime.system import AgentSystem

NO_PERMISSIONS = "(none: explicit grant only)"
"""How ``tools`` shows a tool that declares no permissions: deny by default means
only a principal that lists it under ``tools = [...]`` may call it."""


def _broken(system: AgentSystem) -> list[tuple[str, str]]:
    """(name, error with the way to disable it) for each plugin left out."""
    return [(b.name, with_disable_hint(b.name, b.error)) for b in system.broken_plugins]


def _warn_broken(broken: list[tuple[str, str]]) -> None:
    for name, error in broken:
        click.echo(f"warning: plugin {name!r} is broken and was left out: {error}", err=True)


def _tool_line(t: dict[str, Any]) -> str:
    flags = "idempotent" if t["idempotent"] else ("takes key" if t["accepts_idempotency_key"] else "never twice")
    rollback = f" rollback={t['rollback']}" if t["rollback"] else ""
    fallback = f" fallback={t['fallback']}" if t["fallback"] else ""
    perms = ",".join(t["permissions"]) or NO_PERMISSIONS
    line = (f"{t['name']:<20} [{t['plugin']}] perms={perms} {flags} "
            f"isolation={t['isolation']} timeout={t['timeout']:g}s{rollback}{fallback}")
    if t.get("source"):
        line += f"\n{'':<20}   from {t['source']}"
    derived = t.get("metadata_from") or {}
    if derived:
        shown = ", ".join(f"{field} <- {origin}" for field, origin in sorted(derived.items()))
        line += f"\n{'':<20}   metadata: {shown}"
    return line


@click.command()
@config_option
@json_option
def tools(config_path: str | None, as_json: bool) -> None:
    """List every registered tool with its plugin and metadata.

    A tool shown with perms=(none: explicit grant only) declares no permissions:
    only principals that list it under tools = [...] may call it.
    """
    system = build_system(load_config(config_path), tolerant=True)
    specs = [spec.to_dict() for _, spec in sorted(system.tools.all().items())]
    broken = _broken(system)
    if as_json:
        echo_json(specs)
        _warn_broken(broken)
        return
    for t in specs:
        click.echo(_tool_line(t))
    for name, error in broken:
        click.echo(f"{name:<20} [{name}] BROKEN (no tools loaded): {error}")


@click.command()
@config_option
@json_option
def plugins(config_path: str | None, as_json: bool) -> None:
    """List the loaded plugins with their version and hooks, and any broken plugin with its error."""
    system = build_system(load_config(config_path), tolerant=True)
    described = [dict(p) for p in system.plugins.describe()]
    errors = dict(_broken(system))
    for p in described:
        if p.get("error") or p["name"] in errors:
            p["error"] = errors.pop(p["name"], None) or with_disable_hint(p["name"], str(p["error"]))
    for name, error in errors.items():  # broken plugins the description does not list
        described.append({"name": name, "module": None, "distribution": None, "version": None,
                          "default": False, "hooks": [], "error": error})
    if as_json:
        echo_json(described)
        return
    width = max([20, *(len(p["name"]) for p in described)])
    for p in described:
        if p.get("error"):
            click.echo(f"{p['name']:<{width}} BROKEN  {p['error']}")
            continue
        origin = "default" if p["default"] else (p["distribution"] or "registered")
        click.echo(f"{p['name']:<{width}} {origin} {p['version'] or ''}  hooks: {', '.join(p['hooks'])}")
