"""Structured logs (``agentkeel.logs``): the JSON formatter, the fields of the run and step a
record belongs to, the event log plugin, and ``configure``."""

from __future__ import annotations

import io
import json
import logging
import re
import warnings
from collections.abc import Iterator
from typing import Any

import pytest
from agentkeel import AgentRequest, RunStatus, hookimpl, logs, tool
from agentkeel.testing import ScriptedPlanner, make_system
from agentkeel.types import AgentResponse, Event, Plan, PlanStep, StepResult, StepStatus

TS = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z")
SECRET_ARG = "ARG-7731-secret"
SECRET_MESSAGE = "please look at my private parcel"


@pytest.fixture(autouse=True)
def _unconfigured(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    # No field provider left behind by another test (a tracing plugin's) in these records.
    monkeypatch.setattr(logs, "_providers", [])
    logs.unconfigure()
    yield
    logs.unconfigure()


@pytest.fixture
def stream() -> io.StringIO:
    out = io.StringIO()
    logs.configure("json", "debug", out)
    return out


def records(stream: io.StringIO) -> list[dict[str, Any]]:
    """Every line of ``stream`` as the JSON object it must be."""
    lines = stream.getvalue().splitlines()
    parsed = [json.loads(line) for line in lines]
    assert all(isinstance(p, dict) for p in parsed), lines
    return parsed


# --- the formatter ------------------------------------------------------------------------


def test_a_record_is_one_json_object_on_one_line(stream: io.StringIO) -> None:
    logging.getLogger("agentkeel.test").warning("two\nlines %s", "here", extra={"count": 3, "names": ["a", "b"]})
    (record,) = records(stream)
    assert TS.fullmatch(record["ts"])
    assert record == {"ts": record["ts"], "level": "WARNING", "logger": "agentkeel.test",
                      "message": "two\nlines here", "count": 3, "names": ["a", "b"]}


def test_the_timestamp_is_utc_rfc3339_with_milliseconds() -> None:
    record = logging.LogRecord("agentkeel.t", logging.INFO, __file__, 1, "m", (), None)
    record.created = 1_700_000_000.1234
    line = json.loads(logs.JsonFormatter().format(record))
    assert line["ts"] == "2023-11-14T22:13:20.123Z"


def test_the_traceback_is_in_exc(stream: io.StringIO) -> None:
    try:
        raise ZeroDivisionError("boom")
    except ZeroDivisionError:
        logging.getLogger("agentkeel.test").exception("it failed")
    (record,) = records(stream)
    assert record["message"] == "it failed" and record["level"] == "ERROR"
    assert record["exc"].startswith("Traceback (most recent call last):")
    assert "ZeroDivisionError: boom" in record["exc"]


def test_a_value_that_is_not_json_is_its_repr_and_never_breaks_the_record(stream: io.StringIO) -> None:
    class Odd:
        def __repr__(self) -> str:
            return "<odd>"

    class Broken:
        def __repr__(self) -> str:
            raise RuntimeError("no repr")

    cycle: list[Any] = []
    cycle.append(cycle)
    logging.getLogger("agentkeel.test").info("values", extra={
        "odd": Odd(), "broken": Broken(), "nan": float("nan"), "cycle": cycle, "tuple_keys": {(1, 2): "x"},
        "fine": {"a": [1, 2.5, None, True]}})
    (first,) = records(stream)
    assert first["odd"] == "<odd>"
    assert first["broken"] == "<unrepresentable Broken>"
    assert first["nan"] == "nan"
    assert first["cycle"] == "[[...]]"
    assert first["tuple_keys"] == "{(1, 2): 'x'}"
    assert first["fine"] == {"a": [1, 2.5, None, True]}


def test_a_message_whose_arguments_do_not_format_is_kept() -> None:
    # Formatted directly: pytest's own capture handler would raise on this record.
    record = logging.LogRecord("agentkeel.t", logging.INFO, __file__, 1, "bad %d arguments", ("not a number",), None)
    line = json.loads(logs.JsonFormatter().format(record))
    assert line["message"].startswith("'bad %d arguments'") and "not a number" in line["message"]


def test_a_field_never_replaces_a_reserved_one(stream: io.StringIO) -> None:
    token = logs.RUN_ID.set("run-a")
    try:
        logging.getLogger("agentkeel.test").info("hello", extra={"ts": "mine", "level": 1, "exc": "no", "logger": "x",
                                                                 "run_id": "run-b"})
        logging.getLogger("agentkeel.test").info("same run", extra={"run_id": "run-a"})
    finally:
        logs.RUN_ID.reset(token)
    first, second = records(stream)
    assert TS.fullmatch(first["ts"]) and first["level"] == "INFO" and first["logger"] == "agentkeel.test"
    assert "exc" not in first
    assert first["extra_ts"] == "mine" and first["extra_level"] == 1 and first["extra_exc"] == "no"
    assert first["extra_logger"] == "x"
    assert first["run_id"] == "run-a" and first["extra_run_id"] == "run-b"
    assert second["run_id"] == "run-a" and "extra_run_id" not in second  # the same value once


def test_run_and_step_ids_of_the_task_are_fields(stream: io.StringIO) -> None:
    log = logging.getLogger("agentkeel.test")
    log.info("outside")
    run, step = logs.RUN_ID.set("r-1"), logs.STEP_ID.set(4)
    try:
        log.info("inside")
    finally:
        logs.STEP_ID.reset(step)
        logs.RUN_ID.reset(run)
    outside, inside = records(stream)
    assert "run_id" not in outside and "step_id" not in outside
    assert inside["run_id"] == "r-1" and inside["step_id"] == 4


def test_a_provider_adds_fields_and_a_raising_one_is_skipped(stream: io.StringIO) -> None:
    def trace() -> dict[str, Any]:
        return {"trace_id": "0af7651916cd43dd8448eb211c80319c", "span_id": "b7ad6b7169203331"}

    def broken() -> dict[str, Any]:
        raise RuntimeError("no tracer")

    def clashing() -> dict[str, Any]:
        return {"message": "not the message", "weird": object()}

    for provider in (broken, trace, clashing):
        logs.add_fields(provider)
    try:
        logging.getLogger("agentkeel.test").info("traced")
    finally:
        for provider in (broken, trace, clashing):
            logs.remove_fields(provider)
    logging.getLogger("agentkeel.test").info("untraced")
    traced, untraced = records(stream)
    assert traced["trace_id"] == "0af7651916cd43dd8448eb211c80319c" and traced["span_id"] == "b7ad6b7169203331"
    assert traced["message"] == "traced" and traced["ctx_message"] == "not the message"
    assert traced["weird"].startswith("<object object")
    assert "trace_id" not in untraced


# --- configure ----------------------------------------------------------------------------


def test_configure_twice_installs_one_handler() -> None:
    out = io.StringIO()
    before = list(logging.getLogger("agentkeel").handlers)
    logs.configure("json", "info", out)
    logs.configure("json", "info", out)
    logging.getLogger("agentkeel.test").info("once")
    assert len(records(out)) == 1
    assert len(logging.getLogger("agentkeel").handlers) == len(before) + 1


def test_configure_text_replaces_json_and_keeps_the_uvicorn_like_format() -> None:
    first, second = io.StringIO(), io.StringIO()
    logs.configure("json", "info", first)
    logs.configure("text", "warning", second)
    logging.getLogger("agentkeel.test").info("not shown")
    logging.getLogger("agentkeel.test").warning("shown %d", 1)
    logging.getLogger("uvicorn.error").warning("uvicorn is not ours in text mode")
    assert first.getvalue() == ""
    assert second.getvalue() == "WARNING:     shown 1\n"


def test_configure_json_takes_uvicorn_and_warnings_and_gives_them_back() -> None:
    uvicorn, access = logging.getLogger("uvicorn"), logging.getLogger("uvicorn.access")
    propagate = (uvicorn.propagate, access.propagate)
    out = io.StringIO()
    logs.configure("json", "info", out)
    logging.getLogger("uvicorn.error").info("Started server process [%d]", 42, extra={"color_message": "\x1b[1m"})
    access.info("GET /healthz 200")
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.warn("careful", UserWarning, stacklevel=1)
    started, request, warned = records(out)
    assert started["logger"] == "uvicorn.error" and started["message"] == "Started server process [42]"
    assert "color_message" not in started
    assert request["logger"] == "uvicorn.access"
    assert warned["logger"] == "py.warnings" and warned["level"] == "WARNING" and "careful" in warned["message"]
    logs.unconfigure()
    assert (uvicorn.propagate, access.propagate) == propagate
    assert out not in [getattr(h, "stream", None) for h in uvicorn.handlers]


def test_configure_refuses_an_unknown_format_or_level() -> None:
    with pytest.raises(ValueError, match="log format"):
        logs.configure("xml", "info")
    with pytest.raises(ValueError, match="log level"):
        logs.configure("json", "loud")
    assert logs.configured_format() is None


def test_without_a_stream_the_handler_writes_to_the_stderr_of_the_moment(capsys: pytest.CaptureFixture[str]) -> None:
    logs.configure("json", "info")
    logging.getLogger("agentkeel.test").info("to stderr")
    (line,) = capsys.readouterr().err.splitlines()
    assert json.loads(line)["message"] == "to stderr"


# --- the event log ------------------------------------------------------------------------


def step_result(**kw: Any) -> StepResult:
    return StepResult(**{"step_id": 2, "tool_name": "issue_refund", "status": StepStatus.FAILED,
                         "tool_args": {"order_id": SECRET_ARG}, "result": {"secret": SECRET_ARG},
                         "error": f"refund of {SECRET_ARG} failed", "duration_s": 0.25, "cost_usd": 0.001,
                         "attempts": 3} | kw)


def test_the_event_log_logs_names_ids_statuses_and_numbers_only(stream: io.StringIO) -> None:
    plan = Plan(steps=(PlanStep(1, "lookup_order", {"order_id": SECRET_ARG}),), reasoning=SECRET_MESSAGE)
    response = AgentResponse(run_id="r-9", status=RunStatus.FAILED, message=SECRET_MESSAGE, plan=plan,
                             steps=(step_result(),), total_cost_usd=0.0125, duration_s=1.5, answer=SECRET_MESSAGE)
    request = AgentRequest(message=SECRET_MESSAGE, user_id="alice")
    plugin = logs.EventLog()
    for kind, data in [
        ("run_started", {"request": request}),
        ("plan_ready", {"revision": 1, "reason": "initial", "plan": plan}),
        ("step_started", {"step_id": 1, "tool": "lookup_order", "description": SECRET_MESSAGE, "alongside": []}),
        ("step_attempt_failed", {"step_id": 2, "error": SECRET_ARG, "action": "retry", "call_kind": "tool"}),
        ("step_finished", {"step": step_result()}),
        ("replan", {"failure": SECRET_ARG, "revision": 2}),
        ("approval_requested", {"step_id": 2, "tool": "issue_refund", "args": {"order_id": SECRET_ARG},
                                "expires_at": 1700000000.5}),
        ("step_compensated", {"step_id": 2, "tool": "undo_refund", "status": "succeeded", "error": SECRET_ARG}),
        ("answer_delta", {"text": SECRET_MESSAGE}),
        ("phase_started", {"phase": "plan", "span": 1}),
        ("phase_finished", {"phase": "plan", "span": 1}),
        ("answer", {"text": SECRET_MESSAGE, "source": "template"}),
        ("something_new", {"step_id": 5, "text": SECRET_MESSAGE, "count": 1001}),
        ("run_finished", {"response": response}),
    ]:
        plugin.agentkeel_event(Event(kind=kind, run_id="r-9", data=data))
    out = stream.getvalue()
    assert SECRET_ARG not in out and SECRET_MESSAGE not in out and "alice" not in out and "1001" not in out
    lines = records(stream)
    assert all(line["logger"] == "agentkeel.events" and line["level"] == "INFO" and line["run_id"] == "r-9"
               for line in lines)
    by_kind = {line["event"]: line for line in lines}
    assert list(by_kind) == ["run_started", "plan_ready", "step_started", "step_attempt_failed", "step_finished",
                             "replan", "approval_requested", "step_compensated", "answer", "something_new",
                             "run_finished"]
    strip = {"ts", "level", "logger", "message", "run_id", "event"}

    def fields(kind: str) -> dict[str, Any]:
        return {k: v for k, v in by_kind[kind].items() if k not in strip}

    assert fields("run_started") == {}
    assert fields("plan_ready") == {"revision": 1, "reason": "initial", "steps": 1, "tools": ["lookup_order"]}
    assert fields("step_started") == {"step_id": 1, "tool": "lookup_order", "alongside": []}
    assert fields("step_attempt_failed") == {"step_id": 2, "action": "retry", "call_kind": "tool"}
    assert fields("step_finished") == {"step_id": 2, "tool": "issue_refund", "status": "failed", "attempts": 3,
                                       "duration_s": 0.25, "cost_usd": 0.001}
    assert by_kind["step_finished"]["message"] == "step 2 issue_refund failed in 0.250s"
    assert fields("replan") == {"revision": 2}
    assert fields("approval_requested") == {"step_id": 2, "tool": "issue_refund", "expires_at": 1700000000.5}
    assert fields("step_compensated") == {"step_id": 2, "tool": "undo_refund", "status": "succeeded"}
    assert fields("answer") == {"source": "template"}
    assert fields("something_new") == {"step_id": 5}
    assert fields("run_finished") == {"status": "failed", "cost_usd": 0.0125, "duration_s": 1.5, "steps": 1}


def test_the_event_log_survives_odd_events(stream: io.StringIO) -> None:
    plugin = logs.EventLog()
    plugin.agentkeel_event(Event(kind="step_finished", run_id="r", data={"step": "not a step"}))
    plugin.agentkeel_event(Event(kind="plan_ready", run_id="r", data={"plan": 7, "revision": "x", "reason": "a b"}))
    plugin.agentkeel_event(Event(kind="step_started", run_id="r", data={"tool": "free text with spaces"}))
    first, second, third = records(stream)
    assert first["event"] == "step_finished" and "step_id" not in first
    assert second["steps"] == 0 and "revision" not in second and "reason" not in second
    assert "tool" not in third


# --- a real run ---------------------------------------------------------------------------


@tool(permissions=["shop"], idempotent=True)
def chatty_lookup(order: str) -> dict[str, Any]:
    """Look an order up, logging as it goes."""
    logging.getLogger("agentkeel.test.tool").info("looking the order up")
    return {"order": order, "status": "shipped"}


class Tools:
    @hookimpl
    def agentkeel_register_tools(self, register: Any) -> None:
        register(chatty_lookup)


def run_logged(stream: io.StringIO) -> tuple[AgentResponse, list[dict[str, Any]]]:
    planner = ScriptedPlanner({"reasoning": "test", "steps": [
        {"description": "look it up", "tool_name": "chatty_lookup", "tool_args": {"order": SECRET_ARG}}]})
    with make_system(Tools(), planner, logs.EventLog(), principals={"clerk": ["shop"]}) as system:
        response = system.run_sync(AgentRequest(message=SECRET_MESSAGE, user_id="clerk"))
    assert response.status is RunStatus.SUCCEEDED, response.message
    return response, records(stream)


def test_a_record_logged_by_a_tool_carries_the_run_and_step_ids(stream: io.StringIO) -> None:
    response, lines = run_logged(stream)
    (inside,) = [line for line in lines if line["logger"] == "agentkeel.test.tool"]
    assert inside["message"] == "looking the order up"
    assert inside["run_id"] == response.run_id
    assert inside["step_id"] == 1
    events = [line for line in lines if line["logger"] == "agentkeel.events"]
    assert [e["event"] for e in events] == ["run_started", "plan_ready", "step_started", "step_finished", "answer",
                                            "run_finished"]
    assert all(e["run_id"] == response.run_id for e in events)
    finished = next(e for e in events if e["event"] == "step_finished")
    assert (finished["step_id"], finished["tool"], finished["status"]) == (1, "chatty_lookup", "succeeded")
    assert SECRET_ARG not in stream.getvalue() and SECRET_MESSAGE not in stream.getvalue()
