"""The operators' cost dashboard: ``dashboard_data`` against the ledger it reads, the routes
(``/dashboard``, its assets, ``/v1/dashboard``), and the page itself in Debian's headless
Chromium, driven by Playwright, against a real server: its numbers, charts and run rows must
be the ledger's, a non-admin key must see an error and no numbers, and nothing it loads may
come from anywhere but the server.

The browser test is skipped when ``/usr/bin/chromium`` (or Playwright) is missing, unless
``CI=true``: then it fails, so CI cannot pass by skipping it (as the Docker tests do).
"""

from __future__ import annotations

import json
import os
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from agentkeel import AgentRequest, AgentSystem, Config, RunStatus
from agentkeel.cost.sqlite_store import SQLiteBudgetStore
from agentkeel.cost.store import LedgerEntry
from agentkeel.server.dashboard import ASSETS, LATEST_RUNS, dashboard_data

from tests.server.conftest import REPO, LiveServer, start_server

CHROMIUM = Path("/usr/bin/chromium")
SCREENSHOT = REPO / "build" / "test-artifacts" / "dashboard.png"
DAY1 = 1764590400.0  # 2025-12-01 12:00 UTC: before any run of the tests

TIERS = """
[[models.tiers]]
name = "fast"
model = "gpt-4o-mini"
max_tokens = 1024

[[models.tiers]]
name = "strong"
model = "gpt-4o"
max_tokens = 2048
"""

SYSTEM_CONFIG = """
[principals.alice]
permissions = ["read", "refunds"]

[principals.root]
permissions = ["admin", "approve", "read", "refunds"]

[tools.lookup_order]
cost_usd = 0.002
""" + TIERS


def money(value: float) -> str:
    """How the page writes an amount."""
    return f"${value:.6f}"


def llm_row(run_id: str, user: str, cost: float, *, tier: str, model: str, reason: str, ts: float = 0.0,
            purpose: str = "plan") -> LedgerEntry:
    return LedgerEntry(run_id=run_id, user_id=user, session_id="default", principal=user, kind="llm",
                       cost_usd=cost, purpose=purpose, reason=reason, model=model, tier=tier,
                       input_tokens=1000, output_tokens=100, ts=ts)


# --- dashboard_data, without HTTP -----------------------------------------------------------------


@pytest.fixture
def system(tmp_path: Path) -> Iterator[AgentSystem]:
    path = tmp_path / "agentkeel.toml"
    path.write_text(textwrap.dedent(SYSTEM_CONFIG))
    with AgentSystem(Config.load(path)) as running:
        yield running


