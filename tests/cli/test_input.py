"""Bad input gets one line on stderr and exit code 2, never a traceback; the
message can come from stdin; configuration errors exit 2 too."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from tests.cli.helpers import Arg, agentkeel, errors

NOT_UTF8 = b"\xff\xfe"


def assert_usage_error(proc: subprocess.CompletedProcess[str], *mentions: str) -> None:
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr
    lines = errors(proc)
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    for mention in mentions:
        assert mention in lines[0], lines[0]


Q = "where is order 1003"
BAD_INPUT = [
    pytest.param(("run", Q, "--user", ""), ("--user", "empty"), id="empty-user"),
    pytest.param(("run", Q, "--user", "   "), ("--user", "empty"), id="blank-user"),
    pytest.param(("run", "", "--user", "demo"), ("MESSAGE", "empty"), id="empty-message"),
    pytest.param(("run", " \t ", "--user", "demo"), ("MESSAGE", "empty"), id="blank-message"),
    pytest.param(("run", b"refund order 1001 " + NOT_UTF8, "--user", "demo"), ("MESSAGE", "UTF-8"),
                 id="non-utf8-message"),
    pytest.param(("run", Q, "--user", b"demo" + NOT_UTF8), ("--user", "UTF-8"), id="non-utf8-user"),
    pytest.param(("run", Q, "--user", "demo", "--session", NOT_UTF8), ("--session", "UTF-8"),
                 id="non-utf8-session"),
    pytest.param(("show", NOT_UTF8), ("RUN_ID", "UTF-8"), id="non-utf8-show"),
    pytest.param(("resume", NOT_UTF8), ("RUN_ID", "UTF-8"), id="non-utf8-resume"),
    pytest.param(("rollback", NOT_UTF8), ("RUN_ID", "UTF-8"), id="non-utf8-rollback"),
    pytest.param(("show", ""), ("RUN_ID", "empty"), id="empty-run-id"),
    *(
        pytest.param(("run", Q, "--user", "demo", "--budget", value), ("--budget", "finite"), id=f"budget-{value}")
        for value in ("nan", "NaN", "inf", "-inf", "1e999")
    ),
    pytest.param(("run", Q, "--user", "demo", "--budget", "-0.01"), ("--budget", "negative"), id="budget-negative"),
    pytest.param(("run", Q, "--user", "demo", "--budget", "lots"), ("--budget", "float"), id="budget-lots"),
    pytest.param(("run", Q), ("--user",), id="missing-user"),
    pytest.param(("frobnicate",), ("frobnicate",), id="unknown-command"),
]


@pytest.mark.parametrize(("args", "mentions"), BAD_INPUT)
def test_bad_input_is_one_line_and_exit_2(workdir: Path, args: tuple[Arg, ...], mentions: tuple[str, ...]) -> None:
    proc = agentkeel(*args, cwd=workdir)
    assert_usage_error(proc, *mentions)
    assert proc.stdout == ""  # refused before anything ran


def test_budget_zero_and_plain_numbers_are_accepted(workdir: Path) -> None:
    proc = agentkeel("run", "where is order 1003", "--user", "demo", "--budget", "0.25", "--json", cwd=workdir)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["status"] == "succeeded"


def test_message_from_stdin(workdir: Path) -> None:
    proc = agentkeel("run", "-", "--user", "demo", "--json", cwd=workdir, input="where is order 1003\n")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert [s["tool_name"] for s in out["steps"]] == ["lookup_order"]
    assert out["steps"][0]["tool_args"] == {"order_id": "1003"}
    runs = json.loads(agentkeel("runs", "--json", cwd=workdir).stdout)
    assert runs[0]["message"] == "where is order 1003"  # the newline is not part of the message


@pytest.mark.parametrize("data", [b"", b"  \n\n", NOT_UTF8 + b"\n"], ids=["empty", "blank", "not-utf8"])
def test_bad_stdin_message_is_a_usage_error(workdir: Path, data: bytes) -> None:
    proc = agentkeel("run", "-", "--user", "demo", cwd=workdir, input=data)
    assert_usage_error(proc, "MESSAGE", "stdin")


def test_no_template_and_no_llm_is_a_configuration_error(workdir: Path) -> None:
    # Needs AgentResponse.config_error from the runtime (the CLI reads it with getattr).
    proc = agentkeel("run", "write me a poem about refunds", "--user", "demo", cwd=workdir)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "no plan template matched" in proc.stdout
    assert "Traceback" not in proc.stderr
    proc = agentkeel("run", "write me a poem about refunds", "--user", "demo", "--json", cwd=workdir)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert json.loads(proc.stdout)["status"] == "failed"


def test_configuration_error_is_one_line_unless_tracebacks_are_asked_for(workdir: Path) -> None:
    bad = workdir / "bad.toml"
    bad.write_text('[principals.x]\npermissions = "read"\n')
    args = ("run", "where is order 1001", "--user", "x", "--config", str(bad))
    assert_usage_error(agentkeel(*args, cwd=workdir), "principals.x.permissions")
    raised = agentkeel(*args, cwd=workdir, env={"AGENTKEEL_RAISE_ERRORS": "1"})
    assert raised.returncode != 0
    assert "Traceback" in raised.stderr and "principals.x.permissions" in raised.stderr


@pytest.mark.parametrize("content", [b"\x00\xff not toml", "[principals.demo]\npermissions = [\n"],
                         ids=["not-utf8", "not-toml"])
def test_unreadable_configuration_is_one_line_and_exit_2(workdir: Path, content: str | bytes) -> None:
    bad = workdir / "agentkeel.toml"
    bad.write_bytes(content if isinstance(content, bytes) else content.encode())
    assert_usage_error(agentkeel("tools", cwd=workdir), "agentkeel.toml")
    assert_usage_error(agentkeel("run", "where is order 1003", "--user", "demo", "--config", str(bad), cwd=workdir),
                       str(bad))
