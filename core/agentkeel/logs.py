"""Structured logs: the run and step a log record belongs to, so logs join traces.

A leaf. The runtime binds ``run_id`` for the whole of a run (serve, resume,
rollback, cancel) and ``step_id`` for each step, in context variables: a record
logged anywhere below (a tool, a plugin, the journal) carries them, and each
task of a run sees its own. Plugins add fields of their own (the OpenTelemetry
plugin adds ``trace_id`` and ``span_id``) with ``add_fields``.

``JsonFormatter`` writes a record as one JSON object a line, with those fields;
``EventLog`` is a plugin logging each run event (names, ids, statuses and numbers,
never arguments, results or answers); ``configure`` installs the handler
(``agentkeel --log-format json``, ``[logging] format``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import re
import sys
import threading
from collections.abc import Callable, Mapping
from contextvars import ContextVar
from datetime import UTC, datetime
from typing import Any, TextIO

from agentkeel.markers import hookimpl
from agentkeel.types import AgentResponse, Event, StepResult

RUN_ID: ContextVar[str | None] = ContextVar("agentkeel_run_id", default=None)
"""The run being served by the current task (None outside runs)."""
STEP_ID: ContextVar[int | None] = ContextVar("agentkeel_step_id", default=None)
"""The step being run by the current task (None outside steps)."""

FieldProvider = Callable[[], Mapping[str, Any]]
_providers: list[FieldProvider] = []


def add_fields(provider: FieldProvider) -> None:
    """Add ``provider()``'s fields to every structured log record (called when the record
    is formatted, in the task that logged it). Adding the same provider twice is a no-op."""
    if provider not in _providers:
        _providers.append(provider)


def remove_fields(provider: FieldProvider) -> None:
    """Stop adding ``provider``'s fields (no error when it was not added)."""
    if provider in _providers:
        _providers.remove(provider)


def current_fields() -> dict[str, Any]:
    """The fields of the current task: ``run_id`` and ``step_id`` when set, then every
    provider's (a provider that raises is skipped: logging must never fail a run)."""
    fields: dict[str, Any] = {}
    run_id = RUN_ID.get()
    if run_id is not None:
        fields["run_id"] = run_id
    step_id = STEP_ID.get()
    if step_id is not None:
        fields["step_id"] = step_id
    for provider in tuple(_providers):
        try:
            fields.update(provider())
        except Exception:  # noqa: BLE001 - a broken provider loses its fields, never the record
            continue
    return fields


# --- formatting --------------------------------------------------------------------

TEXT_FORMAT = "%(levelname)s:     %(message)s"
"""The text format: uvicorn's (``INFO:     message``), so the service's lines all look alike."""
FORMATS = ("text", "json")
LEVELS = ("debug", "info", "warning", "error", "critical")

