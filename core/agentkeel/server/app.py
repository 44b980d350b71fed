"""The ASGI application: ``create_app(system)``.

Routes (the OpenAPI document at ``/openapi.json`` is generated from them):

- ``POST /v1/runs`` (background: the run id at once), ``/v1/runs/wait`` (the
  response), ``/v1/runs/stream`` (Server-Sent Events); ``GET /v1/runs``,
  ``/v1/runs/{id}``, ``/v1/runs/{id}/stream`` (join; ``Last-Event-ID`` resumes);
  ``POST /v1/runs/{id}/cancel``, ``/resume``, ``/rollback``, ``/resolve``;
- ``GET``/``DELETE /v1/sessions/{id}/turns``; ``GET /v1/approvals``,
  ``POST /v1/approvals/{run_id}/{step_id}``; ``GET /v1/tools``, ``/v1/costs``;
- ``/healthz``, ``/readyz``, ``/metrics``, ``/dashboard``.

Every ``/v1`` route needs ``Authorization: Bearer KEY``; the key's principal is
the caller, and the body cannot name another. A principal sees only its own
runs, sessions and approvals (another's run is a 404, like an unknown one, so
ids do not leak), unless it holds the ``admin`` permission. Errors are problem
documents (``problems.py``).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import math
import re
import time
import zoneinfo
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Annotated, Any, Literal

import attrs
from fastapi import APIRouter, Depends, FastAPI, Header, Path, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from fastapi.security import HTTPAuthorizationCredentials
from pydantic import BaseModel, ConfigDict, Field, StringConstraints
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from agentkeel.cost.store import GROUPS
from agentkeel.errors import AgentkeelError, ApprovalError, LeaseHeldError, RunNotFoundError
from agentkeel.journal.base import ApprovalRecord, RunRecord
from agentkeel.permissions.keys import KeyStore
from agentkeel.runtime.durable import RESUMABLE
from agentkeel.runtime.system import AgentSystem
from agentkeel.server.dashboard import install as install_dashboard
from agentkeel.server.fanout import RedisFanout
from agentkeel.server.manager import LiveRun, RunManager
from agentkeel.server.metrics import CONTENT_TYPE as METRICS_TYPE
from agentkeel.server.metrics import Metrics
from agentkeel.server.problems import PROBLEM_TYPE, Problem, pointer
from agentkeel.server.service import (
    ADMIN_PERMISSION,
    ERRORS,
    Caller,
    CallerDep,
    ProblemBody,
    Service,
    ServiceDep,
    bearer,
)
from agentkeel.server.settings import ServerSettings
from agentkeel.types import AgentRequest, AgentResponse, Event, check_text

MAX_TEXT = 100_000
MAX_ID = 200


# --- request and response bodies ---------------------------------------------------



class RunIn(BaseModel):
    """A request to serve. The caller is the API key's principal."""

    model_config = ConfigDict(extra="forbid")
    message: str = Field(min_length=1, max_length=MAX_TEXT, description="The user's message")
    session_id: str = Field("default", min_length=1, max_length=MAX_ID)
    budget_usd: float | None = Field(None, ge=0, allow_inf_nan=False, strict=True,
                                     description="USD for this request (a number; default: [budget] default_usd)")


class RunAccepted(BaseModel):
    run_id: str
    status: str
    """``queued`` or ``running``."""
    links: dict[str, str]


class RunOut(BaseModel):
    """A run's response: its status, the answer, its steps, revisions and costs."""

    model_config = ConfigDict(extra="allow")
    run_id: str
    status: str
    answer: str
    message: str
    steps: list[dict[str, Any]]
    total_cost_usd: float


class RunSummary(BaseModel):
    run_id: str
    status: str
    user_id: str
    session_id: str
    message: str
    detail: str
    created_at: float
    updated_at: float
    live: bool


StepKey = Annotated[str, StringConstraints(pattern=r"^[1-9][0-9]{0,5}$")]
"""A step id as a JSON object key."""


class ResumeIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    resolve: dict[StepKey, Literal["done", "not-done"]] = Field(
        default_factory=dict, description="In-doubt steps settled by an operator: step id -> done | not-done")


class ResolveIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    steps: dict[StepKey, Literal["done", "not-done"]] = Field(
        min_length=1, description="step id -> done (it took effect) | not-done (run it again)")


class CancelIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    reason: str = Field("", max_length=1000)


class DecisionIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    decision: Literal["approve", "deny"]
    reason: str = Field("", max_length=1000)
    resume: bool = Field(False, description="Resume the run once decided, and answer with its response")


class ApprovalOut(BaseModel):
    run_id: str
    step_id: int
    tool_name: str
    args: dict[str, Any]
    requested_by: str
    requested_at: float
    expires_at: float
    status: str
    decided_by: str
    decided_at: float
    reason: str
    run: RunOut | None = None


class TurnOut(BaseModel):
    id: int
    run_id: str
    role: str
    """``user`` (the message) or ``assistant`` (the answer)."""
    content: str
    status: str
    ts: float


class ForgetOut(BaseModel):
    session_id: str
    turns: int
    records: int
    embeddings: int
    summaries: int


RunId = Annotated[str, Path(min_length=1, max_length=MAX_ID, pattern=r"^[A-Za-z0-9._:-]+$")]


def _response_body(response: AgentResponse) -> dict[str, Any]:
    return response.to_dict()


def _summary(record: RunRecord, live: bool) -> RunSummary:
    return RunSummary(run_id=record.run_id, status=record.status, user_id=record.user_id,
                      session_id=record.session_id, message=record.message[:500], detail=record.detail[:2000],
                      created_at=record.created_at, updated_at=record.updated_at, live=live)


def _approval(record: ApprovalRecord, now: float) -> ApprovalOut:
    return ApprovalOut(run_id=record.run_id, step_id=record.step_id, tool_name=record.tool_name,
                       args=dict(record.args), requested_by=record.requested_by, requested_at=record.requested_at,
                       expires_at=record.expires_at, status=record.status_at(now), decided_by=record.decided_by,
                       decided_at=record.decided_at, reason=record.reason)


async def _outcome(live: LiveRun) -> dict[str, Any]:
    """The response of a finished task, or the problem it raised."""
    response = await live.wait()
    if response is not None:
        return _response_body(response)
    exc = live.exception
    if isinstance(exc, RunNotFoundError):
        raise Problem(404, str(exc))
    if isinstance(exc, (LeaseHeldError, AgentkeelError)):
        raise Problem(409, str(exc))
    raise Problem(500, f"the run {live.run_id} did not finish: {live.error or 'interrupted'}")


def _request(caller: Caller, body: RunIn) -> AgentRequest:
    for field, value in (("message", body.message), ("session_id", body.session_id)):
        try:
            check_text(field, value)
        except ValueError as exc:
            raise Problem(422, f"{field}: {exc}", errors=[{"field": f"/{field}", "message": str(exc)}]) from exc
    return AgentRequest(message=body.message, user_id=caller.name, session_id=body.session_id,
                        budget_usd=body.budget_usd)


def _resolutions(raw: Mapping[str, str], field: str) -> dict[int, bool]:
    out: dict[int, bool] = {}
    for key, value in raw.items():
        if not re.fullmatch(r"[1-9][0-9]{0,5}", key):
            raise Problem(422, f"{field}: {key!r} is not a step id", errors=[{"field": f"/{field}/{key}",
                                                                              "message": "not a step id"}])
        out[int(key)] = value == "done"
    return out


