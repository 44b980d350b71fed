"""Live progress of a run on stderr, from its events (``AgentSystem.run_sync(on_event=...)``).

Three ways to show it, chosen by ``Progress.for_terminal``:

- stderr is a terminal: one status line per step, redrawn in place with the time
  it has taken so far (``  ⠋ step 2 issue_refund  1.2s``) and ended with its
  outcome (``  ✓ step 2 issue_refund  succeeded 0.16s``); replans, approvals and
  compensations get a line of their own;
- stderr is not a terminal (a pipe, a file, CI): plain lines, one when a step
  starts and one when it ends (``step 1 lookup_order: started`` /
  ``step 1 lookup_order: succeeded in 0.07s``);
- ``--json``: nothing at all.

When stdout is a terminal, streamed answer text ("answer_delta") is printed as
it comes, and ``answer_shown`` tells the command not to print the answer again.
Only ``\\r`` and the ANSI clear-line sequence are used: no dependency.
"""

from __future__ import annotations

import os
import sys
import threading
from collections.abc import Callable
from time import perf_counter
from typing import Any, NoReturn, TextIO

import click

from agentkeel.cli.common import finish, one_line, printable, when
from agentkeel.logs import configured_format
from agentkeel.types import AgentResponse, Event, StepResult, StepStatus

CLEAR = "\r\x1b[2K"
TICK_S = 0.1

SPINNER = "⠋⠙⠹⠸⠼⠴⠦⠧⠇⠏"
MARKS = {"succeeded": "✓", "failed": "✗", "denied": "✗", "skipped": "↷", "waiting": "◷", "in_doubt": "?",
         "compensated": "↺", "replan": "↻", "approval": "◷"}
ASCII_SPINNER = "|/-\\"
ASCII_MARKS = {"succeeded": "+", "failed": "x", "denied": "x", "skipped": "-", "waiting": "=", "in_doubt": "?",
               "compensated": "<", "replan": "~", "approval": "="}

OFF, PLAIN, TTY = "off", "plain", "tty"

Listener = Callable[[Event], None]
Start = Callable[[Listener | None], AgentResponse]
"""Runs a run with the given ``on_event`` listener: ``lambda on_event: system.run_sync(request, on_event=on_event)``."""


def _isatty(stream: TextIO | None) -> bool:
    try:
        return stream is not None and stream.isatty()
    except (AttributeError, ValueError):  # no isatty, or closed
        return False


def _can_encode(stream: TextIO | None, text: str) -> bool:
    try:
        text.encode(getattr(stream, "encoding", None) or "ascii")
    except (UnicodeEncodeError, LookupError):
        return False
    return True


