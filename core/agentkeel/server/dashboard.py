"""The operators' cost dashboard: ``GET /dashboard`` (the page), ``/dashboard/assets/{name}``
(its script, style sheet and the vendored Chart.js) and ``GET /v1/dashboard`` (its data).

The page holds no data and needs no key to load; it asks for an admin API key (kept in
the tab's ``sessionStorage``, or taken from the address's ``#key=...`` fragment, which it
then removes) and fetches ``/v1/dashboard`` with it. Everything it loads comes from this
server: no CDN, no external address (its Content-Security-Policy forbids any).

``dashboard_data(system)`` computes the data from the cost ledger and the journal, so it
can be used (and tested) without HTTP.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections import Counter
from collections.abc import Mapping
from importlib import resources
from typing import Annotated, Any

import attrs
from fastapi import Depends, FastAPI, Path, Query
from fastapi.responses import HTMLResponse, Response

from agentkeel.runtime.system import AgentSystem
from agentkeel.server.problems import Problem
from agentkeel.server.service import ADMIN_PERMISSION, ERRORS, Caller, Service, authenticated

__all__ = ["ASSETS", "CHART_GROUPS", "LATEST_RUNS", "dashboard_data", "install"]

log = logging.getLogger("agentkeel.server")

CHART_GROUPS = ("day", "tier", "model", "tool", "user")
"""The ledger groupings the dashboard charts (``AgentSystem.costs(by=...)``)."""

LATEST_RUNS = 20
"""How many of the newest runs the dashboard lists."""

MAX_LIMIT = 10_000
"""The most runs ``GET /v1/dashboard?limit=`` counts."""

MAX_TIME = 1e11
"""The largest ``since``/``until`` accepted (Unix seconds: year 5138)."""

ASSETS: dict[str, str] = {
    "dashboard.js": "text/javascript; charset=utf-8",
    "dashboard.css": "text/css; charset=utf-8",
    "chart.umd.min.js": "text/javascript; charset=utf-8",
    "chart.js.LICENSE.md": "text/markdown; charset=utf-8",
}
"""The files ``/dashboard/assets/{name}`` serves, with their content types: no other name is looked up."""

PAGE = "dashboard.html"
VERSION_MARK = "__ASSET_VERSION__"
"""Replaced in the page by a digest of the assets, so a new release's files are not read from a stale cache."""

ASSET_CACHE = "public, max-age=3600"
PAGE_HEADERS = {
    "Cache-Control": "no-cache",
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
        "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    ),
    "Referrer-Policy": "no-referrer",
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
}


# --- the data -------------------------------------------------------------------------------


def dashboard_data(
    system: AgentSystem, *, since: float | None = None, until: float | None = None, limit: int = 1000,
) -> dict[str, Any]:
    """What the dashboard shows, from ``system``'s ledger and journal.

    Spending (``spend``) is the ledger grouped by day (oldest first), tier, model, tool and
    user (most expensive first), as ``AgentSystem.costs`` returns it, for ledger rows with
    ``since <= ts < until``. ``runs`` counts the newest ``limit`` journaled runs created in
    the same window by status; ``latest_runs`` are the newest ``LATEST_RUNS`` of them with
    what the ledger holds for each. ``totals`` sums the ledger (spend, priced calls, LLM
    and tool calls) and counts the runs.
    """
    if limit < 1:
        raise ValueError(f"limit must be a whole number >= 1, got {limit!r}")
    spend = {by: system.costs(by, since=since, until=until) for by in CHART_GROUPS}
    spend["day"] = sorted(spend["day"], key=lambda row: str(row["key"]))
    kinds = {str(row["key"]): row for row in system.costs("kind", since=since, until=until)}
    records = [r for r in system.journal.list_runs(limit)
               if (since is None or r.created_at >= since) and (until is None or r.created_at < until)]
    statuses = Counter(r.status for r in records)
    latest = records[:LATEST_RUNS]
    costs = system.budgets.run_costs([r.run_id for r in latest])
    live = set(system.live_runs())
    tier_rows = spend["tier"]
    return {
        "generated_at": time.time(),
        "window": {"since": since, "until": until},
        "totals": {
            "spend_usd": sum(float(row["cost_usd"]) for row in tier_rows),
            "estimated_usd": sum(float(row["estimated_usd"]) for row in tier_rows),
            "priced_calls": sum(int(row["calls"]) for row in tier_rows),
            "llm_calls": int(kinds["llm"]["calls"]) if "llm" in kinds else 0,
            "llm_cost_usd": float(kinds["llm"]["cost_usd"]) if "llm" in kinds else 0.0,
            "tool_calls": int(kinds["tool"]["calls"]) if "tool" in kinds else 0,
            "tool_cost_usd": float(kinds["tool"]["cost_usd"]) if "tool" in kinds else 0.0,
            "runs": len(records),
        },
        "spend": spend,
        "cascade": system.cascade_report(since=since, until=until),
        "runs": {
            "by_status": dict(sorted(statuses.items(), key=lambda item: (-item[1], item[0]))),
            "counted": len(records),
            "limit": limit,
            "truncated": len(records) >= limit,
        },
        "latest_runs": [
            {
                "run_id": r.run_id,
                "status": r.status,
                "user_id": r.user_id,
                "session_id": r.session_id,
                "message": r.message[:200],
                "created_at": r.created_at,
                "updated_at": r.updated_at,
                "cost_usd": costs.get(r.run_id, 0.0),
                "live": r.run_id in live,
                "link": f"/v1/runs/{r.run_id}",
            }
            for r in latest
        ],
    }