def test_dashboard_data_is_the_ledger_and_the_journal(system: AgentSystem) -> None:
    asks = [("alice", "where is order 1003"), ("root", "where is order 1003"),
            ("alice", "refund order 1002 if it has shipped"), ("root", "is widget-1 in stock")]
    runs = {}
    for user, message in asks:
        response = system.run_sync(AgentRequest(message=message, user_id=user))
        assert response.status is RunStatus.SUCCEEDED, response
        runs[(user, message)] = response.run_id
    first, escalated = runs[("alice", "where is order 1003")], runs[("root", "is widget-1 in stock")]
    system.budgets.record(llm_row(first, "alice", 0.00015, tier="fast", model="gpt-4o-mini", reason="first_tier"))
    system.budgets.record(llm_row(escalated, "root", 0.0002, tier="fast", model="gpt-4o-mini", reason="first_tier"))
    system.budgets.record(llm_row(escalated, "root", 0.0025, tier="strong", model="gpt-4o", reason="escalation"))
    system.budgets.record(llm_row("old-run", "bob", 0.5, tier="strong", model="gpt-4o", reason="first_tier",
                                  ts=DAY1))

    data = dashboard_data(system)
    json.dumps(data, allow_nan=False)  # the route answers it as JSON
    for by in ("tier", "model", "tool", "user"):
        assert data["spend"][by] == system.costs(by)
    assert data["spend"]["day"] == sorted(system.costs("day"), key=lambda row: row["key"])
    assert data["spend"]["day"][0]["key"] == "2025-12-01"
    ledger = system.ledger()
    assert data["totals"]["spend_usd"] == pytest.approx(sum(e.cost_usd for e in ledger))
    assert data["totals"]["spend_usd"] == pytest.approx(0.006 + 0.00015 + 0.0002 + 0.0025 + 0.5)
    assert data["totals"]["priced_calls"] == len(ledger)
    assert data["totals"]["llm_calls"] == 4 and data["totals"]["tool_calls"] == 3
    tools = {row["key"]: row for row in data["spend"]["tool"]}
    assert tools["lookup_order"]["cost_usd"] == pytest.approx(0.006) and tools["lookup_order"]["calls"] == 3
    users = {row["key"]: row["cost_usd"] for row in data["spend"]["user"]}
    assert users == pytest.approx({"alice": 0.004 + 0.00015, "root": 0.002 + 0.0027, "bob": 0.5})
    assert data["cascade"] == system.cascade_report()
    assert data["cascade"]["runs"] == 3 and data["cascade"]["hit_rate"] == pytest.approx(1 / 3)

    assert data["totals"]["runs"] == 4 and data["runs"]["by_status"] == {"succeeded": 4}
    assert data["runs"]["truncated"] is False
    latest = data["latest_runs"]
    assert [r["run_id"] for r in latest] == [r.run_id for r in system.runs(LATEST_RUNS)]
    for row in latest:
        assert row["cost_usd"] == pytest.approx(sum(e.cost_usd for e in system.ledger(run_id=row["run_id"])))
        assert row["link"] == f"/v1/runs/{row['run_id']}" and row["status"] == "succeeded"
    assert {r["run_id"]: r["user_id"] for r in latest} == {run_id: user for (user, _), run_id in runs.items()}

    recent = dashboard_data(system, since=DAY1 + 1)
    assert "bob" not in {row["key"] for row in recent["spend"]["user"]}
    assert recent["totals"]["spend_usd"] == pytest.approx(data["totals"]["spend_usd"] - 0.5)
    assert recent["totals"]["runs"] == 4
    old = dashboard_data(system, until=DAY1 + 1)
    assert old["spend"]["user"] == system.costs("user", until=DAY1 + 1)
    assert [row["key"] for row in old["spend"]["user"]] == ["bob"]
    assert old["totals"]["runs"] == 0 and old["latest_runs"] == [] and old["runs"]["by_status"] == {}
    assert old["cascade"]["runs"] == 1 and old["cascade"]["hit_rate"] == 0.0  # bob's run used the strong tier
    few = dashboard_data(system, limit=2)
    assert few["runs"]["counted"] == 2 and few["runs"]["truncated"] is True and len(few["latest_runs"]) == 2
    with pytest.raises(ValueError, match="limit"):
        dashboard_data(system, limit=0)


# --- the routes, over HTTP ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    """The shared server of ``conftest.py`` with two LLM tiers configured (the cascade has a first tier)."""
    live = start_server(tmp_path_factory.mktemp("dashboard"), extra=TIERS)
    try:
        yield live
    finally:
        if live.process.poll() is None:
            live.stop()


@pytest.fixture(scope="module")
def served(server: LiveServer) -> dict[str, str]:
    """Runs of alice and root through ``POST /v1/runs/wait``, and LLM rows for two of them in the ledger
    (no LLM is reachable here): a first-tier run and an escalated one, so the cascade's hit rate is 50%."""
    asks = [("alice", "where is order 1003"), ("alice", "is widget-1 in stock"),
            ("alice", "refund order 1002 if it has shipped"), ("root", "where is order 1003"),
            ("root", "refund order 1002 if it has shipped")]
    runs: dict[str, str] = {}
    for user, message in asks:
        with server.client(user) as client:
            response = client.post("/v1/runs/wait", json={"message": message})
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["status"] == "succeeded", body
        runs[f"{user}: {message}"] = body["run_id"]
    store = SQLiteBudgetStore(server.home)
    try:
        store.record(llm_row(runs["alice: where is order 1003"], "alice", 0.00015, tier="fast", model="gpt-4o-mini",
                             reason="first_tier"))
        escalated = runs["root: refund order 1002 if it has shipped"]
        store.record(llm_row(escalated, "root", 0.0002, tier="fast", model="gpt-4o-mini", reason="first_tier"))
        store.record(llm_row(escalated, "root", 0.0025, tier="strong", model="gpt-4o", reason="escalation"))
    finally:
        store.close()
    return runs


def grouped(client: httpx.Client, by: str) -> list[dict[str, Any]]:
    response = client.get("/v1/costs", params={"by": by})
    assert response.status_code == 200, response.text
    rows: list[dict[str, Any]] = response.json()
    return rows


