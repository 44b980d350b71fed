"""``rollback`` reports what really happened, and ``show`` the run's own duration."""

from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path
from typing import Any

from agentkeel.cli import EXIT_CODES
from agentkeel.types import RunStatus

from tests.cli.helpers import agentkeel, refunds


def run_json(workdir: Path, message: str) -> dict[str, Any]:
    proc = agentkeel("run", message, "--user", "demo", "--json", cwd=workdir)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out: dict[str, Any] = json.loads(proc.stdout)
    return out


def test_rollback_compensates_and_exits_0(workdir: Path) -> None:
    run_id = run_json(workdir, "refund order 1001 if it has shipped")["run_id"]
    proc = agentkeel("rollback", run_id, cwd=workdir)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    answer = json.loads(agentkeel("show", run_id, "--json", cwd=workdir).stdout)["answer"]
    assert answer and proc.stdout.startswith(answer + "\n")  # the answer first, then the run line
    assert proc.stdout[len(answer) + 1:].startswith(f"run {run_id}: rolled_back")
    assert "compensated" in proc.stdout
    assert [(order, status) for order, _, status in refunds(os.environ["AGENTKEEL_SHOP_DB"])] == [
        ("1001", "cancelled")
    ]


def test_rollback_with_nothing_to_compensate_does_not_claim_a_rollback(workdir: Path) -> None:
    # Needs the runtime to return the run's real status when nothing was rolled back.
    run_id = run_json(workdir, "where is order 1003")["run_id"]  # lookup_order has no rollback tool
    proc = agentkeel("rollback", run_id, "--json", cwd=workdir)
    out = json.loads(proc.stdout)
    assert out["status"] != "rolled_back", out
    assert proc.returncode == EXIT_CODES[RunStatus(out["status"])]
    human = agentkeel("rollback", run_id, cwd=workdir)
    assert human.returncode == proc.returncode
    assert not re.search(r"rolled[ _]back", human.stdout), human.stdout
    assert out["message"] and out["message"] in human.stdout  # what the rollback did is always said


def test_show_prints_the_duration_the_response_gives(workdir: Path) -> None:
    run_id = run_json(workdir, "refund order 1001 if it has shipped")["run_id"]
    before = json.loads(agentkeel("show", run_id, "--json", cwd=workdir).stdout)["duration_s"]
    time.sleep(1.0)
    assert agentkeel("rollback", run_id, cwd=workdir).returncode == 0
    shown = agentkeel("show", run_id, cwd=workdir)
    assert shown.returncode == 0, shown.stderr
    after = json.loads(agentkeel("show", run_id, "--json", cwd=workdir).stdout)["duration_s"]
    total = re.search(r"^total \$\S+ \(.*\) in (\d+\.\d{3})s$", shown.stdout, re.M)
    assert total, shown.stdout
    assert abs(float(total.group(1)) - after) <= 0.0015  # printed as the response gives it
    assert abs(after - before) < 0.5  # a later rollback does not stretch the run's duration