# --- the static files -----------------------------------------------------------------------


@attrs.frozen
class _Static:
    """The page and its assets, read once from the package data."""

    page: bytes | None
    assets: Mapping[str, bytes]
    etags: Mapping[str, str]

    @classmethod
    def load(cls) -> _Static:
        folder = resources.files("agentkeel.server") / "static"
        found: dict[str, bytes] = {}
        for name in (PAGE, *ASSETS):
            try:
                found[name] = (folder / name).read_bytes()
            except OSError as exc:
                log.warning("the dashboard's %s is not installed (%s): /dashboard will not work", name, exc)
        page = found.pop(PAGE, None)
        etags = {name: '"' + hashlib.sha256(data).hexdigest()[:20] + '"' for name, data in found.items()}
        version = hashlib.sha256("".join(sorted(etags.values())).encode()).hexdigest()[:12]
        if page is not None:
            page = page.replace(VERSION_MARK.encode(), version.encode())
        return cls(page, found, etags)


def _asset_responses() -> dict[int | str, dict[str, Any]]:
    types = sorted({kind.split(";")[0] for kind in ASSETS.values()})
    return {200: {"description": "The file", "content": {kind: {"schema": {"type": "string"}} for kind in types}},
            404: ERRORS[404]}


# --- the routes -----------------------------------------------------------------------------


def install(app: FastAPI, service: Service) -> None:
    """Add the dashboard's routes to ``app``."""
    static = _Static.load()

    @app.get("/dashboard", response_class=HTMLResponse, summary="The operators' cost dashboard (an HTML page)",
             responses={404: ERRORS[404]})
    async def dashboard_page() -> HTMLResponse:
        if static.page is None:
            raise Problem(404, "the dashboard page is not installed (agentkeel/server/static/dashboard.html)")
        return HTMLResponse(static.page, headers=PAGE_HEADERS)

    @app.get("/dashboard/assets/{name}", response_class=Response, responses=_asset_responses(),
             summary="A file of the dashboard page (its script, style sheet, Chart.js)")
    async def dashboard_asset(
        name: Annotated[str, Path(min_length=1, max_length=40, pattern=r"^[A-Za-z0-9._-]+$")],
    ) -> Response:
        data = static.assets.get(name) if name in ASSETS else None
        if data is None:
            raise Problem(404, f"no dashboard asset {name!r}")
        return Response(data, media_type=ASSETS[name], headers={
            "Cache-Control": ASSET_CACHE, "ETag": static.etags[name], "X-Content-Type-Options": "nosniff"})

    @app.get("/v1/dashboard", response_model=dict[str, Any], responses={k: v for k, v in ERRORS.items() if k != 503},
             summary="The cost dashboard's data: spending by day, tier, model, tool and user, the cascade, runs "
                     "(an admin key)")
    async def dashboard_json(
        caller: Annotated[Caller, Depends(authenticated)],
        since: Annotated[float | None, Query(ge=0, le=MAX_TIME, allow_inf_nan=False,
                                             description="Only what happened from this Unix time on")] = None,
        until: Annotated[float | None, Query(ge=0, le=MAX_TIME, allow_inf_nan=False,
                                             description="Only what happened before this Unix time")] = None,
        limit: Annotated[int, Query(ge=1, le=MAX_LIMIT,
                                    description="How many of the newest runs to count by status")] = 1000,
    ) -> dict[str, Any]:
        if not caller.admin:
            raise Problem(403, f"the dashboard needs a key whose principal holds {ADMIN_PERMISSION!r}; "
                               f"{caller.name!r} does not")
        return dashboard_data(service.system, since=since, until=until, limit=limit)
