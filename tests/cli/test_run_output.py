"""What ``run`` prints: the answer first, then the run and its steps, then the cost;
live progress on stderr (plain lines on a pipe, in place on a terminal, nothing
with --json); streamed answers; the degraded exit code; and ``show`` listing
every plan revision, so a replan is visible."""

from __future__ import annotations

import json
import re
from pathlib import Path

from agentkeel.cli import EXIT_CODES
from agentkeel.types import RunStatus

from tests.cli.helpers import agentkeel, agentkeel_on_terminal, errors, fake_plugin, progress_lines

STEP_LINE = re.compile(r"^ {2,3}\d+ \S+ +\S+ +\d+\.\d{4}s  \$\d+\.\d{6}")

PARCELS = """\
    import asyncio
    import os

    from agentkeel import hookimpl, tool
    from agentkeel.errors import ToolError
    from agentkeel.planner.plan import PlanTemplate

    @tool(permissions=["read"], idempotent=True)
    async def parcel_lookup(parcel: str) -> dict:
        \"\"\"Look a parcel up (slowly when PARCEL_SLOW_S is set).\"\"\"
        await asyncio.sleep(float(os.environ.get("PARCEL_SLOW_S", "0")))
        return {"parcel": parcel, "where": "depot"}

    @tool(permissions=["read"], idempotent=True)
    async def live_tracking(parcel: str) -> dict:
        \"\"\"The carrier's live tracking (down).\"\"\"
        raise ToolError("the carrier's service is down", retryable=False)

    @tool(permissions=["read"], idempotent=True)
    async def ship_by_truck(parcel: str) -> dict:
        \"\"\"The truck is broken.\"\"\"
        raise ToolError("no truck available", retryable=False)

    @tool(permissions=["read"], idempotent=True)
    async def ship_by_post(parcel: str) -> dict:
        \"\"\"Ship by post.\"\"\"
        return {"parcel": parcel, "by": "post"}

    def step(tool_name, **extra):
        return {"description": f"{tool_name} {{parcel}}", "tool_name": tool_name,
                "tool_args": {"parcel": "{parcel}"}, **extra}

    @hookimpl
    def agentkeel_register_tools(register):
        for fn in (parcel_lookup, live_tracking, ship_by_truck, ship_by_post):
            register(fn)

    @hookimpl
    def agentkeel_register_plan_templates(register):
        register(PlanTemplate(pattern=r"track parcel (?P<parcel>\\d+)", name="parcels:track",
                              steps=(step("parcel_lookup"), step("live_tracking", optional=True))))
        register(PlanTemplate(pattern=r"ship parcel (?P<parcel>\\d+)", name="parcels:ship",
                              steps=(step("ship_by_truck"),), replan=(step("ship_by_post"),)))
        register(PlanTemplate(pattern=r"find parcel (?P<parcel>\\d+)", name="parcels:find",
                              steps=(step("parcel_lookup"),)))
    """

STREAMING_RESPONDER = """\
    from agentkeel import hookimpl
    from agentkeel.types import Answer

    PARTS = ("Order 1003 ", "was delivered ", "to Carol.")

    @hookimpl(tryfirst=True)
    def agentkeel_respond(request, status, detail, plan, steps, context, run):
        if run is None:
            return None
        for part in PARTS:
            run.emit("answer_delta", text=part)
        return Answer("".join(PARTS), "stream-test")
    """


def parcels(tmp_path: Path) -> Path:
    return fake_plugin(tmp_path / "site", "parcels", PARCELS)


# --- the answer first ---------------------------------------------------------------------


def test_the_answer_is_printed_first_and_is_the_json_answer(workdir: Path) -> None:
    message = "where is order 1003"
    data = json.loads(agentkeel("run", message, "--user", "demo", "--json", cwd=workdir).stdout)
    assert data["answer"] and data["answer_source"]
    proc = agentkeel("run", message, "--user", "demo", cwd=workdir)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = proc.stdout.splitlines()
    answer_lines = data["answer"].strip().splitlines()
    assert lines[:len(answer_lines)] == answer_lines  # the answer text first ...
    assert lines[0] == answer_lines[0]
    rest = lines[len(answer_lines):]
    assert rest[0].startswith("run ") and rest[0].endswith(": succeeded (planner rules:support:order_status)")
    assert STEP_LINE.match(rest[1]) and "lookup_order" in rest[1]  # ... then the step table
    assert rest[2].startswith("total $")  # ... then the cost line
    assert len(rest) == 3