class Progress:
    """The ``on_event`` listener of one run: pass ``callback`` to ``run_sync`` or
    ``resume_sync``, and call ``close`` once the run is over, before printing
    (one ``Progress`` per run: a closed one does not redraw again)."""

    def __init__(self, mode: str, *, stream_answer: bool = False, fancy: bool = True) -> None:
        self.mode = mode
        self.stream_answer = stream_answer
        self.spinner = SPINNER if fancy else ASCII_SPINNER
        self.marks = MARKS if fancy else ASCII_MARKS
        self.streamed = ""
        self._tools: dict[int, str] = {}
        self._current: tuple[str, float] | None = None  # (what the status line says, since when)
        self._frame = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._ticker: threading.Thread | None = None

    @classmethod
    def for_terminal(cls, as_json: bool) -> Progress:
        """What fits the streams this process has: in place on a terminal, plain
        lines elsewhere, nothing with ``--json``, and nothing on a stderr that is not
        a terminal while the logs there are JSON lines (their event records say it)."""
        if as_json:
            return cls(OFF)
        err = sys.stderr
        tty = _isatty(err) and os.environ.get("TERM") != "dumb"
        if not tty and configured_format() == "json":
            return cls(OFF, stream_answer=_isatty(sys.stdout))
        fancy = _can_encode(err, SPINNER + "".join(MARKS.values()))
        return cls(TTY if tty else PLAIN, stream_answer=_isatty(sys.stdout), fancy=fancy)

    @property
    def callback(self) -> Callable[[Event], None] | None:
        """The listener to pass as ``on_event`` (None when nothing is shown)."""
        return self if self.mode != OFF or self.stream_answer else None

    def answer_shown(self, response: AgentResponse) -> bool:
        """True when the answer was streamed to stdout as it was written."""
        return bool(self.streamed.strip()) and self.streamed.strip() == response.answer.strip()

    # --- events -----------------------------------------------------------------

    def __call__(self, event: Event) -> None:
        handler = getattr(self, f"_on_{event.kind}", None)
        if handler is not None:
            handler(event.data)

    def _on_run_started(self, data: Any) -> None:
        self._status("planning")

    def _on_plan_ready(self, data: Any) -> None:
        revision = data.get("revision", 1)
        if revision == 1:
            self._clear()
            return
        plan = data.get("plan")
        steps = ", ".join(str(s.step_id) for s in getattr(plan, "steps", ())) or "none"
        planner = getattr(plan, "planner", "")
        by = f", planner {planner}" if planner else ""
        self._line(f"plan revision {revision} ({data.get('reason', '')}{by}): steps {steps}",
                   self.marks["replan"])

    def _on_replan(self, data: Any) -> None:
        self._line(f"replanning (plan revision {data.get('revision', '?')}): {one_line(str(data.get('failure', '')))}",
                   self.marks["replan"])
        self._status("planning")

    def _on_step_started(self, data: Any) -> None:
        step_id, tool = data.get("step_id"), str(data.get("tool", ""))
        if isinstance(step_id, int):
            self._tools[step_id] = tool
        alongside = data.get("alongside") or []
        with_others = f" (alongside {', '.join(map(str, alongside))})" if alongside else ""
        if self.mode == PLAIN:
            self._echo(f"step {step_id} {tool}: started{with_others}")
        self._status(f"step {step_id} {tool}{with_others}")

    def _on_step_attempt_failed(self, data: Any) -> None:
        step_id = data.get("step_id")
        tool = self._tools.get(step_id, "") if isinstance(step_id, int) else ""
        action = data.get("action", "")
        self._line(f"step {step_id} {tool}: attempt failed ({action}): {one_line(str(data.get('error', '')))}",
                   self.marks["failed"], keep_status=True)

    def _on_approval_requested(self, data: Any) -> None:
        expires = data.get("expires_at")
        until = f", expires {when(expires)}" if isinstance(expires, (int, float)) else ""
        self._line(f"step {data.get('step_id')} {data.get('tool', '')}: waits for approval{until}",
                   self.marks["approval"], keep_status=True)

    def _on_step_finished(self, data: Any) -> None:
        step = data.get("step")
        if not isinstance(step, StepResult):
            return
        status = step.status.value
        if self.mode == PLAIN:
            if step.status is StepStatus.SKIPPED:
                text = f"{status} ({one_line(step.error)})" if step.error else status
            elif step.status is StepStatus.WAITING:
                text = "waiting for approval"
            else:
                text = f"{status} in {step.duration_s:.2f}s"
                if step.error and step.status is not StepStatus.SUCCEEDED:
                    text += f": {one_line(step.error)}"
            self._echo(f"step {step.step_id} {step.tool_name}: {text}")
            return
        text = f"step {step.step_id} {step.tool_name}  {status} {step.duration_s:.2f}s"
        if step.error and step.status in (StepStatus.FAILED, StepStatus.DENIED, StepStatus.SKIPPED):
            text += f"  {one_line(step.error)}"
        self._line(text, self.marks.get(status, " "))

    def _on_step_compensated(self, data: Any) -> None:
        step_id = data.get("step_id")
        step = " ".join(str(w) for w in (step_id, self._tools.get(step_id) if isinstance(step_id, int) else None) if w)
        what = f"compensated by {data.get('tool', '')} ({data.get('status', '')})"
        if data.get("error") and data.get("status") != "succeeded":
            what += f": {one_line(str(data['error']))}"
        self._line(f"step {step}: {what}", self.marks["compensated"])

    def _on_answer_delta(self, data: Any) -> None:
        if not self.stream_answer:
            return
        text = str(data.get("text", ""))
        if not text:
            return
        self._clear()
        self.streamed += text
        click.echo(printable(text), nl=False)
        sys.stdout.flush()

    def _on_answer(self, data: Any) -> None:
        self._clear()
        if self.streamed and not self.streamed.endswith("\n"):
            click.echo()
            self.streamed += "\n"

    def _on_run_finished(self, data: Any) -> None:
        self.close()

    # --- drawing ----------------------------------------------------------------

    def _echo(self, text: str) -> None:
        click.echo(text, err=True)

    def _line(self, text: str, mark: str, *, keep_status: bool = False) -> None:
        """A line of its own: in place of the status line on a terminal, which then
        carries on below it when ``keep_status``."""
        if self.mode == OFF:
            return
        if self.mode == PLAIN:
            self._echo(text)
            return
        with self._lock:
            current = self._current
            click.echo(f"{CLEAR}  {mark} {text}", err=True)
            self._current = current if keep_status else None
            if self._current is not None:
                self._draw()

    def _status(self, text: str) -> None:
        if self.mode != TTY:
            return
        with self._lock:
            self._current = (text, perf_counter())
            self._draw()
        if self._ticker is None:
            self._ticker = threading.Thread(target=self._tick, name="agentkeel-progress", daemon=True)
            self._ticker.start()

    def _clear(self) -> None:
        if self.mode != TTY:
            return
        with self._lock:
            if self._current is not None:
                click.echo(CLEAR, err=True, nl=False)
                sys.stderr.flush()
            self._current = None

    def _draw(self) -> None:  # with the lock held
        if self._current is None:
            return
        text, since = self._current
        frame = self.spinner[self._frame % len(self.spinner)]
        click.echo(f"{CLEAR}  {frame} {text}  {perf_counter() - since:.1f}s", err=True, nl=False)
        sys.stderr.flush()

    def _tick(self) -> None:
        while not self._stop.wait(TICK_S):
            with self._lock:
                self._frame += 1
                self._draw()

    def close(self) -> None:
        """Stop redrawing and clear the status line (idempotent)."""
        self._stop.set()
        if self._ticker is not None and self._ticker is not threading.current_thread():
            self._ticker.join(timeout=1)
        self._clear()


def follow(start: Start, as_json: bool) -> tuple[AgentResponse, bool]:
    """Run ``start`` showing its progress; (the response, whether its answer was
    already streamed to stdout)."""
    progress = Progress.for_terminal(as_json)
    try:
        response = start(progress.callback)
    finally:
        progress.close()
    return response, progress.answer_shown(response)


def follow_and_finish(start: Start, as_json: bool) -> NoReturn:
    """``follow``, then print the response and exit with its documented code."""
    response, shown = follow(start, as_json)
    finish(response, as_json, answer=not shown)
