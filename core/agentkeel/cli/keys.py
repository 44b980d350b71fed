"""``agentkeel keys create|list|revoke``: the API keys of the HTTP service (``agentkeel serve``).

``create`` prints the new key's secret alone on the first line of stdout, once:
the store keeps only a hash of it, so it cannot be shown again (a lost key is
revoked and replaced). The key acts as a configured principal (``[principals.P]``
in agentkeel.toml). ``list`` shows every key's id, principal, state and use,
never a secret. ``create`` and ``revoke`` are written to the audit log (actions
``key_create`` and ``key_revoke``). The store is what ``agentkeel_open_key_store``
opens: by default ``<home>/agentkeel.db``, the file ``agentkeel serve`` reads.
"""

from __future__ import annotations

import math
import time
from typing import TYPE_CHECKING, Any

import click

from agentkeel.cli.common import (
    build_system,
    check_text,
    check_utf8,
    config_option,
    echo_json,
    json_option,
    load_config,
    one_line,
    printable,
    when,
)
from agentkeel.cli.costs import parse_moment
from agentkeel.permissions.keys import MAX_NAME_LENGTH, ApiKey, MemoryKeyStore

if TYPE_CHECKING:
    from agentkeel.runtime.system import AgentSystem

LIST_HINT = "`agentkeel keys list` shows them"


@click.group()
def keys() -> None:
    """API keys of the HTTP service: create, list and revoke them."""


def _rate_limit(ctx: click.Context, param: click.Parameter, value: float | None) -> float | None:
    if value is not None and (not math.isfinite(value) or value <= 0):
        raise click.BadParameter(f"{value!r} is not a finite number of requests per second > 0", ctx=ctx,
                                 param=param)
    return value


def _name(ctx: click.Context, param: click.Parameter, value: str) -> str:
    checked = check_utf8(ctx, param, value) or ""
    if len(checked) > MAX_NAME_LENGTH:
        raise click.BadParameter(f"must be at most {MAX_NAME_LENGTH} characters, got {len(checked)}", ctx=ctx,
                                 param=param)
    return checked


def key_dict(key: ApiKey, now: float) -> dict[str, Any]:
    """The record as JSON, with its ``state`` at ``now`` (never the secret nor its hash)."""
    return {**key.to_dict(), "state": key.state_at(now)}


def _audit(system: AgentSystem, principal: str, action: str, reason: str) -> None:
    system.audit.record(run_id="", principal=principal, action=action, tool="", decision="allow", reason=reason,
                        arg_keys=())
    system.stores.flush()


@keys.command("create")
@click.option("--principal", required=True, callback=check_text,
              help="The configured principal ([principals.P]) requests with the key act as.")
@click.option("--name", default="", callback=_name, help="What the key is for (shown by `keys list`).")
@click.option("--expires", default=None,
              help="When the key stops working: a date or date and time (in [budget] timezone), or Unix seconds.")
@click.option("--rate-limit", "rate_limit", type=float, default=None, callback=_rate_limit,
              help="Requests per second the service allows this key (default: no limit of its own).")
@config_option
@json_option
def create(principal: str, name: str, expires: str | None, rate_limit: float | None, config_path: str | None,
           as_json: bool) -> None:
    """Create a key for a principal and print its secret, once."""
    config = load_config(config_path)
    expires_at = parse_moment(expires, config.timezone, "--expires") if expires else None
    now = time.time()
    if expires_at is not None and expires_at <= now:
        raise click.BadParameter(f"{expires!r} is in the past; give a date or time after now", param_hint="--expires")
    system = build_system(config)
    try:
        if system.plugins.resolve_principal(principal, system.config) is None:
            raise click.ClickException(
                f"unknown principal {principal!r}: add [principals.{principal}] to agentkeel.toml")
        store = system.plugins.open_key_store(system.config)
        try:
            try:
                secret, key = store.create(principal, name=name, expires_at=expires_at, rate_limit=rate_limit)
            except ValueError as exc:
                raise click.ClickException(str(exc)) from exc
            transient = isinstance(store, MemoryKeyStore)
        finally:
            store.close()
        details = [f"name {name!r}"]
        if key.expires_at is not None:
            details.append(f"expires {when(key.expires_at)} UTC")
        if key.rate_limit is not None:
            details.append(f"rate limit {key.rate_limit:g}/s")
        _audit(system, principal, "key_create", f"key {key.key_id} created ({', '.join(details)})")
    finally:
        system.close()
    if as_json:
        echo_json({"key": secret, **key_dict(key, now)})
    else:
        click.echo(secret)
    click.echo(f"this key is shown once; store it now (key id {key.key_id}, principal {printable(principal)})",
               err=True)
    if transient:
        click.echo('note: [journal] backend = "memory" keeps keys in this process only; the key is gone already',
                   err=True)


@keys.command("list")
@click.option("--principal", default=None, callback=check_text, help="Only this principal's keys.")
@config_option
@json_option
def list_keys(principal: str | None, config_path: str | None, as_json: bool) -> None:
    """Every key, newest first: id, principal, name, state, dates and rate limit (never a secret)."""
    config = load_config(config_path)
    system = build_system(config)
    try:
        store = system.plugins.open_key_store(system.config)
        try:
            found = store.list(principal)
        finally:
            store.close()
    finally:
        system.close()
    now = time.time()
    if as_json:
        echo_json([key_dict(key, now) for key in found])
        return
    if not found:
        whose = f" of principal {printable(principal)}" if principal else ""
        click.echo(f"no API keys{whose}; `agentkeel keys create --principal P` makes one")
        return
    header = ("key id", "principal", "name", "state", "created", "expires", "last used", "rate limit")
    rows = [header, *(_row(key, now) for key in found)]
    widths = [max(len(row[i]) for row in rows) for i in range(len(header) - 1)]
    for row in rows:
        click.echo("  ".join([*(cell.ljust(width) for cell, width in zip(row, widths, strict=False)), row[-1]]))


def _row(key: ApiKey, now: float) -> tuple[str, ...]:
    def moment(ts: float | None) -> str:
        return "-" if ts is None else when(ts)

    return (
        key.key_id, one_line(key.principal), one_line(key.name) or "-", key.state_at(now), when(key.created_at),
        moment(key.expires_at), moment(key.last_used_at),
        "-" if key.rate_limit is None else f"{key.rate_limit:g}/s",
    )


@keys.command("revoke")
@click.argument("key_id", callback=check_text)
@config_option
@json_option
def revoke(key_id: str, config_path: str | None, as_json: bool) -> None:
    """Revoke a key: requests with it are refused from now on."""
    config = load_config(config_path)
    system = build_system(config)
    try:
        store = system.plugins.open_key_store(system.config)
        try:
            before = store.get(key_id)
            if before is None:
                raise click.ClickException(f"no API key {key_id} ({LIST_HINT})")
            key = store.revoke(key_id)
        finally:
            store.close()
        already = before.revoked_at is not None
        reason = f"key {key.key_id} " + (f"already revoked at {when(key.revoked_at)} UTC" if already and
                                          key.revoked_at is not None else "revoked")
        _audit(system, key.principal, "key_revoke", reason)
    finally:
        system.close()
    if as_json:
        echo_json(key_dict(key, time.time()))
        return
    if already and key.revoked_at is not None:
        click.echo(f"key {key.key_id} (principal {printable(key.principal)}) was already revoked at "
                   f"{when(key.revoked_at)} UTC")
        return
    click.echo(f"revoked key {key.key_id} (principal {printable(key.principal)})")