def test_json_is_the_response_only(workdir: Path) -> None:
    proc = agentkeel("run", "refund order 1001 if it has shipped", "--user", "demo", "--json", cwd=workdir)
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)  # nothing but the JSON on stdout
    assert {"answer", "answer_source", "revisions", "steps", "status"} <= data.keys()
    assert [r["reason"] for r in data["revisions"]] == ["initial"]
    assert errors(proc) == []  # and no progress on stderr


# --- progress on stderr ------------------------------------------------------------------


def test_progress_lines_on_a_pipe_in_order(workdir: Path) -> None:
    proc = agentkeel("run", "refund order 1001 if it has shipped", "--user", "demo", cwd=workdir)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = progress_lines(proc)
    assert len(lines) == 4, lines
    assert lines[0] == "step 1 lookup_order: started"
    assert re.fullmatch(r"step 1 lookup_order: succeeded in \d+\.\d\ds", lines[1]), lines[1]
    assert lines[2] == "step 2 issue_refund: started"
    assert re.fullmatch(r"step 2 issue_refund: succeeded in \d+\.\d\ds", lines[3]), lines[3]
    assert "\r" not in proc.stderr and "\x1b" not in proc.stderr  # no terminal codes on a pipe
    assert "started" not in proc.stdout  # progress is never on stdout


def test_progress_says_why_a_step_was_skipped(workdir: Path) -> None:
    proc = agentkeel("run", "refund order 1002 if it has shipped", "--user", "demo", cwd=workdir)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert progress_lines(proc)[2:] == ["step 2 issue_refund: started",
                                        "step 2 issue_refund: skipped (condition not met)"]


def test_progress_on_a_terminal_is_one_line_per_step_updated_in_place(workdir: Path, tmp_path: Path) -> None:
    proc = agentkeel_on_terminal("run", "find parcel 7", "--user", "demo", cwd=workdir, path=parcels(tmp_path),
                                 env={"PARCEL_SLOW_S": "0.6"})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    err = proc.stderr
    # Redrawn in place (carriage return, clear line) with the time so far, while the step runs ...
    ticks = re.findall(r"\r\x1b\[2K  \S step 1 parcel_lookup  (\d+\.\d)s", err)
    assert len(set(ticks)) >= 3, err
    assert [float(t) for t in ticks] == sorted(float(t) for t in ticks)
    # ... then ended, once, with its outcome and duration.
    done = re.findall(r"\r\x1b\[2K  ✓ step 1 parcel_lookup  succeeded (\d+\.\d\d)s\n", err)
    assert len(done) == 1 and float(done[0]) >= 0.5, err
    assert "started" not in err  # not the plain lines
    assert not re.search(r"\x1b\[2K  \S step 1 parcel_lookup  \d+\.\ds$", err)  # the status line is cleared
    assert proc.stdout.splitlines()[1].startswith("run ")  # stdout is a pipe: the answer, then the run


