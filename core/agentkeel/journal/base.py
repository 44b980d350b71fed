"""The run journal: what a durable run wrote, so another process can resume or roll it back.

A run is one row (the request, the principal, the plan as planned, a status) plus
an append-only list of step records. Before a tool starts, the executor writes an
*intent* record (with the step's idempotency key); after it ends, an *outcome*
record (status, result, verdict, duration, cost). Compensations are journaled the
same way with ``kind="compensation"``.

Ownership is a lease with an epoch. ``create_run`` and ``acquire`` hand out a
``Lease``; every write that takes one (``intent``, ``outcome``, ``set_status``,
``renew``, ``release``) checks, atomically with the write, that the run's epoch
and holder are still the lease's, and raises ``FencedError`` otherwise, writing
nothing. Every ``acquire`` starts a new epoch — even by the same owner — so any
lease handed out earlier is fenced from then on.

``acquire`` takes a run when nobody holds it, the lease has expired, the holder
is the caller, or the holder is a process on this host that is provably gone
(no such pid, a zombie, or a pid recycled by a process that started later).
Owner strings are ``"hostname:pid:start"`` (``make_owner``); ``start`` is the
process start time in clock ticks since boot, from ``/proc/<pid>/stat``. Where
``/proc`` is missing the token is random and only the pid is checked. Liveness
cannot be checked across hosts (nor across pid namespaces that share a host
name): there, only expiry frees a run.

Backends: ``agentkeel.journal_sqlite.SQLiteJournal`` (durable, in
``<home>/agentkeel.db``) and ``agentkeel.journal_memory.MemoryJournal``
(in-process, same semantics). Both store values as JSON, so what ``load``
returns is what JSON round-trips (tuples come back as lists, mapping keys as
strings), and a value that is not JSON is refused with ``JournalRecordError``.
A ``StepRecord`` written with ``ts=0.0`` is stamped with the journal's clock
(backends take ``clock=time.time``; inject one in tests).
"""

from __future__ import annotations

import enum
import json
import math
import os
import socket
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from json.encoder import c_encode_basestring as _c_encode_basestring  # type: ignore[attr-defined]
from json.encoder import c_make_encoder as _c_make_encoder  # type: ignore[attr-defined]
from typing import Any, Protocol, runtime_checkable

import attrs

from agentkeel.errors import ApprovalError, FencedError, JournalRecordError, LeaseHeldError, RunNotFoundError

__all__ = [
    "ABANDONABLE",
    "APPROVAL_STATUSES",
    "DEFAULT_TTL_S",
    "KINDS",
    "PHASES",
    "PLAN_REASONS",
    "REVISION_REASONS",
    "ApprovalRecord",
    "Journal",
    "Lease",
    "PlanRecord",
    "RunRecord",
    "RunState",
    "StepRecord",
    "approval_from_row",
    "holder_is_dead",
    "make_owner",
    "parse_owner",
    "process_start_time",
    "run_from_row",
]

DEFAULT_TTL_S = 30.0
KINDS = ("forward", "compensation")
PHASES = ("intent", "outcome")
APPROVAL_STATUSES = ("pending", "approved", "denied", "expired")
ABANDONABLE = ("running", "rolling_back")
"""Run statuses a sweeper takes over when nobody holds the run (``Journal.abandoned_runs``)."""
PLAN_REASONS = ("initial", "replan", "round")
REVISION_REASONS = tuple(r for r in PLAN_REASONS if r != "initial")
"""The reasons ``revise_plan`` takes (``"initial"`` is revision 1's, written by ``create_run``)."""


def _plain_str(value: Any) -> Any:
    """Enum members (``StepStatus.SUCCEEDED``) become their value, so both backends agree."""
    return value.value if isinstance(value, enum.Enum) else value


@attrs.frozen
class Lease:
    """The right to write to ``run_id`` while ``epoch`` is the run's current epoch."""

    run_id: str
    owner: str
    epoch: int
    expires_at: float


@attrs.frozen
class StepRecord:
    """One journal entry for a step: an intent (before the tool starts) or an outcome (after)."""

    step_id: int
    kind: str  # one of KINDS; checked by the journal on write (check_record), not here:
    phase: str  # one of PHASES; records are built twice per step on the hot path
    tool_name: str
    args: Mapping[str, Any]
    idempotency_key: str | None = None
    status: str | None = attrs.field(default=None, converter=_plain_str)
    result: Any = None
    error: str | None = None
    duration_s: float = 0.0
    cost_usd: float = 0.0
    attempts: int = 0
    verdict: dict[str, Any] | None = None
    ts: float = 0.0


