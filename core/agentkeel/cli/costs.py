"""``agentkeel costs``: where the money went, from the cost ledger (chapter exercise 22.6.2).

``--by`` groups the ledger's rows (tier, model, tool, user, session, day,
reason, kind, run, principal); ``--top N`` lists the most expensive runs
instead; ``--since``/``--until`` take a date (``2026-12-01``) or a date and time
(``2026-12-01T09:30``) in ``[budget] timezone``, or Unix seconds.
"""

from __future__ import annotations

import datetime as dt
import zoneinfo
from typing import Any

import click

from agentkeel.cli.common import build_system, check_text, config_option, echo_json, json_option, load_config
from agentkeel.cost.store import GROUPS


def _moment(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    return value  # parsed once the configuration (its time zone) is known


def parse_moment(value: str, timezone: str, what: str) -> float:
    """``value`` (a date, a date and time, or Unix seconds) as Unix seconds; a usage error otherwise."""
    try:
        seconds = float(value)
    except ValueError:
        pass
    else:
        if seconds == seconds and abs(seconds) < 1e11:  # not NaN, not absurd
            return seconds
        raise click.BadParameter(f"{value!r} is not a time", param_hint=what)
    try:
        moment = dt.datetime.fromisoformat(value)
    except ValueError:
        raise click.BadParameter(
            f"{value!r} is not a date (2026-12-01), a date and time (2026-12-01T09:30) or Unix seconds",
            param_hint=what) from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=zoneinfo.ZoneInfo(timezone))
    return moment.timestamp()


@click.command()
@click.option("--by", "group", type=click.Choice(GROUPS), default="tier", show_default=True,
              help="What to group the spending by.")
@click.option("--top", type=click.IntRange(min=1), default=None, help="List the N most expensive runs instead.")
@click.option("--cascade", is_flag=True, help="The cascade's hit rate and its saving against the strongest tier.")
@click.option("--since", default=None, callback=_moment, help="From this date or time (in [budget] timezone).")
@click.option("--until", default=None, callback=_moment, help="Up to this date or time (excluded).")
@click.option("--user", "user_id", default=None, callback=check_text, help="Only this user's spending.")
@config_option
@json_option
def costs(group: str, top: int | None, cascade: bool, since: str | None, until: str | None, user_id: str | None,
          config_path: str | None, as_json: bool) -> None:
    """Spending from the cost ledger: totals by tier, model, tool, user, session, day or reason."""
    config = load_config(config_path)
    start = parse_moment(since, config.timezone, "--since") if since else None
    end = parse_moment(until, config.timezone, "--until") if until else None
    system = build_system(config)
    try:
        if cascade:
            report = system.cascade_report(since=start, until=end)
            if as_json:
                echo_json(report)
                return
            _print_cascade(report)
            return
        if top is not None:
            rows = system.top_runs(top, user=user_id, since=start, until=end)
            if as_json:
                echo_json(rows)
                return
            _print_top(rows)
            return
        rows = system.costs(group, user=user_id, since=start, until=end)
        if as_json:
            echo_json({"by": group, "rows": rows, "total_usd": sum(r["cost_usd"] for r in rows)})
            return
        _print_totals(group, rows)
    finally:
        system.close()


def _print_totals(group: str, rows: list[dict[str, Any]]) -> None:
    if not rows:
        click.echo("no spending in the ledger for that selection")
        return
    width = max(len(group), *(len(str(r["key"])) for r in rows))
    click.echo(f"{group:<{width}}  {'cost (USD)':>12}  {'calls':>6}  {'tokens in':>10}  {'tokens out':>10}  estimated")
    for r in rows:
        estimated = f"${r['estimated_usd']:.6f}" if r["estimated_usd"] else "-"
        click.echo(f"{r['key']!s:<{width}}  {r['cost_usd']:12.6f}  {r['calls']:6d}  {r['input_tokens']:10d}  "
                   f"{r['output_tokens']:10d}  {estimated}")
    total = sum(r["cost_usd"] for r in rows)
    click.echo(f"{'total':<{width}}  {total:12.6f}  {sum(r['calls'] for r in rows):6d}")


def _print_cascade(report: dict[str, Any]) -> None:
    if not report["runs"]:
        click.echo("no LLM calls in the ledger for that selection")
        return
    click.echo(f"runs with LLM calls: {report['runs']}; served by the first tier alone: "
               f"{report['first_tier_runs']} ({report['hit_rate']:.0%})")
    click.echo(f"LLM cost ${report['llm_cost_usd']:.6f}; the same tokens on {report['strongest_tier']}: "
               f"${report['strongest_tier_cost_usd']:.6f}; saving ${report['saving_usd']:.6f}")


def _print_top(rows: list[dict[str, Any]]) -> None:
    if not rows:
        click.echo("no spending in the ledger for that selection")
        return
    for r in rows:
        click.echo(f"{r['run_id']}  ${r['cost_usd']:.6f}  {r['calls']:3d} calls  {r['user_id']}/{r['session_id']}")
