"""The ``agentkeel`` command end to end, in a subprocess, with the demo plugin
loaded through its entry point and its real SQLite shop database."""

from __future__ import annotations

import json
import os
from pathlib import Path

from agentkeel.permissions.audit import verify

from tests.cli.helpers import agentkeel, refunds


def test_demo_refund_if_shipped_json(workdir: Path) -> None:
    proc = agentkeel("run", "refund order 1001 if it has shipped", "--user", "demo", "--json", cwd=workdir)
    assert proc.returncode == 0, proc.stderr
    assert "embedded demo defaults" in proc.stderr
    # Never silently: the note says who is active and what they may do.
    assert "'demo' holds code, email, read, refunds" in proc.stderr and "before serving real users" in proc.stderr
    out = json.loads(proc.stdout)
    assert out["status"] == "succeeded"
    assert [(s["step_id"], s["tool_name"], s["status"]) for s in out["steps"]] == [
        (1, "lookup_order", "succeeded"),
        (2, "issue_refund", "succeeded"),
    ]
    for s in out["steps"]:
        assert {"tool_args", "result", "error", "duration_s", "cost_usd"} <= s.keys()
    assert out["total_cost_usd"] == 0
    refund = out["steps"][1]
    assert refund["tool_args"]["amount"] == out["steps"][0]["result"]["total"]
    assert len(refunds(os.environ["AGENTKEEL_SHOP_DB"])) == 1


def test_demo_pending_order_is_not_refunded_and_human_output(workdir: Path) -> None:
    proc = agentkeel("run", "refund order 1002 if it has shipped", "--user", "demo", cwd=workdir)
    assert proc.returncode == 0, proc.stderr
    assert "issue_refund" in proc.stdout and "skipped" in proc.stdout
    assert "total $" in proc.stdout
    assert refunds(os.environ["AGENTKEEL_SHOP_DB"]) == []


def test_permission_denial_has_its_own_exit_code(workdir: Path) -> None:
    (workdir / "agentkeel.toml").write_text('[principals.viewer]\npermissions = ["read"]\n')
    proc = agentkeel("run", "refund order 1001 if it has shipped", "--user", "viewer", cwd=workdir)
    assert proc.returncode == 3, proc.stdout + proc.stderr
    assert "permission denied" in proc.stdout
    assert refunds(os.environ["AGENTKEEL_SHOP_DB"]) == []
    audit = Path(os.environ["AGENTKEEL_HOME"]) / "audit.jsonl"
    assert verify(audit).ok
    assert '"decision": "deny"' in audit.read_text() or '"decision":"deny"' in audit.read_text()
    check = agentkeel("audit", "verify", cwd=workdir)
    assert check.returncode == 0, check.stdout + check.stderr


def test_unknown_user_and_bad_config(workdir: Path) -> None:
    proc = agentkeel("run", "where is order 1001", "--user", "nobody", cwd=workdir)
    assert proc.returncode == 3
    assert "unknown principal 'nobody'" in proc.stdout
    bad = workdir / "bad.toml"
    bad.write_text('[principals.x]\npermissions = "read"\n')
    proc = agentkeel("run", "where is order 1001", "--user", "x", "--config", str(bad), cwd=workdir)
    assert proc.returncode == 2
    assert "principals.x.permissions" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_budget_exhausted_exit_code(workdir: Path, isolated_home: Path) -> None:
    # No template matches, so the LLM planner must reserve before calling: a zero
    # budget stops it before any request leaves the process.
    proc = agentkeel(
        "run", "write me a poem about refunds", "--user", "demo", "--budget", "0",
        cwd=workdir, env={"OPENAI_API_KEY": "unused", "OPENAI_BASE_URL": "http://127.0.0.1:9/v1"},
    )
    assert proc.returncode == 4, proc.stdout + proc.stderr
    assert "budget" in proc.stdout


def test_tools_and_plugins_listings(workdir: Path) -> None:
    proc = agentkeel("tools", "--json", cwd=workdir)
    assert proc.returncode == 0, proc.stderr
    tools = {t["name"]: t for t in json.loads(proc.stdout)}
    refund = tools["issue_refund"]
    assert refund["plugin"] == "support"
    assert refund["idempotent"] is False and refund["rollback"] == "cancel_refund"
    assert {"permissions", "isolation", "timeout"} <= refund.keys()
    proc = agentkeel("plugins", "--json", cwd=workdir)
    assert proc.returncode == 0, proc.stderr
    plugins = {p["name"]: p for p in json.loads(proc.stdout)}
    assert plugins["support"]["distribution"] == "agentkeel-support"
    assert plugins["support"]["version"] == "0.1.0"
    assert "agentkeel_register_tools" in plugins["support"]["hooks"]
    # The default plugins are named by module since the reorganisation; the short names still work.
    rules = plugins.get("agentkeel.planner.rules") or plugins["planner_rules"]
    assert rules["default"] is True


def test_plugin_allow_and_block_lists(workdir: Path) -> None:
    proc = agentkeel("tools", "--json", cwd=workdir, env={"AGENTKEEL_DISABLE_PLUGINS": "support"})
    assert "issue_refund" not in {t["name"] for t in json.loads(proc.stdout)}
    proc = agentkeel("plugins", "--json", cwd=workdir, env={"AGENTKEEL_LOAD_PLUGINS": "support"})
    names = {p["name"] for p in json.loads(proc.stdout)}
    assert "support" in names and "pycode" not in names


def test_late_failure_shows_the_compensation(workdir: Path) -> None:
    proc = agentkeel("run", "refund order 1005 and email the customer", "--user", "demo", cwd=workdir)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    lines = {line.split()[1]: line for line in proc.stdout.splitlines() if line.startswith("   ")}
    assert "compensated" in lines["issue_refund"]
    assert "bounced" in lines["send_email"]
    assert "rolled back step(s) 2" in proc.stdout
    assert refunds(os.environ["AGENTKEEL_SHOP_DB"]) == [("1005", 19.5, "cancelled")]
    runs = agentkeel("runs", "--json", cwd=workdir)
    assert json.loads(runs.stdout)[0]["status"] == "failed"
    run_id = json.loads(runs.stdout)[0]["run_id"]
    shown = json.loads(agentkeel("show", run_id, "--json", cwd=workdir).stdout)
    assert [s["status"] for s in shown["steps"]] == ["succeeded", "compensated", "failed"]