@attrs.frozen
class RunRecord:
    """A run as journaled. ``owner`` is ``""`` when no lease is held (released).

    ``updated_at`` is the time of the run's last write (create, acquire, release,
    status, or its latest step record); ``lease_expires_at`` when the current
    lease lapses (0 when released).
    """

    run_id: str
    user_id: str
    session_id: str
    message: str
    principal: str
    budget_usd: float | None
    plan: dict[str, Any]
    status: str = attrs.field(converter=_plain_str)
    detail: str
    created_at: float
    updated_at: float
    owner: str
    epoch: int
    lease_expires_at: float = 0.0
    planning_cost_usd: float = 0.0
    """What planning the run cost (LLM calls before its first step)."""
    then_status: str = ""
    """While ``rolling_back``: the status the run takes once its compensation is done.
    While ``running``: ``"replan"`` when a replan was decided and its plan is not
    journaled yet (a resume plans it)."""
    answer: str = ""
    """The user-facing answer the responder wrote when the run last stopped."""
    context: dict[str, Any] | None = None
    """What memory put in the run's prompts and what it left out (``ContextReport.to_dict()``)."""


@attrs.frozen
class PlanRecord:
    """One journaled revision of a run's plan (``plan`` as ``Plan.to_dict()``)."""

    revision: int
    reason: str  # one of PLAN_REASONS
    plan: dict[str, Any]
    planning_cost_usd: float = 0.0
    ts: float = 0.0


@attrs.frozen
class ApprovalRecord:
    """A step's request for a human's approval, and the decision once made.

    ``status`` is as stored; ``status_at(now)`` is what it means now (a pending
    approval past ``expires_at`` is expired, and expiry counts as a denial).
    """

    run_id: str
    step_id: int
    tool_name: str
    args: Mapping[str, Any]
    requested_by: str
    requested_at: float
    expires_at: float
    status: str = "pending"
    decided_by: str = ""
    decided_at: float = 0.0
    reason: str = ""

    def status_at(self, now: float) -> str:
        if self.status == "pending" and self.expires_at <= now:
            return "expired"
        return self.status


@attrs.frozen
class RunState:
    """A run, its step records in the order they were written, and its plan revisions
    (oldest first; the latest is ``run.plan``)."""

    run: RunRecord
    steps: tuple[StepRecord, ...]
    revisions: tuple[PlanRecord, ...] = ()

    def forward(self, step_id: int) -> tuple[StepRecord | None, StepRecord | None]:
        """(intent, outcome) of the latest forward attempt of ``step_id``; ``(None, None)`` if none.

        An attempt starts with an intent; an outcome belongs to the intent before
        it. An outcome written with no open intent (a step skipped or denied
        before it ran) is an attempt of its own: ``(None, outcome)``. An intent
        with no outcome after it is a step that started and did not finish.
        """
        return self._latest(step_id, "forward")

    def compensation(self, step_id: int) -> tuple[StepRecord | None, StepRecord | None]:
        """(intent, outcome) of the latest compensation attempt of ``step_id``, as ``forward``."""
        return self._latest(step_id, "compensation")

    def _latest(self, step_id: int, kind: str) -> tuple[StepRecord | None, StepRecord | None]:
        intent: StepRecord | None = None
        outcome: StepRecord | None = None
        for record in self.steps:
            if record.step_id != step_id or record.kind != kind:
                continue
            if record.phase == "intent":
                intent, outcome = record, None
            elif outcome is None and intent is not None:
                outcome = record
            else:
                intent, outcome = None, record
        return intent, outcome