def test_the_dashboard_json_is_the_ledger_and_needs_an_admin(server: LiveServer, served: dict[str, str]) -> None:
    with server.client("root") as root:
        response = root.get("/v1/dashboard")
        assert response.status_code == 200, response.text
        data = response.json()
        for by in ("tier", "model", "tool", "user"):
            assert data["spend"][by] == grouped(root, by)
        assert data["spend"]["day"] == sorted(grouped(root, "day"), key=lambda row: row["key"])
        assert data["totals"]["spend_usd"] == pytest.approx(sum(r["cost_usd"] for r in grouped(root, "tool")))
        assert data["totals"]["spend_usd"] == pytest.approx(4 * 0.002 + 0.00015 + 0.0002 + 0.0025)
        assert data["totals"]["llm_calls"] == 3 and data["totals"]["runs"] == len(served)
        assert data["cascade"]["hit_rate"] == pytest.approx(0.5)
        assert data["runs"]["by_status"] == {"succeeded": len(served)}
        listed = root.get("/v1/runs", params={"limit": 1000}).json()
        assert [r["run_id"] for r in data["latest_runs"]] == [r["run_id"] for r in listed][:LATEST_RUNS]
        by_run = {row["key"]: row["cost_usd"] for row in grouped(root, "run")}
        for row in data["latest_runs"]:
            assert row["cost_usd"] == pytest.approx(by_run.get(row["run_id"], 0.0))
            assert root.get(row["link"]).json()["run_id"] == row["run_id"]
        assert root.get("/v1/dashboard", params={"limit": 2}).json()["runs"] == {
            "by_status": {"succeeded": 2}, "counted": 2, "limit": 2, "truncated": True}
        future = root.get("/v1/dashboard", params={"since": 4e10}).json()
        assert future["totals"]["spend_usd"] == 0 and future["latest_runs"] == [] and future["spend"]["tool"] == []
        for bad in ({"since": "nan"}, {"until": "inf"}, {"since": "-1"}, {"limit": "0"}, {"since": "yesterday"}):
            refused = root.get("/v1/dashboard", params=bad)
            assert refused.status_code == 422, (bad, refused.text)
            assert refused.headers["content-type"].startswith("application/problem+json")
    with server.client("carol") as carol:
        refused = carol.get("/v1/dashboard")
        assert refused.status_code == 403 and "admin" in refused.json()["detail"]
        assert refused.headers["content-type"].startswith("application/problem+json")
    with server.client() as anonymous:
        assert anonymous.get("/v1/dashboard").status_code == 401
        bad_key = anonymous.get("/v1/dashboard", headers={"Authorization": "Bearer ak_not_a_key"})
        assert bad_key.status_code == 401


def test_the_page_and_its_assets_are_served_from_the_package(server: LiveServer) -> None:
    with server.client() as client:
        page = client.get("/dashboard")
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        assert "default-src 'none'" in page.headers["content-security-policy"]
        assert page.headers["cache-control"] == "no-cache"
        html = page.text
        assert "__ASSET_VERSION__" not in html
        assert "http://" not in html and "https://" not in html and "//cdn" not in html
        for name, kind in ASSETS.items():
            asset = client.get(f"/dashboard/assets/{name}")
            assert asset.status_code == 200, name
            assert asset.headers["content-type"] == kind
            assert "max-age" in asset.headers["cache-control"] and asset.headers["etag"]
            assert asset.headers["x-content-type-options"] == "nosniff"
        for name in ("dashboard.css", "dashboard.js"):
            text = client.get(f"/dashboard/assets/{name}").text
            assert "http://" not in text and "https://" not in text, name
        assert "Chart.js v4" in client.get("/dashboard/assets/chart.umd.min.js").text[:200]
        for name in ("dashboard.html", "app.py", "..%2Fapp.py", "..%2F..%2Fserver%2Fapp.py", "chart.umd.min.js.map",
                     ".dashboard.js", "DASHBOARD.JS"):
            missing = client.get(f"/dashboard/assets/{name}")
            assert missing.status_code in (404, 422), (name, missing.status_code)
            assert missing.headers["content-type"].startswith("application/problem+json"), name
        assert client.get("/dashboard/assets/nothing.js").status_code == 404
        schema = client.get("/openapi.json").json()
        assert "text/html" in schema["paths"]["/dashboard"]["get"]["responses"]["200"]["content"]
        assert {"401", "403"} <= set(schema["paths"]["/v1/dashboard"]["get"]["responses"])
        assert "404" in schema["paths"]["/dashboard/assets/{name}"]["get"]["responses"]


