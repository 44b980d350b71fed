"""``agentkeel costs`` against a ledger whose totals were worked out by hand."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from agentkeel.cost.sqlite_store import SQLiteBudgetStore
from agentkeel.cost.store import LedgerEntry

from tests.cli.helpers import agentkeel, errors

DAY1 = 1764590400.0  # 2025-12-01 12:00 UTC
DAY2 = DAY1 + 86400


def entry(cost: float, **fields: object) -> LedgerEntry:
    base: dict[str, object] = {"run_id": "r1", "user_id": "ann", "session_id": "s1", "principal": "ann",
                               "kind": "llm", "cost_usd": cost, "ts": DAY1}
    base.update(fields)
    return LedgerEntry(**base)  # type: ignore[arg-type]


FIXTURE = [
    entry(0.0010, model="gpt-4o-mini", tier="fast", purpose="plan", reason="first_tier", input_tokens=1000,
          output_tokens=100),
    entry(0.0200, model="gpt-4o", tier="strong", purpose="plan", reason="escalation", input_tokens=2000,
          output_tokens=500, estimated=True),
    entry(0.0005, model="gpt-4o-mini", tier="fast", purpose="respond", reason="answer", input_tokens=400,
          output_tokens=50),
    entry(0.0020, kind="tool", tool="lookup_order", purpose="tool", reason="tool", step_id=1, run_id="r2",
          ts=DAY2),
    entry(0.0020, kind="tool", tool="lookup_order", purpose="tool", reason="tool", step_id=1, run_id="r3",
          user_id="bob", session_id="s9", principal="bob", ts=DAY2),
    entry(0.0100, kind="tool", tool="issue_refund", purpose="tool", reason="tool", step_id=2, run_id="r2", ts=DAY2),
]


@pytest.fixture
def ledger(workdir: Path) -> Path:
    home = Path(os.environ["AGENTKEEL_HOME"])
    store = SQLiteBudgetStore(home)
    try:
        for row in FIXTURE:
            store.record(row)
    finally:
        store.close()
    return workdir


def costs(workdir: Path, *args: str) -> object:
    proc = agentkeel("costs", *args, "--json", cwd=workdir)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def keyed(result: object) -> dict[str, float]:
    assert isinstance(result, dict)
    return {row["key"]: round(row["cost_usd"], 6) for row in result["rows"]}


def test_costs_by_tier_and_by_tool_match_the_hand_computed_totals(ledger: Path) -> None:
    by_tier = costs(ledger, "--by", "tier")
    assert keyed(by_tier) == {"strong": 0.02, "(none)": 0.014, "fast": 0.0015}
    assert isinstance(by_tier, dict) and by_tier["total_usd"] == pytest.approx(0.0355)
    assert keyed(costs(ledger, "--by", "tool")) == {"(none)": 0.0215, "issue_refund": 0.01, "lookup_order": 0.004}
    assert keyed(costs(ledger, "--by", "reason")) == {"escalation": 0.02, "tool": 0.014, "first_tier": 0.001,
                                                      "answer": 0.0005}
    assert keyed(costs(ledger, "--by", "user")) == {"ann": 0.0335, "bob": 0.002}
    assert keyed(costs(ledger, "--by", "day")) == {"2025-12-02": 0.014, "2025-12-01": 0.0215}
    assert keyed(costs(ledger, "--by", "tier", "--user", "bob")) == {"(none)": 0.002}
    assert keyed(costs(ledger, "--by", "tool", "--since", "2025-12-02")) == {"issue_refund": 0.01,
                                                                            "lookup_order": 0.004}
    assert keyed(costs(ledger, "--by", "tool", "--until", "2025-12-02")) == {"(none)": 0.0215}
    rows = {row["key"]: row for row in costs(ledger, "--by", "tier")["rows"]}  # type: ignore[index]
    assert rows["strong"]["estimated_usd"] == pytest.approx(0.02) and rows["fast"]["calls"] == 2
    assert rows["fast"]["input_tokens"] == 1400 and rows["fast"]["output_tokens"] == 150


def test_costs_top_lists_the_most_expensive_runs(ledger: Path) -> None:
    top = costs(ledger, "--top", "2")
    assert isinstance(top, list)
    assert [(r["run_id"], round(r["cost_usd"], 6)) for r in top] == [("r1", 0.0215), ("r2", 0.012)]
    text = agentkeel("costs", "--by", "tool", cwd=ledger)
    assert text.returncode == 0
    assert text.stdout.splitlines()[1].startswith("(none)") and "0.021500" in text.stdout
    assert text.stdout.splitlines()[-1].split()[:2] == ["total", "0.035500"]


def test_costs_refuses_bad_options(ledger: Path) -> None:
    for args in (("--by", "colour"), ("--since", "yesterday"), ("--until", "nan"), ("--top", "0")):
        proc = agentkeel("costs", *args, cwd=ledger)
        assert proc.returncode == 2, (args, proc.stdout)
        assert errors(proc)[0].startswith("error: "), proc.stderr