@runtime_checkable
class Journal(Protocol):
    """Where durable runs are recorded. All methods are synchronous and thread-safe.

    Every write that takes a ``Lease`` is refused with ``FencedError`` (writing
    nothing) unless the run's current epoch and holder are the lease's. A call
    that returns has committed its write (see each backend for durability).
    """

    def create_run(
        self,
        *,
        run_id: str,
        user_id: str,
        session_id: str,
        message: str,
        principal: str,
        budget_usd: float | None,
        plan: dict[str, Any],
        owner: str,
        ttl_s: float = DEFAULT_TTL_S,
        planning_cost_usd: float = 0.0,
        context: dict[str, Any] | None = None,
    ) -> Lease:
        """Record a new run in status ``"running"`` held by ``owner`` at epoch 1,
        with ``plan`` as its revision 1 (reason ``"initial"``, ``planning_cost_usd``)
        and ``context``, the memory report of its prompts (JSON).

        Raises ``RunExistsError`` when ``run_id`` is taken, ``JournalRecordError``
        when ``plan`` is not JSON.
        """
        ...

    def revise_plan(self, lease: Lease, plan: dict[str, Any], reason: str, planning_cost_usd: float = 0.0) -> int:
        """Append a plan revision (``reason`` "replan" or "round"), make it the run's
        plan, add ``planning_cost_usd`` to the run's, clear ``then_status``; one
        atomic, fenced write. Returns the new revision's number (previous + 1).
        ``JournalRecordError`` for a plan that is not JSON or an unknown reason."""
        ...

    def acquire(self, run_id: str, owner: str, ttl_s: float = DEFAULT_TTL_S) -> Lease:
        """Take the run at a new epoch (see the module docstring for when that is allowed).

        Raises ``LeaseHeldError`` naming the holder and its expiry, or ``RunNotFoundError``.
        """
        ...

    def renew(self, lease: Lease, ttl_s: float = DEFAULT_TTL_S) -> Lease:
        """Extend the lease to ``now + ttl_s`` (same epoch). ``FencedError`` if it moved on."""
        ...

    def release(self, lease: Lease) -> None:
        """Give the run up (holder becomes ``""``). Releasing twice is a no-op; ``FencedError``
        if another owner took it."""
        ...

    def intent(self, lease: Lease, record: StepRecord) -> None:
        """Append an intent record (``record.phase == "intent"``), committed before returning."""
        ...

    def outcome(self, lease: Lease, record: StepRecord) -> None:
        """Append an outcome record (``record.phase == "outcome"``), committed before returning."""
        ...

    def write_steps(self, lease: Lease, records: Sequence[StepRecord]) -> None:
        """Append ``records`` (intents and outcomes, each checked as ``intent``/``outcome`` check it)
        in order, in one transaction: all of them are committed before returning, or none is."""
        ...

    def set_status(
        self, lease: Lease, status: str, detail: str = "", then_status: str = "", answer: str | None = None
    ) -> None:
        """Set the run's status, detail and ``then_status`` (and ``updated_at``); and its
        ``answer`` unless it is None (then the answer is left as it was)."""
        ...

    # --- approvals ---------------------------------------------------------------------

    def request_approval(
        self, lease: Lease, step_id: int, tool_name: str, args: Mapping[str, Any], requested_by: str, ttl_s: float
    ) -> ApprovalRecord:
        """Record that step ``step_id`` waits for approval, expiring ``ttl_s`` from now
        (fenced). When the step already has an approval record, whatever its status,
        it is returned unchanged and nothing is written."""
        ...

    def approval(self, run_id: str, step_id: int) -> ApprovalRecord | None:
        """The approval record of a step, or None."""
        ...

    def decide_approval(
        self, run_id: str, step_id: int, *, approved: bool, by: str, reason: str = ""
    ) -> ApprovalRecord:
        """Approve or deny a pending approval, atomically (two deciders: one wins).
        Not fenced: the run is usually not leased while it waits. Raises
        ``ApprovalError`` when there is no such approval, it was already decided
        (naming who decided and how), or it has expired (it is then stored as
        ``"expired"``)."""
        ...

    def list_approvals(self, status: str | None = "pending", limit: int = 50) -> list[ApprovalRecord]:
        """Up to ``limit`` approvals, newest request first, whose ``status_at(now)``
        is ``status`` (every approval when None)."""
        ...

    def load(self, run_id: str) -> RunState:
        """The run and all its records. ``RunNotFoundError`` if there is no such run."""
        ...

    def list_runs(self, limit: int = 50, *, user_id: str | None = None) -> list[RunRecord]:
        """Up to ``limit`` runs, newest first (``created_at`` descending, then latest created);
        only ``user_id``'s when given."""
        ...

    def abandoned_runs(self, now: float, limit: int = 100) -> list[RunRecord]:
        """Up to ``limit`` runs that are ``running`` or ``rolling_back`` and that nobody holds:
        released (a process paused them on its way out) or with a lease expired by ``now`` (its
        holder died or stopped). Oldest first. A sweeper takes them over with ``acquire``."""
        ...

    def close(self) -> None:
        """Release resources; the journal must not be used afterwards. Idempotent."""
        ...


# --- owners and liveness -------------------------------------------------------------