# --- the page, in a browser -----------------------------------------------------------------------


def require_browser() -> Any:
    """Playwright's sync API, or a skip (a failure with ``CI=true``) naming what is missing."""
    problem = None
    if not CHROMIUM.exists():
        problem = f"{CHROMIUM} is missing (apt-get install chromium)"
    else:
        try:
            from playwright import sync_api
        except ImportError as exc:
            problem = f"playwright is not installed ({exc}); pip install agentkeel[test]"
    if problem is not None:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"CI=true and the dashboard's browser test cannot run: {problem}")
        pytest.skip(f"the dashboard's browser test needs Chromium: {problem}")
    return sync_api


LAUNCH_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
               "--no-first-run"]

CHARTS_JS = """() => Object.fromEntries(["day", "tier", "model", "tool", "user", "status"].map(group => {
  const canvas = document.querySelector(`[data-testid="chart-${group}"]`);
  const chart = window.Chart.getChart(canvas);
  const box = canvas.getBoundingClientRect();
  return [group, {width: box.width, height: box.height, pixels: canvas.width * canvas.height,
                  type: chart ? chart.config.type : null, labels: chart ? chart.data.labels : null,
                  data: chart ? chart.data.datasets[0].data : null,
                  same: chart === window.agentkeelDashboard.charts[group]}];
}))"""