def _moment(value: str | None, timezone: str, what: str) -> float | None:
    """A query's time: Unix seconds, a date, or a date and time (in ``[budget] timezone``)."""
    if value is None:
        return None
    try:
        seconds = float(value)
    except ValueError:
        pass
    else:
        if math.isfinite(seconds) and abs(seconds) < 1e11:
            return seconds
        raise Problem(422, f"{what}: {value!r} is not a time", errors=[{"field": f"query.{what}",
                                                                        "message": "not a time"}])
    try:
        moment = dt.datetime.fromisoformat(value)
    except ValueError:
        raise Problem(422, f"{what}: {value!r} is not a date (2026-12-01), a date and time or Unix seconds",
                      errors=[{"field": f"query.{what}", "message": "not a date"}]) from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=zoneinfo.ZoneInfo(timezone))
    return moment.timestamp()


def _stream(live: LiveRun, after: int, heartbeat_s: float) -> StreamingResponse:
    async def body() -> AsyncIterator[bytes]:
        yield b"retry: 1000\n\n"
        async for event in live.follow(after, heartbeat_s):
            yield b": keep-alive\n\n" if event is None else event.sse()

    return StreamingResponse(body(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


def _shared_stream(fanout: RedisFanout, run_id: str, after: int, heartbeat_s: float) -> StreamingResponse:
    """A run another replica serves (or served), followed through Redis."""
    async def body() -> AsyncIterator[bytes]:
        yield b"retry: 1000\n\n"
        async for event in fanout.follow(run_id, after, heartbeat_s):
            yield b": keep-alive\n\n" if event is None else event.sse()

    return StreamingResponse(body(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


def _fanout(system: AgentSystem) -> RedisFanout | None:
    url = system.config.section("shared").get("redis_url")
    return RedisFanout(str(url)) if url else None


def _last_event_id(header: str | None, after: int | None) -> int:
    if after is not None:
        return after
    if header is None:
        return 0
    header = header.strip()
    return int(header) if re.fullmatch(r"[0-9]{1,9}", header) else 0


SSE_RESPONSE: dict[int | str, dict[str, Any]] = {
    200: {"description": "Server-Sent Events of the run, each with an `id`; the last is `run_finished` "
                         "(its data holds the response) or `run_error`",
          "content": {"text/event-stream": {"schema": {
              "type": "object", "required": ["data"],
              "description": "One event; `data` is the JSON of {kind, run_id, data}",
              "properties": {"id": {"type": "string", "pattern": "^[0-9]+$"}, "event": {"type": "string"},
                             "data": {"type": "string"}, "retry": {"type": "integer"}}}}}},
}


def _routes(router: APIRouter) -> None:
    @router.post("/runs", status_code=202, response_model=RunAccepted, summary="Start a run in the background")
    async def create_run(body: RunIn, caller: CallerDep, service: ServiceDep) -> RunAccepted:
        request = _request(caller, body)
        live = service.admit(lambda: service.manager.submit(request))
        run_id = request.run_id
        return RunAccepted(run_id=run_id, status=live.state, links={
            "self": f"/v1/runs/{run_id}", "stream": f"/v1/runs/{run_id}/stream",
            "cancel": f"/v1/runs/{run_id}/cancel"})

    @router.post("/runs/wait", response_model=RunOut, summary="Serve a request and answer with its response")
    async def wait_run(body: RunIn, caller: CallerDep, service: ServiceDep) -> dict[str, Any]:
        request = _request(caller, body)
        live = service.admit(lambda: service.manager.submit(request))
        return await _outcome(live)

    @router.post("/runs/stream", response_class=StreamingResponse, responses=SSE_RESPONSE,
                 summary="Serve a request, streaming its events")
    async def stream_run(body: RunIn, caller: CallerDep, service: ServiceDep) -> StreamingResponse:
        request = _request(caller, body)
        live = service.admit(lambda: service.manager.submit(request))
        return _stream(live, 0, service.settings.heartbeat_s)

    @router.get("/runs", response_model=list[RunSummary], summary="Runs, newest first")
    async def list_runs(
        caller: CallerDep, service: ServiceDep,
        limit: Annotated[int, Query(ge=1, le=1000)] = 50,
        status: Annotated[str | None, Query(max_length=40)] = None,
        user: Annotated[str | None, Query(min_length=1, max_length=MAX_ID,
                                          description="Admin only: another principal's runs")] = None,
    ) -> list[RunSummary]:
        if user is not None and not caller.admin and user != caller.name:
            raise Problem(403, "only an admin may list another principal's runs")
        who = user if user is not None else (None if caller.admin else caller.name)
        records = service.system.journal.list_runs(limit, user_id=who)
        live = set(service.system.live_runs())
        return [_summary(r, r.run_id in live) for r in records if status is None or r.status == status]

    @router.get("/runs/{run_id}", response_model=RunOut, summary="A run as the journal records it")
    async def get_run(run_id: RunId, caller: CallerDep, service: ServiceDep) -> dict[str, Any]:
        service.record(caller, run_id)
        return _response_body(service.system.show(run_id))

    @router.get("/runs/{run_id}/stream", response_class=StreamingResponse, responses=SSE_RESPONSE,
                summary="Join a run's event stream (Last-Event-ID resumes after that event)")
    async def join_stream(
        run_id: RunId, caller: CallerDep, service: ServiceDep,
        last_event_id: Annotated[str | None, Header(max_length=20)] = None,
        after: Annotated[int | None, Query(ge=0, le=10**9, description="Events after this id")] = None,
    ) -> StreamingResponse:
        live = service.live(caller, run_id)
        if live is not None:
            return _stream(live, _last_event_id(last_event_id, after), service.settings.heartbeat_s)
        service.record(caller, run_id)  # 404 unless the caller may see it
        if service.fanout is not None and await service.fanout.exists(run_id):
            return _shared_stream(service.fanout, run_id, _last_event_id(last_event_id, after),
                                  service.settings.heartbeat_s)
        response = service.system.show(run_id)
        finished = response.status.value not in RESUMABLE
        kind = "run_finished" if finished else "run_status"
        import json

        body = json.dumps({"kind": kind, "run_id": run_id, "data": {"response": response.to_dict()}},
                          separators=(",", ":"), ensure_ascii=False)

        async def once() -> AsyncIterator[bytes]:
            yield f"event: {kind}\ndata: {body}\n\n".encode()

        return StreamingResponse(once(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    @router.post("/runs/{run_id}/cancel", response_model=RunOut, responses={202: {"model": RunAccepted}},
                 summary="Cancel a run: it stops at the next step boundary and its completed steps are compensated")
    async def cancel_run(run_id: RunId, caller: CallerDep, service: ServiceDep,
                         body: CancelIn | None = None) -> Any:
        reason = (body.reason if body is not None else "") or f"cancelled by {caller.name}"
        live = service.live(caller, run_id)
        if live is not None and service.manager.stop(run_id, reason) is not None:
            service.system.audit.record(run_id=run_id, principal=caller.name, action="cancel", tool="",
                                        decision="allow", reason=reason, arg_keys=())
            try:
                await asyncio.wait_for(asyncio.shield(live.wait()), service.settings.cancel_wait_s)
            except TimeoutError:
                return JSONResponse(status_code=202, content=RunAccepted(
                    run_id=run_id, status="cancelling", links={"self": f"/v1/runs/{run_id}"}).model_dump())
            return await _outcome(live)
        record = service.record(caller, run_id)
        if record.status not in RESUMABLE:
            raise Problem(409, f"run {run_id} has already finished ({record.status}); "
                               f"POST /v1/runs/{run_id}/rollback undoes its steps")
        return await _outcome(service.admit(lambda: service.manager.submit_cancel(run_id, caller.name, reason)))

    @router.post("/runs/{run_id}/resume", response_model=RunOut, summary="Continue an unfinished run")
    async def resume_run(run_id: RunId, caller: CallerDep, service: ServiceDep,
                         body: ResumeIn | None = None) -> dict[str, Any]:
        record = service.record(caller, run_id)
        resolve = _resolutions(body.resolve, "resolve") if body is not None else {}
        if record.status not in RESUMABLE:
            return _response_body(service.system.show(run_id))
        return await _outcome(service.admit(
            lambda: service.manager.submit_resume(run_id, record.user_id, resolve or None)))

    @router.post("/runs/{run_id}/resolve", response_model=RunOut,
                 summary="Settle in-doubt steps (done: it took effect; not-done: run it again) and resume")
    async def resolve_run(run_id: RunId, body: ResolveIn, caller: CallerDep, service: ServiceDep) -> dict[str, Any]:
        record = service.record(caller, run_id)
        resolve = _resolutions(body.steps, "steps")
        if record.status != "in_doubt":
            raise Problem(409, f"run {run_id} is {record.status}, not in_doubt: there is nothing to resolve")
        return await _outcome(service.admit(lambda: service.manager.submit_resume(run_id, record.user_id, resolve)))

    @router.post("/runs/{run_id}/rollback", response_model=RunOut,
                 summary="Compensate a finished run's completed steps, last first")
    async def rollback_run(run_id: RunId, caller: CallerDep, service: ServiceDep) -> dict[str, Any]:
        record = service.record(caller, run_id)
        if record.status in RESUMABLE:
            raise Problem(409, f"run {run_id} is {record.status}: cancel it (POST /v1/runs/{run_id}/cancel) "
                               "rather than roll it back")
        return await _outcome(service.admit(lambda: service.manager.submit_rollback(run_id, record.user_id)))

    # --- sessions -------------------------------------------------------------------

    @router.get("/sessions/{session_id}/turns", response_model=list[TurnOut],
                summary="A session's most recent turns, oldest first")
    async def session_turns(
        session_id: Annotated[str, Path(min_length=1, max_length=MAX_ID)], caller: CallerDep, service: ServiceDep,
        limit: Annotated[int, Query(ge=1, le=1000)] = 100,
        user: Annotated[str | None, Query(min_length=1, max_length=MAX_ID)] = None,
    ) -> list[TurnOut]:
        owner = _owner(caller, user)
        turns = sorted(service.memory_store().recent_turns(owner, session_id, limit=limit), key=lambda t: t.id)
        return [TurnOut(id=t.id, run_id=t.run_id, role=t.role, content=t.content, status=t.status, ts=t.ts)
                for t in turns]

    @router.delete("/sessions/{session_id}", response_model=ForgetOut,
                   summary="Forget a session: its turns, records, embeddings and summary (audited)")
    async def forget_session(
        session_id: Annotated[str, Path(min_length=1, max_length=MAX_ID)], caller: CallerDep, service: ServiceDep,
        user: Annotated[str | None, Query(min_length=1, max_length=MAX_ID)] = None,
    ) -> ForgetOut:
        owner = _owner(caller, user)
        gone = service.memory_store().forget(owner, session_id=session_id)
        service.system.audit.record(
            run_id="", principal=caller.name, action="memory_forget", tool="", decision="allow",
            reason=f"user {owner!r} session {session_id!r}: {gone.turns} turns, {gone.records} records, "
                   f"{gone.embeddings} embeddings, {gone.summaries} summaries", arg_keys=())
        service.system.stores.flush()
        return ForgetOut(session_id=session_id, turns=gone.turns, records=gone.records, embeddings=gone.embeddings,
                         summaries=gone.summaries)

    # --- approvals ------------------------------------------------------------------

    @router.get("/approvals", response_model=list[ApprovalOut],
                summary="Approvals: the caller's own requests, or every one for an approver")
    async def list_approvals(
        caller: CallerDep, service: ServiceDep,
        status: Literal["pending", "approved", "denied", "expired", "all"] = "pending",
        limit: Annotated[int, Query(ge=1, le=1000)] = 50,
    ) -> list[ApprovalOut]:
        now = time.time()
        records = service.system.approvals(None if status == "all" else status, limit)
        return [_approval(r, now) for r in records if caller.approver or r.requested_by == caller.name]

    @router.post("/approvals/{run_id}/{step_id}", response_model=ApprovalOut,
                 summary="Approve or deny a waiting step (principals holding `approve`)")
    async def decide(
        run_id: RunId, step_id: Annotated[int, Path(ge=1, le=1_000_000)], body: DecisionIn,
        caller: CallerDep, service: ServiceDep,
    ) -> ApprovalOut:
        record = service.system.journal.approval(run_id, step_id)
        if record is None or not (caller.approver or record.requested_by == caller.name):
            raise Problem(404, f"no approval for step {step_id} of run {run_id}")
        try:
            decided = service.system.decide(run_id, step_id, approver=caller.name,
                                            approved=body.decision == "approve", reason=body.reason)
        except ApprovalError as exc:
            status = 409 if caller.approver and record.requested_by != caller.name else 403
            if status == 409 and record.status_at(time.time()) == "pending":
                status = 403  # a pending approval refused to this caller: a permission matter
            raise Problem(status, str(exc)) from exc
        out = _approval(decided, time.time())
        if body.resume:
            owner = service.record(caller if caller.sees(decided.requested_by) else _as_admin(caller), run_id)
            live = service.admit(lambda: service.manager.submit_resume(run_id, owner.user_id))
            out.run = RunOut.model_validate(await _outcome(live))
        return out

    # --- tools and costs ------------------------------------------------------------

    @router.get("/tools", summary="The tools the caller may use, with their metadata",
                response_model=list[dict[str, Any]])
    async def tools(caller: CallerDep, service: ServiceDep) -> list[dict[str, Any]]:
        visible = service.system.visible_tools(caller.principal)
        return [spec.to_dict() for _, spec in sorted(visible.items())]

    @router.get("/costs", summary="Spending from the cost ledger, grouped (the caller's own unless admin)",
                response_model=list[dict[str, Any]])
    async def costs(
        caller: CallerDep, service: ServiceDep,
        by: Literal[GROUPS] = "tier",  # type: ignore[valid-type]
        since: Annotated[str | None, Query(max_length=40)] = None,
        until: Annotated[str | None, Query(max_length=40)] = None,
        user: Annotated[str | None, Query(min_length=1, max_length=MAX_ID)] = None,
    ) -> list[dict[str, Any]]:
        tz = service.system.config.timezone
        start, end = _moment(since, tz, "since"), _moment(until, tz, "until")
        owner = _owner(caller, user, everyone=True)
        return service.system.costs(by, user=owner, since=start, until=end)


def _owner(caller: Caller, user: str | None, *, everyone: bool = False) -> Any:
    """Whose data a request reads: the caller's, or (an admin only) ``user``'s, or (``everyone``) all."""
    if user is not None and user != caller.name and not caller.admin:
        raise Problem(403, "only an admin may read another principal's data")
    if user is not None:
        return user
    return None if everyone and caller.admin else caller.name


def _as_admin(caller: Caller) -> Caller:
    return Caller(attrs.evolve(caller.principal, permissions=caller.principal.permissions | {ADMIN_PERMISSION}),
                  caller.key)


# --- middleware and errors -------------------------------------------------------------


class BodyLimit:
    """Refuse a request body over ``limit`` bytes with 413, by its Content-Length or as it streams."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        for name, value in scope.get("headers", ()):
            if name == b"content-length":
                if not value.isdigit() or int(value) > self.limit:
                    await _send_problem(send, Problem(413 if value.isdigit() else 400, self._why(value)))
                    return
        # The body is read here, up to the limit, before the app sees it (bodies are small:
        # JSON requests), so a body sent without a Content-Length is refused the same way.
        chunks: list[bytes] = []
        received = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return  # the client went away
            chunk = message.get("body", b"")
            received += len(chunk)
            if received > self.limit:
                await _send_problem(send, Problem(413, self._why(str(received).encode())))
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    def _why(self, value: bytes) -> str:
        if not value.isdigit():
            return "the Content-Length header is not a number"
        return f"the request body is larger than the {self.limit} bytes this server accepts ([server] max_body_bytes)"


async def _send_problem(send: Send, problem: Problem) -> None:
    import json

    body = json.dumps(problem.body()).encode()
    headers = [(b"content-type", PROBLEM_TYPE.encode()), (b"content-length", str(len(body)).encode()),
               (b"connection", b"close")]
    await send({"type": "http.response.start", "status": problem.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def _problem_json(problem: Problem, request: Request) -> JSONResponse:
    return JSONResponse(problem.body(request.url.path), status_code=problem.status, media_type=PROBLEM_TYPE,
                        headers=problem.headers)


def _install_errors(app: FastAPI) -> None:
    async def on_problem(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, Problem)
        return _problem_json(exc, request)

    async def on_invalid(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, RequestValidationError)
        errors = list(exc.errors())
        if any(e.get("type") == "json_invalid" for e in errors):
            first = next(e for e in errors if e.get("type") == "json_invalid")
            where = first.get("ctx", {}).get("error", "")
            return _problem_json(Problem(400, f"the body is not valid JSON: {where}".rstrip(": ")), request)
        fields = [{"field": pointer(e.get("loc", ())), "message": str(e.get("msg", "invalid"))} for e in errors]
        detail = "; ".join(f"{f['field']}: {f['message']}" for f in fields[:5])
        return _problem_json(Problem(422, f"invalid request: {detail}", errors=fields), request)

    async def on_http(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, StarletteHTTPException)
        detail = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
        return _problem_json(Problem(exc.status_code, detail, headers=dict(exc.headers or {})), request)

    async def on_bug(request: Request, exc: Exception) -> Response:
        import logging

        logging.getLogger("agentkeel.server").exception("unhandled error on %s", request.url.path)
        return _problem_json(Problem(500, f"internal error ({type(exc).__name__}); the server log has the "
                                          "traceback"), request)

    app.add_exception_handler(Problem, on_problem)
    app.add_exception_handler(RequestValidationError, on_invalid)
    app.add_exception_handler(StarletteHTTPException, on_http)
    app.add_exception_handler(Exception, on_bug)


# --- the app ----------------------------------------------------------------------------


def create_app(
    system: AgentSystem,
    *,
    keys: KeyStore | None = None,
    settings: ServerSettings | None = None,
    close_system: bool = True,
) -> FastAPI:
    """The ASGI app serving ``system``. ``keys`` defaults to the store the plugins open
    (``agentkeel_open_key_store``); ``settings`` to ``[server]``. The app's lifespan
    starts the system and, on shutdown, drains the runs (``RunManager.drain``) and
    closes the system (unless ``close_system=False``) and the key store."""
    settings = settings or ServerSettings.from_config(system.config)
    if keys is None:
        keys = system.plugins.hook.agentkeel_open_key_store(config=system.config)
        if keys is None:
            raise AgentkeelError("no plugin opened an API key store (agentkeel_open_key_store)")
    manager = RunManager(system, max_inflight=settings.max_inflight, max_queue=settings.max_queue)
    metrics = Metrics(manager, system.breakers)
    fanout = _fanout(system)
    if fanout is None:
        manager.listener = metrics.observe
    else:
        def listen(live: LiveRun, event: Event) -> None:
            metrics.observe(live, event)
            fanout.publish(live.run_id, live.events[-1])

        manager.listener = listen
    service = Service(system, keys, settings, manager, metrics, fanout=fanout)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await system.start()
        sweeper = (asyncio.get_running_loop().create_task(manager.sweep_forever(settings.sweep_interval_s),
                                                          name="agentkeel-sweeper")
                   if settings.sweep_interval_s > 0 else None)
        try:
            yield
        finally:
            if sweeper is not None:
                sweeper.cancel()
            await manager.drain(settings.shutdown_grace_s)
            if fanout is not None:
                await fanout.aclose()
            service.close_memory()
            keys.close()
            if close_system:
                await system.aclose()

    # No /docs or /redoc: FastAPI's pages load their scripts from a CDN. /openapi.json is the API.
    app = FastAPI(title="agentkeel", version=_version(), lifespan=lifespan, docs_url=None, redoc_url=None,
                  description="Serve agent requests: runs, streams, approvals, costs. Authenticate with "
                              "`Authorization: Bearer KEY` (`agentkeel keys create`).",
                  responses={422: ERRORS[422]})
    app.state.service = service
    _install_errors(app)
    router = APIRouter(prefix="/v1", responses={k: v for k, v in ERRORS.items() if k not in (503,)})
    _routes(router)
    app.include_router(router)
    _operations(app, service)
    install_dashboard(app, service)
    app.add_middleware(BodyLimit, limit=settings.max_body_bytes)
    _problem_schema(app)
    return app


def _operations(app: FastAPI, service: Service) -> None:
    @app.get("/healthz", summary="The process is up", response_model=dict[str, str])
    async def healthz() -> dict[str, str]:
        return {"status": "draining" if service.manager.draining else "ok"}

    @app.get("/readyz", summary="The stores are reachable", response_model=dict[str, Any],
             responses={503: ERRORS[503]})
    async def readyz() -> Response:
        checks: dict[str, str] = {}
        probes: dict[str, Callable[[], Any]] = {
            "journal": lambda: service.system.journal.list_runs(1),
            "ledger": lambda: service.system.budgets.totals("tier", since=time.time()),
            "keys": lambda: service.keys.get("000000000000"),
        }
        for name, probe in probes.items():
            try:
                probe()
                checks[name] = "ok"
            except Exception as exc:  # noqa: BLE001 - readiness reports any failure of a store
                checks[name] = f"{type(exc).__name__}: {exc}"
        if service.fanout is not None:
            try:
                await asyncio.wait_for(service.fanout.ping(), 2.0)
                checks["redis"] = "ok"
            except Exception as exc:  # noqa: BLE001 - breakers and rate limits refuse calls meanwhile
                checks["redis"] = (f"{type(exc).__name__}: {exc} (tool calls are refused while it is down: "
                                   "[shared] fail_mode)")
        ready = all(v == "ok" for v in checks.values()) and not service.manager.draining
        if service.manager.draining:
            checks["server"] = "shutting down"
        body = {"status": "ready" if ready else "unavailable", "checks": checks}
        if ready:
            return JSONResponse(body)
        return JSONResponse(Problem(503, "not ready: " + ", ".join(f"{k} {v}" for k, v in checks.items()
                                                                    if v != "ok")).body() | {"checks": checks},
                            status_code=503, media_type=PROBLEM_TYPE)

    @app.get("/metrics", summary="Prometheus metrics (an admin key unless [server] public_metrics)",
             response_class=Response, responses={200: {"content": {METRICS_TYPE: {"schema": {"type": "string"}}}},
                                                 401: ERRORS[401], 403: ERRORS[403], 429: ERRORS[429]})
    async def metrics(
        request: Request, credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)],
    ) -> Response:
        if not service.settings.public_metrics:
            caller = service.authenticate(request, credentials)
            if not caller.admin:
                raise Problem(403, f"/metrics needs a key whose principal holds {ADMIN_PERMISSION!r}")
        return Response(service.metrics.exposition(), media_type=METRICS_TYPE)


def _problem_schema(app: FastAPI) -> None:
    """Put ``ProblemBody`` in the OpenAPI components (the error responses refer to it)."""
    original = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is not None:
            return app.openapi_schema
        schema = original()
        components = schema.setdefault("components", {}).setdefault("schemas", {})
        components["ProblemBody"] = ProblemBody.model_json_schema()
        components.pop("HTTPValidationError", None)
        components.pop("ValidationError", None)
        app.openapi_schema = schema
        return schema

    app.openapi = openapi  # type: ignore[method-assign]


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("agentkeel")
    except PackageNotFoundError:
        return "0"