_owner_cache: tuple[int, str] | None = None


def process_start_time(pid: int) -> int | None:
    """Start time of ``pid`` in clock ticks since boot, or None when it cannot be read."""
    fields = _proc_stat_fields(pid)
    if fields is None:
        return None
    try:
        return int(fields[19])
    except (IndexError, ValueError):
        return None


def _proc_stat_fields(pid: int) -> list[str] | None:
    """Fields 3.. of ``/proc/<pid>/stat`` (after the parenthesised command name)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            raw = f.read().decode("ascii", "replace")
    except OSError:
        return None
    return raw[raw.rfind(")") + 2 :].split()


def make_owner() -> str:
    """``"hostname:pid:start"`` for this process (recomputed after a fork)."""
    global _owner_cache
    pid = os.getpid()
    if _owner_cache is not None and _owner_cache[0] == pid:
        return _owner_cache[1]
    host = socket.gethostname().replace(":", "_") or "localhost"
    start = process_start_time(pid)
    token = str(start) if start is not None else "r" + uuid.uuid4().hex[:12]
    owner = f"{host}:{pid}:{token}"
    _owner_cache = (pid, owner)
    return owner


def parse_owner(owner: str) -> tuple[str, int, str] | None:
    """``(hostname, pid, token)`` of an owner string, or None if it is not one of ours.

    Anything after a third colon is ignored, so callers may suffix a tag.
    """
    parts = owner.split(":", 3)
    if len(parts) < 3:
        return None
    try:
        pid = int(parts[1])
    except ValueError:
        return None
    return parts[0], pid, parts[2]


def holder_is_dead(owner: str) -> bool:
    """True only when ``owner`` is provably a process of this host that no longer runs.

    False for other hosts, unparsable owners, and processes that are (or may be) alive.
    """
    parsed = parse_owner(owner)
    if parsed is None:
        return False
    host, pid, token = parsed
    if host != socket.gethostname().replace(":", "_") or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        pass  # exists, owned by another user
    except OSError:
        return False
    fields = _proc_stat_fields(pid)
    if fields is None:
        return False  # no /proc: the pid exists, so assume it is the holder
    if fields and fields[0] in ("Z", "X"):
        return True  # exited, not yet reaped
    if token.isdigit():
        try:
            return int(fields[19]) != int(token)  # pid recycled by a newer process
        except (IndexError, ValueError):
            return False
    return False


# --- shared by the backends ---------------------------------------------------------------


def check_takeover(run_id: str, holder: str, expires_at: float, owner: str, now: float) -> None:
    """Raise ``LeaseHeldError`` unless ``owner`` may take ``run_id`` from ``holder`` now."""
    if not holder or holder == owner or expires_at <= now or holder_is_dead(holder):
        return
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(expires_at))
    raise LeaseHeldError(
        f"run {run_id!r} is held by {holder}, whose lease expires at {when} "
        f"({expires_at - now:.1f}s from now); wait for it to finish or expire, "
        "or stop that process, then try again",
        run_id=run_id,
        holder=holder,
        expires_at=expires_at,
    )


def fenced(lease: Lease, current_epoch: int, holder: str) -> FencedError:
    """The error for a write under ``lease`` when the run is at ``current_epoch`` held by ``holder``."""
    if current_epoch == lease.epoch and not holder:
        message = (
            f"run {lease.run_id!r}: the lease of {lease.owner} (epoch {lease.epoch}) was released; "
            "acquire the run again before writing to it"
        )
    else:
        message = (
            f"run {lease.run_id!r} was taken over by {holder or 'another process (since released)'} "
            f"at epoch {current_epoch}; this process ({lease.owner}, epoch {lease.epoch}) must "
            "stop working on it"
        )
    return FencedError(
        message,
        run_id=lease.run_id,
        epoch=lease.epoch,
        current_epoch=current_epoch,
        holder=holder,
    )


def not_found(run_id: str) -> RunNotFoundError:
    return RunNotFoundError(
        f"no run {run_id!r} in the journal; `agentkeel runs` lists the runs it holds",
        run_id=run_id,
    )


def _json_default(value: Any) -> Any:
    if isinstance(value, Mapping):
        return dict(value)
    if isinstance(value, enum.Enum):
        return value.value
    raise TypeError(f"{type(value).__name__} is not JSON")


_encoder = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"), default=_json_default)
_encode: Callable[[Any], str] = _encoder.encode
if _c_make_encoder is not None:  # CPython: one reusable C encoder, ~4x faster than json.dumps
    # No markers dict: a cyclic value hits the recursion limit instead (caught below).
    _c_encoder = _c_make_encoder(
        None, _json_default, _c_encode_basestring, None, ":", ",", False, False, True
    )

    def _encode(value: Any) -> str:
        if isinstance(value, str):
            return _c_encode_basestring(value)  # type: ignore[no-any-return]
        return "".join(_c_encoder(value, 0))


def encode(value: Any, what: str) -> str:
    """``value`` as JSON text; ``JournalRecordError`` naming ``what`` when it is not JSON."""
    try:
        return _encode(value)
    except (TypeError, ValueError, RecursionError) as exc:
        raise JournalRecordError(
            f"cannot journal {what}: {exc}; tools and plans must use JSON values "
            "(dict, list, str, int, float, bool, None)"
        ) from exc


def encode_optional(value: Any, what: str) -> str | None:
    return None if value is None else encode(value, what)


def decode(text: str | None) -> Any:
    return None if text is None else json.loads(text)


def check_records(records: Sequence[StepRecord]) -> None:
    """Check each of ``records`` as ``intent``/``outcome`` would (``write_steps``)."""
    for record in records:
        if isinstance(record, StepRecord) and record.phase not in PHASES:
            raise JournalRecordError(f"step {record.step_id} ({record.kind}): phase must be one of {PHASES}, "
                                     f"got {record.phase!r}")
        check_record(record, record.phase if isinstance(record, StepRecord) else PHASES[0])


def check_record(record: StepRecord, phase: str) -> None:
    if not isinstance(record, StepRecord):
        raise JournalRecordError(f"expected a StepRecord, got {type(record).__name__}")
    if record.kind not in KINDS:
        raise JournalRecordError(f"step {record.step_id}: kind must be one of {KINDS}, got {record.kind!r}")
    if record.phase != phase:
        raise JournalRecordError(
            f"step {record.step_id} ({record.kind}): the {phase}() call needs a record with "
            f"phase={phase!r}, got {record.phase!r}"
        )


StepRow = tuple[Any, ...]
"""A step record as stored: ``STEP_COLUMNS`` in order, JSON values as text."""

STEP_COLUMNS = (
    "step_id",
    "kind",
    "phase",
    "tool_name",
    "args",
    "idempotency_key",
    "status",
    "result",
    "error",
    "duration_s",
    "cost_usd",
    "attempts",
    "verdict",
    "ts",
)


def encode_step(record: StepRecord, now: float) -> StepRow:
    """``record`` as a row; JSON fields encoded, numbers normalised, ``ts`` 0 stamped ``now``."""
    try:
        args = _encode(record.args)
        result = None if record.result is None else _encode(record.result)
        verdict = None if record.verdict is None else _encode(record.verdict)
    except (TypeError, ValueError, RecursionError):  # say which field (the messages cost: built only now)
        where = f"step {record.step_id} ({record.kind} {record.phase})"
        encode(record.args, f"the args of {where}")
        encode_optional(record.result, f"the result of {where}")
        encode_optional(record.verdict, f"the verdict of {where}")
        raise
    return (
        int(record.step_id),
        record.kind,
        record.phase,
        record.tool_name,
        args,
        record.idempotency_key,
        record.status,
        result,
        None if record.error is None else str(record.error),
        float(record.duration_s),
        float(record.cost_usd),
        int(record.attempts),
        verdict,
        float(record.ts) if record.ts else now,
    )


def decode_step(row: StepRow) -> StepRecord:
    (
        step_id,
        kind,
        phase,
        tool_name,
        args,
        key,
        status,
        result,
        error,
        duration_s,
        cost_usd,
        attempts,
        verdict,
        ts,
    ) = row
    return StepRecord(
        step_id=step_id,
        kind=kind,
        phase=phase,
        tool_name=tool_name,
        args=json.loads(args),
        idempotency_key=key,
        status=status,
        result=decode(result),
        error=error,
        duration_s=duration_s,
        cost_usd=cost_usd,
        attempts=attempts,
        verdict=decode(verdict),
        ts=ts,
    )


# --- checks and errors of plan revisions and approvals, shared by the backends ---------------


def check_revision(run_id: str, plan: dict[str, Any], reason: str, planning_cost_usd: float) -> tuple[str, str, float]:
    """``(plan as JSON, reason, cost)`` for ``revise_plan``; ``JournalRecordError`` naming what is wrong."""
    reason = getattr(reason, "value", reason)
    if not isinstance(reason, str) or reason not in REVISION_REASONS:
        raise JournalRecordError(
            f"run {run_id!r}: a plan revision's reason must be one of {', '.join(REVISION_REASONS)}, "
            f"got {reason!r} (revision 1, 'initial', is written by create_run)"
        )
    cost = _finite(planning_cost_usd)
    if cost is None or cost < 0:
        raise JournalRecordError(
            f"run {run_id!r}: a plan revision's planning_cost_usd must be a finite number >= 0, "
            f"got {planning_cost_usd!r}"
        )
    return encode(plan, f"the revised plan of run {run_id!r}"), reason, cost


def check_approval_request(lease: Lease, step_id: int, args: Mapping[str, Any], ttl_s: float) -> tuple[str, float]:
    """``(args as JSON, ttl)`` for ``request_approval``; ``JournalRecordError`` naming what is wrong."""
    ttl = _finite(ttl_s)
    if ttl is None or ttl <= 0:
        raise JournalRecordError(
            f"run {lease.run_id!r}, step {step_id}: an approval's ttl_s must be a finite number of "
            f"seconds > 0, got {ttl_s!r}"
        )
    return encode(args, f"the args of the approval of step {step_id}"), ttl


def check_decider(run_id: str, step_id: int, by: str) -> str:
    if not isinstance(by, str) or not by.strip():
        raise ApprovalError(
            f"run {run_id!r}, step {step_id}: say who decides the approval (by= must be non-empty "
            f"text, got {by!r})"
        )
    return by


def check_listed_status(status: str | None) -> str | None:
    status = getattr(status, "value", status)
    if status is not None and status not in APPROVAL_STATUSES:
        raise ValueError(
            f"approval status must be one of {', '.join(APPROVAL_STATUSES)} (or None for all), got {status!r}"
        )
    return status


def no_approval(run_id: str, step_id: int) -> ApprovalError:
    return ApprovalError(
        f"no approval is recorded for step {step_id} of run {run_id!r}; nothing to decide "
        "(list_approvals() lists the pending ones)"
    )


def approval_refusal(record: ApprovalRecord, now: float) -> ApprovalError:
    """Why ``record`` (not pending, or past its expiry at ``now``) cannot be decided."""
    where = f"the approval of step {record.step_id} of run {record.run_id!r}"
    if record.status_at(now) == "expired":
        return ApprovalError(
            f"{where} expired at {_when(record.expires_at)} without a decision (it counts as a denial); "
            "it can no longer be approved"
        )
    because = f" ({record.reason})" if record.reason else ""
    return ApprovalError(
        f"{where} was already {record.status} by {record.decided_by} at {_when(record.decided_at)}"
        f"{because}; a decision cannot be changed"
    )


def _finite(value: Any) -> float | None:
    if isinstance(value, bool):
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def _when(ts: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts))


def approval_from_row(row: tuple[Any, ...]) -> ApprovalRecord:
    """An approval from a SQL row (the SQL backends select the same columns in the same order)."""
    run_id, step_id, tool_name, args, requested_by, requested_at, expires_at, status, by, at, reason = row
    return ApprovalRecord(
        run_id=run_id,
        step_id=step_id,
        tool_name=tool_name,
        args=decode(args),
        requested_by=requested_by,
        requested_at=requested_at,
        expires_at=expires_at,
        status=status,
        decided_by=by,
        decided_at=at,
        reason=reason,
    )


def run_from_row(row: tuple[Any, ...]) -> RunRecord:
    """A run from a SQL row (``_SELECT_RUNS``'s columns, the same in every SQL backend)."""
    (
        run_id,
        user_id,
        session_id,
        message,
        principal,
        budget_usd,
        plan,
        status,
        detail,
        created_at,
        updated_at,
        owner,
        epoch,
        lease_expires_at,
        planning_cost_usd,
        then_status,
        answer,
        context,
    ) = row
    return RunRecord(
        run_id=run_id,
        user_id=user_id,
        session_id=session_id,
        message=message,
        principal=principal,
        budget_usd=budget_usd,
        plan=decode(plan),
        status=status,
        detail=detail,
        created_at=created_at,
        updated_at=updated_at,
        owner=owner,
        epoch=epoch,
        lease_expires_at=lease_expires_at,
        planning_cost_usd=planning_cost_usd,
        then_status=then_status,
        answer=answer,
        context=decode(context) if context else None,
    )