def test_the_page_shows_the_ledger(server: LiveServer, served: dict[str, str]) -> None:
    sync_api = require_browser()
    with server.client("root") as root:
        data = root.get("/v1/dashboard").json()
        by_tool, by_user, by_run = grouped(root, "tool"), grouped(root, "user"), grouped(root, "run")
        runs = root.get("/v1/runs", params={"limit": 1000}).json()
        escalated = served["root: refund order 1002 if it has shipped"]
        steps = root.get(f"/v1/runs/{escalated}").json()
    run_costs = {row["key"]: row["cost_usd"] for row in by_run}
    requests: list[str] = []
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=LAUNCH_ARGS)
        try:
            context = browser.new_context(viewport={"width": 1366, "height": 768})
            page = context.new_page()
            page.on("request", lambda request: requests.append(request.url))
            problems: list[str] = []
            page.on("console", lambda message: problems.append(message.text) if message.type == "error" else None)
            page.on("pageerror", lambda error: problems.append(str(error)))
            page.goto(f"{server.url}/dashboard#key={server.keys['root']}")
            page.wait_for_selector('[data-testid="run-row-' + escalated + '"]', timeout=20_000)

            # the key left the address bar for this tab's sessionStorage
            assert page.evaluate("window.location.hash") == ""
            assert server.keys["root"] not in page.url
            assert page.evaluate("sessionStorage.getItem('agentkeel.dashboard.key')") == server.keys["root"]
            assert page.is_hidden('[data-testid="key-form"]') and page.is_hidden('[data-testid="error"]')

            def shown(testid: str) -> str:
                return str(page.locator(f'[data-testid="{testid}"]').inner_text()).strip()

            total = sum(row["cost_usd"] for row in by_tool)
            assert shown("total-spend") == money(total) == money(data["totals"]["spend_usd"])
            assert shown("total-runs") == str(len(runs)) == str(data["totals"]["runs"])
            assert shown("total-llm-calls") == "3" and shown("total-tool-calls") == "4"
            assert shown("cascade-hit-rate") == "50.0%"
            assert shown("cascade-saving") == money(data["cascade"]["saving_usd"])
            assert shown("spend-tool-lookup_order") == money(0.008)
            for row in by_tool:
                assert shown(f"spend-tool-{row['key']}") == money(row["cost_usd"])
            for row in by_user:
                assert shown(f"spend-user-{row['key']}") == money(row["cost_usd"])
            assert {row["key"] for row in by_user} == {"alice", "root"}
            for row in data["spend"]["tier"] + data["spend"]["model"]:
                assert row["key"] in {"fast", "strong", "gpt-4o-mini", "gpt-4o", "(none)"}
            assert shown("spend-tier-strong") == money(0.0025) and shown("spend-model-gpt-4o-mini") == money(0.00035)
            assert shown("runs-status-succeeded") == str(len(runs))

            # the charts: drawn, with the ledger's labels and amounts
            charts = page.evaluate(CHARTS_JS)
            for group, chart in charts.items():
                assert chart["same"] and chart["type"] is not None, group
                assert chart["width"] > 100 and chart["height"] > 100 and chart["pixels"] > 0, (group, chart)
            for group in ("day", "tier", "model", "tool", "user"):
                assert charts[group]["labels"] == [row["key"] for row in data["spend"][group]], group
                assert charts[group]["data"] == pytest.approx([row["cost_usd"] for row in data["spend"][group]])
            assert charts["tool"]["labels"] == [row["key"] for row in by_tool]
            assert charts["user"]["labels"] == [row["key"] for row in by_user]
            assert charts["status"]["labels"] == ["succeeded"] and charts["status"]["data"] == [len(runs)]

            # the latest runs, each with its ledger cost
            rows = page.locator('tr.run')
            assert rows.count() == min(LATEST_RUNS, len(runs))
            for run in runs[:LATEST_RUNS]:
                run_id = run["run_id"]
                assert shown(f"run-id-{run_id}") == run_id
                assert shown(f"run-status-{run_id}") == run["status"]
                assert shown(f"run-user-{run_id}") == run["user_id"]
                assert shown(f"run-cost-{run_id}") == money(run_costs.get(run_id, 0.0))
            assert shown(f"run-cost-{escalated}") == money(0.002 + 0.0002 + 0.0025)

            # readable on a laptop: no horizontal scrolling
            assert page.evaluate("document.documentElement.scrollWidth <= window.innerWidth")
            SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(SCREENSHOT))
            assert SCREENSHOT.stat().st_size > 10_000

            # a row expands to the run's steps, from /v1/runs/{id}
            page.click(f'[data-testid="run-row-{escalated}"]')
            page.wait_for_selector(f'[data-testid="steps-table-{escalated}"]', timeout=10_000)
            assert page.get_attribute(f'[data-testid="run-row-{escalated}"]', "aria-expanded") == "true"
            assert [s["tool_name"] for s in steps["steps"]] == ["lookup_order", "issue_refund"]
            for step in steps["steps"]:
                sid = f"{escalated}-{step['step_id']}"
                assert shown(f"step-id-{sid}") == str(step["step_id"])
                assert shown(f"step-tool-{sid}") == step["tool_name"]
                assert shown(f"step-status-{sid}") == step["status"]
                assert shown(f"step-cost-{sid}") == money(step["cost_usd"])
                assert shown(f"step-duration-{sid}") == f"{step['duration_s']:.3f} s"
            assert shown(f"run-total-{escalated}") == money(steps["total_cost_usd"])
            page.click(f'[data-testid="run-row-{escalated}"]')
            assert page.locator(f'[data-testid="steps-table-{escalated}"]').count() == 0
            assert problems == []  # no script error, no refused resource, no CSP violation
            assert any(url.startswith(f"{server.url}/v1/runs/{escalated}") for url in requests)
            context.close()

            # carol is no admin: an error, and no numbers
            for principal, key, status in (("carol", server.keys["carol"], "403"), ("nobody", "ak_wrong", "401")):
                context = browser.new_context(viewport={"width": 1366, "height": 768})
                page = context.new_page()
                page.on("request", lambda request: requests.append(request.url))
                page.goto(f"{server.url}/dashboard#key={key}")
                page.wait_for_selector('[data-testid="error"]', state="visible", timeout=20_000)
                message = page.locator('[data-testid="error"]').inner_text()
                assert status in message, (principal, message)
                assert page.is_hidden('[data-testid="content"]') and page.is_visible('[data-testid="key-form"]')
                for testid in ("total-spend", "total-runs", "cascade-hit-rate"):
                    assert page.locator(f'[data-testid="{testid}"]').text_content() == "", (principal, testid)
                assert page.locator("tr.run").count() == 0
                assert page.evaluate("window.location.hash") == ""
                assert page.evaluate("sessionStorage.getItem('agentkeel.dashboard.key')") is None
                context.close()
        finally:
            browser.close()
    assert requests, "the browser made no request"
    # nothing left the loopback server (a data: URL is no request over the network)
    assert [url for url in requests if not url.startswith(server.url + "/") and not url.startswith("data:")] == []
    assert f"{server.url}/dashboard/assets/chart.umd.min.js" in {url.split("?")[0] for url in requests}
