"""``agentkeel run --server URL``: the same command, served by a remote ``agentkeel serve``.

The request goes to ``POST /v1/runs/stream`` with the key in ``AGENTKEEL_API_KEY``;
the Server-Sent Events are turned back into the events ``agentkeel run`` shows
locally, so progress, the answer, the steps and the exit code are the same. A
dropped connection is joined again at ``GET /v1/runs/{id}/stream`` with
``Last-Event-ID``, so no event is missed or shown twice.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator, Mapping
from typing import Any

import click
import httpx

from agentkeel.planner.plan import plan_from_dict
from agentkeel.types import AgentResponse, CostRecord, Event, PlanRevision, RunStatus, StepResult, StepStatus, Verdict

KEY_ENV = "AGENTKEEL_API_KEY"
RECONNECTS = 5


def step_from_dict(data: Mapping[str, Any]) -> StepResult:
    verdict = data.get("verdict")
    return StepResult(
        step_id=int(data["step_id"]), tool_name=str(data["tool_name"]), status=StepStatus(data["status"]),
        tool_args=dict(data.get("tool_args") or {}), result=data.get("result"), error=data.get("error"),
        duration_s=float(data.get("duration_s") or 0.0), cost_usd=float(data.get("cost_usd") or 0.0),
        attempts=int(data.get("attempts") or 0), verdict=Verdict(**verdict) if isinstance(verdict, dict) else None,
    )


def response_from_dict(data: Mapping[str, Any]) -> AgentResponse:
    """An ``AgentResponse`` rebuilt from its ``to_dict`` (costs as the breakdown's totals)."""
    breakdown = data.get("cost_breakdown") or {}
    costs = [CostRecord(kind="llm", cost_usd=float(v), tier=str(k))
             for k, v in (breakdown.get("by_tier") or {}).items()]
    costs += [CostRecord(kind="tool", cost_usd=float(v), tool=str(k))
              for k, v in (breakdown.get("by_tool") or {}).items()]
    revisions = tuple(PlanRevision(int(r["revision"]), str(r["reason"]), plan_from_dict(r["plan"]),
                                   float(r.get("planning_cost_usd") or 0.0)) for r in data.get("revisions") or ())
    plan = data.get("plan")
    return AgentResponse(
        run_id=str(data["run_id"]), status=RunStatus(data["status"]), message=str(data.get("message") or ""),
        plan=plan_from_dict(plan) if plan else None, steps=tuple(step_from_dict(s) for s in data.get("steps") or ()),
        costs=tuple(costs), total_cost_usd=float(data.get("total_cost_usd") or 0.0),
        duration_s=float(data.get("duration_s") or 0.0), answer=str(data.get("answer") or ""),
        answer_source=str(data.get("answer_source") or ""), revisions=revisions,
    )


def _event(kind: str, body: Mapping[str, Any]) -> Event:
    data = dict(body.get("data") or {})
    if isinstance(data.get("step"), dict):
        data["step"] = step_from_dict(data["step"])
    if isinstance(data.get("response"), dict):
        data["response"] = response_from_dict(data["response"])
    if isinstance(data.get("plan"), dict):
        data["plan"] = plan_from_dict(data["plan"])
    return Event(kind=kind, run_id=str(body.get("run_id") or ""), data=data)


def sse_events(lines: Iterator[str]) -> Iterator[tuple[str, str, str]]:
    """(id, event, data) of each event in a Server-Sent Events stream; comments skipped."""
    event_id, kind = "", "message"
    data: list[str] = []
    for line in lines:
        if not line:
            if data:
                yield event_id, kind, "\n".join(data)
            kind, data = "message", []
            continue
        if line.startswith(":"):
            continue
        field, _, value = line.partition(":")
        value = value[1:] if value.startswith(" ") else value
        if field == "id":
            event_id = value
        elif field == "event":
            kind = value
        elif field == "data":
            data.append(value)


def _problem(response: httpx.Response) -> str:
    try:
        body = response.json()
    except ValueError:
        return f"HTTP {response.status_code}: {response.text[:300]}"
    detail = body.get("detail") if isinstance(body, dict) else None
    return f"HTTP {response.status_code}: {detail or body}"


def run_remote(server: str, payload: Mapping[str, Any], on_event: Any) -> AgentResponse:
    """Serve ``payload`` on ``server``, calling ``on_event`` with each event; the final response."""
    key = os.environ.get(KEY_ENV, "").strip()
    if not key:
        raise click.UsageError(f"--server needs an API key in ${KEY_ENV} (`agentkeel keys create` on the server)")
    base = server.rstrip("/")
    headers = {"Authorization": f"Bearer {key}", "Accept": "text/event-stream"}
    run_id, last = "", ""
    with httpx.Client(timeout=httpx.Timeout(30.0, read=None)) as client:
        for attempt in range(RECONNECTS + 1):
            try:
                if not run_id:
                    stream = client.stream("POST", f"{base}/v1/runs/stream", json=dict(payload), headers=headers)
                else:
                    stream = client.stream("GET", f"{base}/v1/runs/{run_id}/stream",
                                           headers=headers | ({"Last-Event-ID": last} if last else {}))
                with stream as response:
                    if response.status_code != 200:
                        response.read()
                        raise click.ClickException(f"the server refused the run: {_problem(response)}")
                    for event_id, kind, data in sse_events(response.iter_lines()):
                        body = json.loads(data)
                        run_id = run_id or str(body.get("run_id") or "")
                        last = event_id or last
                        event = _event(kind, body)
                        if kind in ("run_finished", "run_status"):
                            return event.data["response"]  # type: ignore[no-any-return]
                        if kind == "run_error":
                            raise click.ClickException(f"the server could not finish run {run_id}: "
                                                       f"{event.data.get('error')}")
                        if on_event is not None:
                            on_event(event)
            except httpx.TransportError as exc:
                if not run_id or attempt == RECONNECTS:
                    raise click.ClickException(f"cannot reach {base}: {exc}") from exc
                time.sleep(min(2.0, 0.2 * 2 ** attempt))
    raise click.ClickException(f"the stream of run {run_id} ended before the run finished; "
                               f"`agentkeel show {run_id}` on the server has its state")
