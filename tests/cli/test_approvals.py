"""``agentkeel approvals``, ``approve`` and ``deny`` with a real configuration: a
refund above 100 that alice asks for waits for bob's decision; ``resume`` then
refunds (approved) or aborts (denied), in the real shop database."""

from __future__ import annotations

import getpass
import json
import os
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest

from tests.cli.helpers import Arg, agentkeel, errors, progress_lines, refunds

CONFIG = """\
[principals.alice]
permissions = ["read", "refunds", "approve"]

[principals.alice.approval]
issue_refund = { amount = { exclusiveMinimum = 100 } }

[principals.bob]
permissions = ["read", "approve"]

[principals.dave]
permissions = ["read"]
"""
BIG = "refund order 1003 if it has shipped"  # delivered, 120.00: needs approval
SMALL = "refund order 1001 if it has shipped"  # shipped, 49.99: does not


@pytest.fixture
def shop(workdir: Path) -> Path:
    (workdir / "agentkeel.toml").write_text(CONFIG)
    return workdir


def ak(workdir: Path, *args: Arg, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return agentkeel(*args, cwd=workdir, env={"AGENTKEEL_USER": "", **(env or {})})


def shop_refunds() -> list[tuple[Any, ...]]:
    return refunds(os.environ["AGENTKEEL_SHOP_DB"])


def waiting_run(workdir: Path) -> str:
    proc = ak(workdir, "run", BIG, "--user", "alice")
    assert proc.returncode == 7, proc.stdout + proc.stderr  # waiting for approval
    match = re.search(r"^run (\w+): waiting", proc.stdout, re.M)
    assert match, proc.stdout
    assert not proc.stdout.startswith("run ")  # the answer first: what waits, and how to decide it
    progress = progress_lines(proc)
    assert progress[-2].startswith("step 2 issue_refund: waits for approval, expires "), progress
    assert progress[-1] == "step 2 issue_refund: waiting for approval"
    return match.group(1)


def one_error(proc: subprocess.CompletedProcess[str], *mentions: str) -> str:
    assert proc.returncode == 2, proc.stdout + proc.stderr
    lines = errors(proc)
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    assert "Traceback" not in proc.stderr
    for mention in mentions:
        assert mention in lines[0], lines[0]
    return lines[0]


def test_only_the_matching_calls_wait(shop: Path) -> None:
    proc = ak(shop, "run", SMALL, "--user", "alice")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert shop_refunds() == [("1001", 49.99, "issued")]
    assert ak(shop, "approvals").stdout == "no pending approvals\n"


def test_approve_then_resume_refunds(shop: Path) -> None:
    run_id = waiting_run(shop)
    listed = ak(shop, "approvals")
    assert listed.returncode == 0, listed.stderr
    (line,) = listed.stdout.splitlines()
    assert line.startswith(f"{run_id}  step 2   issue_refund ")
    assert '{"order_id": "1003", "amount": 120.0}' in line
    assert re.search(r"pending .* asked by alice at \d{4}-\d\d-\d\d \d\d:\d\d:\d\d, expires \d{4}-", line), line
    (record,) = json.loads(ak(shop, "approvals", "--json").stdout)
    assert record["run_id"] == run_id and record["step_id"] == 2 and record["tool_name"] == "issue_refund"
    assert record["args"] == {"order_id": "1003", "amount": 120.0}
    assert record["requested_by"] == "alice" and record["status"] == "pending"
    assert record["expires_at"] > record["requested_at"]

    # Refused, each in one line, and nothing is decided:
    one_error(ak(shop, "approve", run_id, "2", "--as", "alice"), "'alice'", "themselves")  # self-approval
    one_error(ak(shop, "approve", run_id, "2", "--as", "carol"), "'carol' is not a principal")
    one_error(ak(shop, "approve", run_id, "2", "--as", "dave"), "'dave'", "'approve' permission")
    one_error(ak(shop, "approve", run_id, "3", "--as", "bob"), "step 3", "no approval request")
    one_error(ak(shop, "approve", "no-such-run", "2", "--as", "bob"), "no-such-run")
    assert json.loads(ak(shop, "approvals", "--json").stdout)[0]["status"] == "pending"
    assert shop_refunds() == []

    # $AGENTKEEL_USER names the approver when --as is not given.
    approved = ak(shop, "approve", run_id, "2", "--reason", "delivered, fine", env={"AGENTKEEL_USER": "bob"})
    assert approved.returncode == 0, approved.stdout + approved.stderr
    assert approved.stdout.splitlines() == [
        f'approved step 2 (issue_refund {{"order_id": "1003", "amount": 120.0}}) of run {run_id} as bob: '
        "delivered, fine",
        f"next: agentkeel resume {run_id}",
    ]
    assert shop_refunds() == []  # approving runs nothing by itself
    one_error(ak(shop, "deny", run_id, "2", "--as", "bob"), "already approved")  # a decision is final

    resumed = ak(shop, "resume", run_id)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert re.search(rf"^run {run_id}: succeeded", resumed.stdout, re.M)
    assert progress_lines(resumed) == ["step 2 issue_refund: started",
                                       progress_lines(resumed)[1]]
    assert progress_lines(resumed)[1].startswith("step 2 issue_refund: succeeded in ")
    assert shop_refunds() == [("1003", 120.0, "issued")]

    assert ak(shop, "approvals").stdout == "no pending approvals\n"
    (everything,) = ak(shop, "approvals", "--all").stdout.splitlines()
    assert " approved " in everything and "approved by bob at " in everything and everything.endswith(
        ": delivered, fine")
    (decided,) = json.loads(ak(shop, "approvals", "--all", "--json").stdout)
    assert (decided["status"], decided["decided_by"], decided["reason"]) == ("approved", "bob", "delivered, fine")


def test_deny_then_resume_fails_the_run_without_a_refund(shop: Path) -> None:
    run_id = waiting_run(shop)
    denied = ak(shop, "deny", run_id, "2", "--as", "bob", "--reason", "too much")
    assert denied.returncode == 0, denied.stdout + denied.stderr
    assert denied.stdout.splitlines()[0].startswith("denied step 2 (issue_refund ")
    assert denied.stdout.splitlines()[0].endswith(f"of run {run_id} as bob: too much")
    assert denied.stdout.splitlines()[1].startswith(f"next: agentkeel resume {run_id}")
    resumed = ak(shop, "resume", run_id, "--json")
    out = json.loads(resumed.stdout)
    assert out["status"] == "denied" and resumed.returncode == 3  # what the runtime gives for a denied step
    assert [(s["tool_name"], s["status"]) for s in out["steps"]] == [("lookup_order", "succeeded"),
                                                                    ("issue_refund", "denied")]
    assert "denied by bob: too much" in out["steps"][1]["error"]
    assert shop_refunds() == []
    assert "denied by bob" in ak(shop, "approvals", "--all").stdout


def test_resume_flag_resumes_at_once(shop: Path) -> None:
    run_id = waiting_run(shop)
    proc = ak(shop, "approve", run_id, "2", "--as", "bob", "--resume")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0].startswith("approved step 2 (issue_refund ") and lines[0].endswith(f"of run {run_id} as bob")
    run_line = next(i for i, line in enumerate(lines) if line.startswith(f"run {run_id}: "))
    assert lines[run_line] == f"run {run_id}: succeeded (planner rules:support:refund_if_shipped)"
    assert run_line >= 2  # the run's answer comes between the decision and the run line
    assert shop_refunds() == [("1003", 120.0, "issued")]

    other = waiting_run(shop)
    proc = ak(shop, "deny", other, "2", "--as", "bob", "--resume", "--json")
    assert proc.returncode == 3, proc.stdout + proc.stderr
    assert json.loads(proc.stdout)["status"] == "denied"  # --json: the response, as `resume --json`
    assert shop_refunds() == [("1003", 120.0, "issued")]  # no second refund


def test_the_approver_defaults_to_the_login_name(shop: Path) -> None:
    run_id = waiting_run(shop)
    me = getpass.getuser()
    if me in ("bob", "alice", "dave"):
        pytest.skip(f"the login name {me!r} is a principal of the test configuration")
    one_error(ak(shop, "approve", run_id, "2"), f"{me!r} is not a principal")


@pytest.mark.parametrize(("step", "mention"), [("0", "integer >= 1"), ("two", "not a valid integer")])
def test_step_must_be_a_positive_integer(shop: Path, step: str, mention: str) -> None:
    line = one_error(ak(shop, "approve", "somerun", step, "--as", "bob"), "'STEP'", mention)
    assert "approve --help" in line


def test_empty_approver_is_a_usage_error(shop: Path) -> None:
    one_error(ak(shop, "deny", "somerun", "2", "--as", ""), "'--as'", "empty")
    one_error(ak(shop, "deny", "somerun", "2", "--as", "bob", "--reason", b"\xff"), "'--reason'", "UTF-8")
