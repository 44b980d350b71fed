"""``agentkeel --log-format json``: the logs on stderr as JSON lines (run events with their
run and step ids, notes, errors), from the option, its environment variable or ``[logging]``;
never the request's text, the arguments or the results."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
from agentkeel import logs
from agentkeel.cli import cli
from click.testing import CliRunner

from tests.cli.helpers import agentkeel

MESSAGE = "refund order 1001 if it has shipped"
EVENTS = ["run_started", "plan_ready", "step_started", "step_finished", "step_started", "step_finished", "answer",
          "run_finished"]
IDS = {"ts", "run_id", "trace_id", "span_id"}
PROGRESS = re.compile(r"step \d+ \w+: .+")
CONFIG = """
[principals.demo]
permissions = ["read", "refunds", "email", "code"]
"""


def json_lines(stderr: str, *, progress: bool = False) -> list[dict[str, Any]]:
    """Every line of ``stderr`` as the JSON object it must be (``progress``: the plain progress
    lines of a run not shown with --json are allowed too, and left out)."""
    found = []
    for line in stderr.splitlines():
        if progress and PROGRESS.fullmatch(line):
            continue
        try:
            record = json.loads(line)
        except ValueError:
            pytest.fail(f"a stderr line is not JSON: {line!r}\nstderr:\n{stderr}")
        assert isinstance(record, dict), line
        found.append(record)
    return found


def events(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [r for r in records if r["logger"] == "agentkeel.events"]


def leaked(records: list[dict[str, Any]]) -> list[tuple[str, Any]]:
    """Fields (other than ids and timestamps) holding the order id, the request's text or the
    refund's result: none may."""
    bad = []
    for record in records:
        for key, value in record.items():
            if key in IDS:
                continue
            text = json.dumps(value)
            if value == 1001 or "1001" in text or "refund order" in text or "R-" in text or "49.99" in text:
                bad.append((key, value))
    return bad


def check_run_events(records: list[dict[str, Any]], run_id: str) -> None:
    found = events(records)
    assert [e["event"] for e in found] == EVENTS, records
    assert all(e["run_id"] == run_id and e["level"] == "INFO" for e in found)
    finished = [(e["step_id"], e["tool"], e["status"]) for e in found if e["event"] == "step_finished"]
    assert finished == [(1, "lookup_order", "succeeded"), (2, "issue_refund", "succeeded")]
    (last,) = [e for e in found if e["event"] == "run_finished"]
    assert last["status"] == "succeeded" and last["steps"] == 2 and isinstance(last["duration_s"], float)
    assert leaked(records) == []