def test_a_streamed_answer_is_printed_as_it_comes_and_only_once(workdir: Path, tmp_path: Path) -> None:
    site = fake_plugin(tmp_path / "site", "streamer", STREAMING_RESPONDER)
    proc = agentkeel_on_terminal("run", "where is order 1003", "--user", "demo", cwd=workdir, path=site,
                                 tty_stdout=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.count("Order 1003 was delivered to Carol.") == 1, proc.stdout
    lines = proc.stdout.splitlines()
    assert lines[0] == "Order 1003 was delivered to Carol."
    assert lines[1].startswith("run ")
    # Without a terminal on stdout, the whole answer is printed once, at the end.
    piped = agentkeel("run", "where is order 1003", "--user", "demo", cwd=workdir, path=site)
    assert piped.stdout.splitlines()[0] == "Order 1003 was delivered to Carol."
    assert piped.stdout.count("was delivered") == 1


# --- degraded, replans and show ---------------------------------------------------------


def test_exit_codes_keep_every_code_and_add_degraded() -> None:
    assert EXIT_CODES == {
        RunStatus.SUCCEEDED: 0, RunStatus.FAILED: 1, RunStatus.DENIED: 3, RunStatus.BUDGET_EXHAUSTED: 4,
        RunStatus.REJECTED: 5, RunStatus.IN_DOUBT: 6, RunStatus.WAITING: 7, RunStatus.RUNNING: 8,
        RunStatus.ROLLING_BACK: 8, RunStatus.ROLLED_BACK: 9, RunStatus.DEGRADED: 10, RunStatus.CANCELLED: 11,
    }
    assert set(EXIT_CODES) == set(RunStatus)


def test_run_help_lists_the_degraded_exit_code(workdir: Path) -> None:
    proc = agentkeel("run", "--help", cwd=workdir)
    assert proc.returncode == 0, proc.stderr
    assert "10 degraded" in " ".join(proc.stdout.split())


def test_a_degraded_run_exits_10(workdir: Path, tmp_path: Path) -> None:
    proc = agentkeel("run", "track parcel 7", "--user", "demo", cwd=workdir, path=parcels(tmp_path))
    assert proc.returncode == 10, proc.stdout + proc.stderr
    assert re.search(r"^run \w+: degraded", proc.stdout, re.M), proc.stdout
    assert "optional step 2 (live_tracking) was unavailable" in proc.stdout
    data = json.loads(agentkeel("run", "track parcel 7", "--user", "demo", "--json", cwd=workdir,
                                path=parcels(tmp_path / "again")).stdout)
    assert data["status"] == "degraded"


def test_a_replan_is_announced_and_show_lists_every_revision(workdir: Path, tmp_path: Path) -> None:
    site = parcels(tmp_path)
    proc = agentkeel("run", "ship parcel 7", "--user", "demo", cwd=workdir, path=site)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    progress = progress_lines(proc)
    replan = [i for i, line in enumerate(progress) if line.startswith("replanning (plan revision 2): ")]
    revised = [i for i, line in enumerate(progress) if line.startswith("plan revision 2 (replan")]
    assert replan and revised and replan[0] < revised[0], progress
    assert progress[revised[0]].endswith(": steps 2")
    assert progress[-1].startswith("step 2 ship_by_post: succeeded in ")
    run_id = re.search(r"^run (\w+): succeeded", proc.stdout, re.M).group(1)  # type: ignore[union-attr]
    # run itself groups the steps by revision once there is more than one
    assert re.search(r"^  plan revision 2 \(replan, planner [^)]*\)$", proc.stdout, re.M), proc.stdout

    shown = agentkeel("show", run_id, cwd=workdir, path=site)
    assert shown.returncode == 0, shown.stderr
    lines = shown.stdout.splitlines()
    answer = json.loads(agentkeel("show", run_id, "--json", cwd=workdir, path=site).stdout)["answer"]
    assert lines[0] == answer.strip().splitlines()[0]  # the answer first here too
    assert any(line.startswith("request by demo in session default at ") and line.endswith(": ship parcel 7")
               for line in lines)
    first = next(i for i, line in enumerate(lines) if line.startswith("  plan revision 1 (initial, planner "))
    second = next(i for i, line in enumerate(lines) if line.startswith("  plan revision 2 (replan, planner "))
    assert "rules:parcels:ship" in lines[first]
    assert lines[first + 1].split()[:3] == ["1", "ship_by_truck", "failed"]
    assert lines[second + 1].split()[:3] == ["2", "ship_by_post", "succeeded"]
    assert second == first + 2

    data = json.loads(agentkeel("show", run_id, "--json", cwd=workdir, path=site).stdout)
    assert [(r["revision"], r["reason"]) for r in data["revisions"]] == [(1, "initial"), (2, "replan")]
    assert data["request"] == {"user_id": "demo", "session_id": "default", "message": "ship parcel 7"}


def test_show_of_a_single_revision_names_its_planner(workdir: Path) -> None:
    run_id = json.loads(agentkeel("run", "where is order 1003", "--user", "demo", "--json", cwd=workdir).stdout)[
        "run_id"]
    shown = agentkeel("show", run_id, cwd=workdir)
    assert "  plan revision 1 (initial, planner rules:support:order_status)\n   1 lookup_order" in shown.stdout


def test_resume_and_rollback_print_the_answer_first(workdir: Path) -> None:
    run_id = json.loads(agentkeel("run", "refund order 1001 if it has shipped", "--user", "demo", "--json",
                                  cwd=workdir).stdout)["run_id"]
    resumed = agentkeel("resume", run_id, cwd=workdir)  # a finished run: as it stands
    assert resumed.returncode == 0, resumed.stderr
    answer = json.loads(agentkeel("show", run_id, "--json", cwd=workdir).stdout)["answer"]
    assert resumed.stdout.startswith(answer.strip() + "\n")
    rolled = agentkeel("rollback", run_id, cwd=workdir)
    assert rolled.returncode == 0, rolled.stderr
    after = json.loads(agentkeel("show", run_id, "--json", cwd=workdir).stdout)["answer"]
    assert rolled.stdout.startswith(after.strip() + f"\nrun {run_id}: rolled_back")
