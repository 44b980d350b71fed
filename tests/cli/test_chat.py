"""``agentkeel chat``: one run per line on one session, lines piped in."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

from tests.cli.helpers import agentkeel, errors, refunds

SESSION_LINE = re.compile(r"^session (\S+) \(new; continue it with: agentkeel chat --user demo --session (\S+)\)$")


def journaled(workdir: Path) -> list[dict[str, Any]]:
    """Runs in the journal, oldest first."""
    proc = agentkeel("runs", "--json", cwd=workdir)
    assert proc.returncode == 0, proc.stderr
    out: list[dict[str, Any]] = json.loads(proc.stdout)
    return out[::-1]


def turns(stdout: str) -> list[list[str]]:
    """stdout cut into the turns printed after the session line (a blank line ends each)."""
    blocks = stdout.split("\n\n")
    return [block.splitlines() for block in blocks[:-1]] if blocks[-1] == "" else [b.splitlines() for b in blocks]


def test_two_turns_on_a_new_session(workdir: Path) -> None:
    proc = agentkeel("chat", "--user", "demo", cwd=workdir, input="where is order 1003\nis widget-1 in stock\n")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    first_line, _, rest = proc.stdout.partition("\n")
    match = SESSION_LINE.match(first_line)
    assert match, first_line
    session = match.group(1)
    assert match.group(2) == session
    runs = journaled(workdir)
    assert [(r["message"], r["session_id"], r["user_id"], r["status"]) for r in runs] == [
        ("where is order 1003", session, "demo", "succeeded"),
        ("is widget-1 in stock", session, "demo", "succeeded"),
    ]
    printed = turns(rest)
    assert len(printed) == 2
    for block, run in zip(printed, runs, strict=True):  # each turn: its answer, then its run and steps
        shown = json.loads(agentkeel("show", run["run_id"], "--json", cwd=workdir).stdout)
        answer = shown["answer"].strip().splitlines()
        assert answer and block[:len(answer)] == answer
        assert block[len(answer)] == f"run {run['run_id']}: succeeded (planner {shown['plan']['planner']})"
        assert block[-1].startswith("total $")
    second = json.loads(agentkeel("show", runs[1]["run_id"], "--json", cwd=workdir).stdout)
    assert second["request"]["session_id"] == session  # the second turn's run is on the session
    assert second["steps"][0]["tool_name"] == "check_inventory"
    shown = agentkeel("show", runs[1]["run_id"], cwd=workdir)
    assert f"request by demo in session {session} at " in shown.stdout
    # Progress went to stderr, as for run; no error.
    assert "step 1 lookup_order: started" in proc.stderr and "step 1 check_inventory: started" in proc.stderr
    assert [line for line in errors(proc) if line.startswith("error")] == []


def test_a_chat_continues_a_session_and_ends_at_exit(workdir: Path) -> None:
    proc = agentkeel("chat", "--user", "demo", "--session", "s-42", cwd=workdir,
                     input="\n   \nwhere is order 1002\n/exit\nwhere is order 1003\n")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.splitlines()[0] == "session s-42"  # given, so not new
    runs = journaled(workdir)
    assert [(r["message"], r["session_id"]) for r in runs] == [("where is order 1002", "s-42")]  # blanks skipped


def test_end_of_input_ends_the_chat_and_an_empty_input_runs_nothing(workdir: Path) -> None:
    proc = agentkeel("chat", "--user", "demo", cwd=workdir, input="where is order 1003")  # no newline at the end
    assert proc.returncode == 0, proc.stderr
    assert [r["message"] for r in journaled(workdir)] == ["where is order 1003"]
    empty = agentkeel("chat", "--user", "demo", cwd=workdir, input="")
    assert empty.returncode == 0, empty.stderr
    assert SESSION_LINE.match(empty.stdout.splitlines()[0])
    assert len(journaled(workdir)) == 1


def test_a_failed_run_or_a_bad_line_does_not_end_the_chat(workdir: Path) -> None:
    lines = [b"refund order 1005 and email the customer", b"refund order 1001 \xff\xfe", b"where is order 1003"]
    proc = agentkeel("chat", "--user", "demo", cwd=workdir, input=b"\n".join(lines) + b"\n")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    runs = journaled(workdir)
    assert [(r["message"], r["status"]) for r in runs] == [
        ("refund order 1005 and email the customer", "failed"),  # the failure is printed, the chat goes on
        ("where is order 1003", "succeeded"),
    ]
    assert refunds(os.environ["AGENTKEEL_SHOP_DB"]) == [("1005", 19.5, "cancelled")]
    problems = [line for line in errors(proc) if line.startswith("error")]
    assert problems == ["error: line 2 is not valid UTF-8 text; skipped"]
    assert "rolled back step(s) 2" in proc.stdout


def test_json_chat_prints_one_response_per_line(workdir: Path) -> None:
    proc = agentkeel("chat", "--user", "demo", "--json", cwd=workdir,
                     input="where is order 1003\nis widget-1 in stock\n")
    assert proc.returncode == 0, proc.stderr
    responses = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [r["status"] for r in responses] == ["succeeded", "succeeded"]
    assert all(r["answer"] for r in responses)
    assert re.search(r"^session \S+ \(new; ", proc.stderr, re.M)  # stdout stays JSON only
    assert "started" not in proc.stderr  # no progress with --json


def test_chat_checks_its_options(workdir: Path) -> None:
    proc = agentkeel("chat", "--user", "demo", "--budget", "nan", cwd=workdir, input="where is order 1003\n")
    assert proc.returncode == 2
    assert errors(proc)[0].startswith("error: Invalid value for '--budget'")
    proc = agentkeel("chat", cwd=workdir, input="where is order 1003\n")
    assert proc.returncode == 2 and "--user" in errors(proc)[0]
    assert proc.stdout == ""


def test_the_second_turn_is_planned_with_the_first_turns_answer(workdir: Path, openai_server: Any) -> None:
    """With an LLM planner: the planner's prompt for turn 2 holds turn 1's answer and its facts."""
    (workdir / "agentkeel.toml").write_text(
        '[principals.demo]\npermissions = ["read", "refunds"]\n'
        '[[models.tiers]]\nname = "fast"\nmodel = "gpt-4o-mini"\nmax_tokens = 256\n'
    )
    lookup = {"reasoning": "look it up", "steps": [
        {"description": "look up", "tool_name": "lookup_order", "tool_args": {"order_id": "1003"}}]}
    refund = {"reasoning": "refund it", "steps": [
        {"description": "refund", "tool_name": "issue_refund", "tool_args": {"order_id": "1003", "amount": 120.0}}]}
    openai_server.queue(lookup, usage=(200, 30))
    openai_server.queue("Your order 1003 was delivered; it cost $120.00.", usage=(200, 15))
    openai_server.queue(refund, usage=(200, 30))
    openai_server.queue("I refunded $120.00 for order 1003.", usage=(200, 12))
    env = {"OPENAI_BASE_URL": openai_server.base_url, "OPENAI_API_KEY": "test"}
    proc = agentkeel("chat", "--user", "demo", "--session", "c1", cwd=workdir, env=env,
                     input="what happened to my last order, 1003?\nplease refund that one\n")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    blocks = turns(proc.stdout.partition("\n")[2])
    assert blocks[0][0] == "Your order 1003 was delivered; it cost $120.00."
    assert blocks[1][0] == "I refunded $120.00 for order 1003."
    turn2_planner = json.dumps(openai_server.requests[2]["messages"])
    assert "Your order 1003 was delivered; it cost $120.00." in turn2_planner
    assert "lookup_order(order_id=1003): order_id 1003" in turn2_planner
    assert refunds(os.environ["AGENTKEEL_SHOP_DB"]) == [("1003", 120.0, "issued")]