def run_json(workdir: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return agentkeel(*args, "run", MESSAGE, "--user", "demo", "--json", cwd=workdir, env=env)


def test_json_logs_are_json_lines_with_the_run_events(workdir: Path) -> None:
    proc = run_json(workdir, "--log-format", "json")
    assert proc.returncode == 0, proc.stderr
    response = json.loads(proc.stdout)  # stdout is what --json always printed
    assert response["status"] == "succeeded"
    records = json_lines(proc.stderr)
    note, *_ = records
    assert note["level"] == "WARNING" and note["logger"] == "agentkeel.cli"
    assert note["message"].startswith("no agentkeel.toml found")
    check_run_events(records, response["run_id"])


def test_the_human_output_stays_and_the_logs_carry_the_printed_run_id(workdir: Path) -> None:
    proc = agentkeel("--log-format", "JSON", "run", MESSAGE, "--user", "demo", cwd=workdir)
    assert proc.returncode == 0, proc.stderr
    answer, run_line, *steps, total = proc.stdout.splitlines()
    assert answer.startswith("Order 1001 was shipped")
    match = re.fullmatch(r"run (\w+): succeeded .*", run_line)
    assert match is not None and len(steps) == 2 and total.startswith("total $")
    # stderr is not a terminal: the progress lines give way to the event records, and every line is JSON
    check_run_events(json_lines(proc.stderr), match.group(1))


def test_the_environment_variable_chooses_json(workdir: Path) -> None:
    proc = run_json(workdir, env={"AGENTKEEL_LOG_FORMAT": "json"})
    assert proc.returncode == 0, proc.stderr
    check_run_events(json_lines(proc.stderr), json.loads(proc.stdout)["run_id"])


def test_the_config_chooses_json(workdir: Path) -> None:
    config = workdir / "agentkeel.toml"
    config.write_text(CONFIG + '\n[logging]\nformat = "json"\n')
    proc = agentkeel("run", MESSAGE, "--user", "demo", "--json", "--config", str(config), cwd=workdir)
    assert proc.returncode == 0, proc.stderr
    records = json_lines(proc.stderr)
    assert not any(r["logger"] == "agentkeel.cli" for r in records)  # a config of its own: no demo note
    check_run_events(records, json.loads(proc.stdout)["run_id"])


def test_the_option_wins_over_the_config(workdir: Path) -> None:
    config = workdir / "agentkeel.toml"
    config.write_text(CONFIG + '\n[logging]\nformat = "json"\nlevel = "info"\n')
    proc = agentkeel("--log-format", "text", "--log-level", "warning", "run", MESSAGE, "--user", "demo", "--json",
                     "--config", str(config), cwd=workdir)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""  # text, warnings only: nothing to say
    assert json.loads(proc.stdout)["status"] == "succeeded"


def test_the_level_leaves_out_the_info_records(workdir: Path) -> None:
    proc = run_json(workdir, "--log-format", "json", "--log-level", "warning")
    assert proc.returncode == 0, proc.stderr
    records = json_lines(proc.stderr)
    assert [r["level"] for r in records] == ["WARNING"]  # the demo note, no run events


def test_the_environment_level_wins_over_the_config(workdir: Path) -> None:
    config = workdir / "agentkeel.toml"
    config.write_text(CONFIG + '\n[logging]\nformat = "json"\nlevel = "error"\n')
    proc = agentkeel("run", MESSAGE, "--user", "demo", "--json", "--config", str(config), cwd=workdir,
                     env={"AGENTKEEL_LOG_LEVEL": "info"})  # the environment wins over the config
    assert [e["event"] for e in events(json_lines(proc.stderr))] == EVENTS


def test_an_error_is_a_json_record_too(workdir: Path) -> None:
    bad = workdir / "bad.toml"
    bad.write_text("[principals.x]\npermissions = 5\n")
    proc = agentkeel("--log-format", "json", "run", "where is order 1001", "--user", "x", "--config", str(bad),
                     cwd=workdir)
    assert proc.returncode == 2
    (record,) = json_lines(proc.stderr)
    assert record["level"] == "ERROR" and record["logger"] == "agentkeel.cli"
    assert "permissions" in record["message"] and not record["message"].startswith("error:")


@pytest.mark.parametrize(("args", "env"), [
    pytest.param(("--log-format", "bogus"), {}, id="option"),
    pytest.param((), {"AGENTKEEL_LOG_FORMAT": "bogus"}, id="environment"),
    pytest.param(("--log-level", "loud"), {}, id="level"),
])
def test_an_unknown_format_or_level_is_a_usage_error(workdir: Path, args: tuple[str, ...],
                                                     env: dict[str, str]) -> None:
    proc = agentkeel(*args, "run", MESSAGE, "--user", "demo", cwd=workdir, env=env)
    assert proc.returncode == 2
    assert proc.stdout == ""
    (line,) = proc.stderr.splitlines()
    assert line.startswith("error: Invalid value for '--log-") and line.endswith("agentkeel --help')")


def test_the_config_refuses_an_unknown_format(workdir: Path) -> None:
    config = workdir / "agentkeel.toml"
    config.write_text(CONFIG + '\n[logging]\nformat = "xml"\n')
    proc = agentkeel("run", MESSAGE, "--user", "demo", "--config", str(config), cwd=workdir)
    assert proc.returncode == 2
    assert "logging" in proc.stderr and "xml" in proc.stderr


def test_in_one_process_each_command_line_logs_as_it_says(workdir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(workdir)
    runner = CliRunner()
    try:
        first = runner.invoke(cli, ["--log-format", "json", "run", MESSAGE, "--user", "demo", "--json"])
        assert first.exit_code == 0, (first.output, first.exc_info)
        check_run_events(json_lines(first.stderr), json.loads(first.stdout)["run_id"])
        second = runner.invoke(cli, ["run", "where is order 1003", "--user", "demo", "--json"])
        assert second.exit_code == 0, (second.output, second.exc_info)
        assert second.stderr.startswith("note: no agentkeel.toml found")  # plain again, no run events
        assert "{" not in second.stderr
    finally:
        logs.unconfigure()