_CORE_KEYS = frozenset({"ts", "level", "logger", "message", "exc", "stack"})
_RECORD_ATTRS = frozenset(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {"message", "asctime", "taskName"}
_NOISE = frozenset({"color_message"})  # uvicorn's ANSI-coloured copy of the message
_MAX_PREFIXES = 8


def _timestamp(created: float) -> str:
    """``created`` in RFC 3339, UTC, with milliseconds: ``2024-05-01T12:00:00.123Z``."""
    return datetime.fromtimestamp(created, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _safe_repr(value: object) -> str:
    try:
        return repr(value)
    except Exception:  # noqa: BLE001 - a broken __repr__ must not lose the record
        return f"<unrepresentable {type(value).__name__}>"


def _jsonable(value: Any) -> Any:
    """``value`` when it serialises as strict JSON, else its repr (never raises)."""
    try:
        json.dumps(value, allow_nan=False)
    except Exception:  # noqa: BLE001 - TypeError, ValueError (NaN, a cycle), RecursionError, a broken __str__...
        return _safe_repr(value)
    return value


def _message(record: logging.LogRecord) -> str:
    try:
        return record.getMessage().rstrip("\n")
    except Exception:  # noqa: BLE001 - bad %-arguments: keep the record, say what it held
        return f"{_safe_repr(record.msg)} (unformattable arguments: {_safe_repr(record.args)})"


def _put(out: dict[str, Any], key: object, value: Any, prefix: str) -> None:
    """Add ``key``: a key already there (or reserved) gets ``prefix``, unless it holds the same value."""
    name = key if isinstance(key, str) else _safe_repr(key)
    value = _jsonable(value)
    for _ in range(_MAX_PREFIXES):
        if name not in out and name not in _CORE_KEYS:
            out[name] = value
            return
        if name in out and out[name] == value:
            return  # the same field twice (the run id of an event, also bound for the run): one is enough
        name = prefix + name


class JsonFormatter(logging.Formatter):
    """One JSON object per record, on one line.

    ``ts`` (RFC 3339 UTC, milliseconds), ``level``, ``logger``, ``message``; then the
    fields of the task that logged it (``current_fields``: ``run_id``, ``step_id``,
    ``trace_id``...); then the ``extra=`` fields of the call (a value that is not JSON
    is written as its repr); ``exc`` (the traceback) and ``stack`` when present. A
    field whose name is taken gets a prefix (``ctx_`` for a provider's, ``extra_`` for
    the caller's) instead of replacing it. Formatting never raises for a bad value.
    """

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {"ts": _timestamp(record.created), "level": record.levelname,
                               "logger": record.name, "message": _message(record)}
        try:
            fields = current_fields()
        except Exception:  # noqa: BLE001 - logging must never fail
            fields = {}
        for key, value in fields.items():
            _put(out, key, value, "ctx_")
        for key, value in tuple(vars(record).items()):
            if key in _RECORD_ATTRS or key in _NOISE or key.startswith("_"):
                continue
            _put(out, key, value, "extra_")
        if record.exc_info:
            if not record.exc_text:
                record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            out["exc"] = record.exc_text
        if record.stack_info:
            out["stack"] = self.formatStack(record.stack_info)
        try:
            return json.dumps(out, ensure_ascii=True, allow_nan=False)
        except Exception:  # noqa: BLE001 - cannot happen with _jsonable values; never fail anyway
            return json.dumps({k: _safe_repr(v) for k, v in out.items()}, ensure_ascii=True)


# --- run events as log records -----------------------------------------------------

EVENTS_LOGGER = "agentkeel.events"
SKIPPED_EVENTS = frozenset({"answer_delta", "phase_started", "phase_finished"})
"""Not logged: streamed answer text, and the phases of a run (the tracing plugin's spans)."""
_TOKEN = re.compile(r"[A-Za-z][A-Za-z0-9_.:-]{0,63}")


def _int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _number(value: Any) -> float | None:
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        return round(float(value), 6)
    return None


def _name(value: Any) -> str | None:
    """A name (a tool, a status, an action): an identifier-like token, never free text."""
    text = getattr(value, "value", value)  # an enum
    return text if isinstance(text, str) and _TOKEN.fullmatch(text) else None


def _describe(event: Event) -> tuple[str, dict[str, Any]]:
    """The message and the fields of ``event``: names, ids, statuses and numbers only (no
    arguments, results, answers, prompts or error text: they may hold personal data)."""
    kind, data = event.kind, event.data
    fields: dict[str, Any] = {"step_id": _int(data.get("step_id")), "tool": _name(data.get("tool"))}
    message = kind.replace("_", " ")
    if kind == "step_finished" and isinstance(step := data.get("step"), StepResult):
        fields |= {"step_id": step.step_id, "tool": _name(step.tool_name), "status": _name(step.status),
                   "attempts": _int(step.attempts), "duration_s": _number(step.duration_s),
                   "cost_usd": _number(step.cost_usd)}
        message = f"step {step.step_id} {fields['tool'] or '?'} {fields['status'] or '?'} in {step.duration_s:.3f}s"
    elif kind == "run_finished" and isinstance(response := data.get("response"), AgentResponse):
        fields |= {"status": _name(response.status), "cost_usd": _number(response.total_cost_usd),
                   "duration_s": _number(response.duration_s), "steps": len(response.steps)}
        message = (f"run finished: {fields['status'] or '?'} in {response.duration_s:.3f}s, "
                   f"${response.total_cost_usd:.6f}")
    elif kind == "plan_ready":
        plan = data.get("plan")
        steps = getattr(plan, "steps", ())
        fields |= {"revision": _int(data.get("revision")), "reason": _name(data.get("reason")),
                   "planner": _name(getattr(plan, "planner", None)), "steps": len(steps),
                   "tools": [name for s in steps if (name := _name(getattr(s, "tool_name", None)))]}
        message = f"plan revision {fields['revision'] or '?'} ready: {len(steps)} steps"
    elif kind == "step_started":
        fields["alongside"] = [i for i in data.get("alongside") or () if isinstance(i, int)]
        message = f"step {fields['step_id']} {fields['tool'] or '?'} started"
    elif kind == "step_attempt_failed":
        fields |= {"action": _name(data.get("action")), "call_kind": _name(data.get("call_kind"))}
        message = f"step {fields['step_id']} attempt failed ({fields['action'] or '?'})"
    elif kind == "step_compensated":
        fields["status"] = _name(data.get("status"))
        message = f"step {fields['step_id']} compensated by {fields['tool'] or '?'}: {fields['status'] or '?'}"
    elif kind == "replan":
        fields["revision"] = _int(data.get("revision"))
        message = f"replanning (plan revision {fields['revision'] or '?'})"
    elif kind == "approval_requested":
        fields["expires_at"] = _number(data.get("expires_at"))
        message = f"step {fields['step_id']} {fields['tool'] or '?'} waits for approval"
    elif kind == "answer":
        fields["source"] = _name(data.get("source"))
    return message, {k: v for k, v in fields.items() if v is not None}


class EventLog:
    """A plugin logging each run event as an INFO record on ``agentkeel.events``.

    The fields are the event kind (``event``), ``run_id``, and what names the
    step and its outcome (``step_id``, ``tool``, ``status``, ``attempts``,
    ``duration_s``, ``cost_usd``; for ``run_finished`` the run's ``status``,
    ``cost_usd``, ``duration_s``): never arguments, results, answers or prompts.
    Streamed answer text and the phases of a run are not logged (``SKIPPED_EVENTS``).
    """

    def __init__(self, logger: logging.Logger | None = None) -> None:
        self.log = logger or logging.getLogger(EVENTS_LOGGER)

    @hookimpl
    def agentkeel_event(self, event: Event) -> None:
        if event.kind in SKIPPED_EVENTS or not self.log.isEnabledFor(logging.INFO):
            return
        try:
            message, fields = _describe(event)
        except Exception:  # noqa: BLE001 - an odd event is logged by its kind alone, never fails the run
            message, fields = event.kind, {}
        with contextlib.suppress(Exception):
            self.log.info("%s", message, extra={"event": event.kind, "run_id": event.run_id, **fields})


# --- configuration -----------------------------------------------------------------

ROOT_LOGGER = "agentkeel"
UVICORN_LOGGERS = ("uvicorn", "uvicorn.error", "uvicorn.access")


class _Handler(logging.StreamHandler[TextIO]):
    """A stream handler writing to ``stream``, or to whatever ``sys.stderr`` is when it
    writes (so a replaced stderr, as under click's test runner, is followed)."""

    def __init__(self, stream: TextIO | None) -> None:
        super().__init__(stream if stream is not None else sys.stderr)
        self.follow_stderr = stream is None

    def emit(self, record: logging.LogRecord) -> None:
        if self.follow_stderr:
            self.stream = sys.stderr
        super().emit(record)


@dataclasses.dataclass
class _Installed:
    format: str
    level: str
    handlers: list[tuple[logging.Logger, logging.Handler]]
    propagate: dict[str, bool]
    captured_warnings: bool
    levels: dict[str, int] = dataclasses.field(default_factory=dict)


_installed: _Installed | None = None
_lock = threading.Lock()


def configured_format() -> str | None:
    """The format ``configure`` installed last ("text" or "json"), None before it is called."""
    installed = _installed
    return installed.format if installed is not None else None


def configure(format: str, level: str, stream: TextIO | None = None) -> None:
    """Log ``agentkeel``'s records at ``level`` and above to ``stream`` (stderr by default)
    in ``format``: "text" (``INFO:     message``) or "json" (one ``JsonFormatter`` object
    a line). With "json", uvicorn's loggers and Python's warnings go there as JSON too.

    Idempotent: a second call replaces the handlers the first installed (and puts back
    what it changed on uvicorn's loggers), so records are never written twice.
    ``ValueError`` for an unknown format or level."""
    global _installed
    if format not in FORMATS:
        raise ValueError(f"log format must be one of {', '.join(FORMATS)}, got {format!r}")
    if not isinstance(level, str) or level.lower() not in LEVELS:
        raise ValueError(f"log level must be one of {', '.join(LEVELS)}, got {level!r}")
    number = logging.getLevelName(level.upper())
    with _lock:
        _uninstall()
        handler = _Handler(stream)
        handler.setFormatter(JsonFormatter() if format == "json" else logging.Formatter(TEXT_FORMAT))
        root = logging.getLogger(ROOT_LOGGER)
        installed = _Installed(format, level.lower(), [(root, handler)], {}, False, {ROOT_LOGGER: root.level})
        root.addHandler(handler)
        root.setLevel(number)
        if format == "json":
            uvicorn = logging.getLogger("uvicorn")
            installed.levels["uvicorn"] = uvicorn.level
            uvicorn.addHandler(handler)
            uvicorn.setLevel(number)
            installed.handlers.append((uvicorn, handler))
            for name in UVICORN_LOGGERS:
                logger = logging.getLogger(name)
                installed.propagate[name] = logger.propagate
                # "uvicorn" writes through the handler; the others reach it by propagating
                logger.propagate = name != "uvicorn"
                for other in logger.handlers:
                    if other is not handler:
                        other.setFormatter(handler.formatter)  # configured by someone else: JSON all the same
            warnings_logger = logging.getLogger("py.warnings")
            warnings_logger.addHandler(handler)
            installed.propagate["py.warnings"] = warnings_logger.propagate
            warnings_logger.propagate = False
            installed.handlers.append((warnings_logger, handler))
            logging.captureWarnings(True)
            installed.captured_warnings = True
        _installed = installed


def unconfigure() -> None:
    """Remove what ``configure`` installed (tests; no error when it did not run)."""
    with _lock:
        _uninstall()


def _uninstall() -> None:
    global _installed
    installed, _installed = _installed, None
    if installed is None:
        return
    for logger, handler in installed.handlers:
        logger.removeHandler(handler)
    for name, propagate in installed.propagate.items():
        logging.getLogger(name).propagate = propagate
    for name, level in installed.levels.items():
        logging.getLogger(name).setLevel(level)
    if installed.captured_warnings:
        logging.captureWarnings(False)
    for _, handler in installed.handlers[:1]:
        handler.close()
