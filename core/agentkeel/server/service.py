"""What every route shares: the caller (an API key's principal), the ``Service`` (the system,
the run manager, the key store, the metrics) and the problem documents the routes answer with.

``Service.authenticate`` turns ``Authorization: Bearer KEY`` into a ``Caller``: an unknown,
malformed, revoked or expired key is a 401 and an audit record naming the key id (never
the secret); a key with its own rate limit is refused with 429 beyond it.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Annotated, Any

import attrs
from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel

from agentkeel.errors import RateLimitedError, RunNotFoundError
from agentkeel.journal.base import RunRecord
from agentkeel.memory.store import MemoryStore
from agentkeel.permissions.approvals import APPROVE_PERMISSION
from agentkeel.permissions.keys import ApiKey, KeyStore, parse_secret
from agentkeel.runtime.system import AgentSystem
from agentkeel.server.fanout import RedisFanout
from agentkeel.server.manager import LiveRun, Overloaded, RunBusy, RunManager
from agentkeel.server.metrics import Metrics
from agentkeel.server.problems import PROBLEM_TYPE, Problem
from agentkeel.server.settings import ServerSettings
from agentkeel.tools.ratelimit import TokenBucket
from agentkeel.types import Principal

ADMIN_PERMISSION = "admin"
"""A principal holding it sees and controls every principal's runs, sessions, approvals and costs."""



class ProblemBody(BaseModel):
    """An error (RFC 9457)."""

    type: str = "about:blank"
    title: str
    status: int
    detail: str
    instance: str | None = None
    errors: list[dict[str, str]] | None = None


def _problem_response(description: str) -> dict[str, Any]:
    return {"description": description,
            "content": {PROBLEM_TYPE: {"schema": {"$ref": "#/components/schemas/ProblemBody"}}}}


ERRORS: dict[int | str, dict[str, Any]] = {
    400: _problem_response("The body is not valid JSON"),
    401: _problem_response("No API key, or an unknown, revoked or expired one"),
    403: _problem_response("The caller may not do this"),
    404: _problem_response("No such resource visible to the caller"),
    409: _problem_response("The resource is not in a state that allows this"),
    413: _problem_response("The request body is too large"),
    422: _problem_response("A field is invalid (each is named in `errors`)"),
    429: _problem_response("Too many requests: try again after `Retry-After` seconds"),
    503: _problem_response("The server is shutting down or a store is unreachable"),
}



# --- the caller ------------------------------------------------------------------


@attrs.frozen
class Caller:
    """Who is calling: the API key's principal."""

    principal: Principal
    key: ApiKey

    @property
    def name(self) -> str:
        return self.principal.name

    @property
    def admin(self) -> bool:
        return ADMIN_PERMISSION in self.principal.permissions

    @property
    def approver(self) -> bool:
        return APPROVE_PERMISSION in self.principal.permissions or self.admin

    def sees(self, owner: str) -> bool:
        return self.admin or owner == self.name


bearer = HTTPBearer(auto_error=False, description="An API key from `agentkeel keys create`")


@attrs.define
class Service:
    """What the routes share: the system, the run manager, the key store, the metrics."""

    system: AgentSystem
    keys: KeyStore
    settings: ServerSettings
    manager: RunManager
    metrics: Metrics
    limits: dict[str, TokenBucket] = attrs.field(factory=dict)
    fanout: RedisFanout | None = None
    """Run events shared by the replicas (``[shared] redis_url``)."""
    memory: Any = None

    def memory_store(self) -> MemoryStore:
        """The memory store (opened on first use, closed with the app)."""
        if self.memory is None:
            from agentkeel.memory.assemble import MemorySettings
            from agentkeel.memory.sqlite import open_store

            config = self.system.config
            self.memory = open_store(config, MemorySettings.from_config(config))
        store: MemoryStore = self.memory
        return store

    def close_memory(self) -> None:
        if self.memory is not None:
            self.memory.close()
            self.memory = None

    def authenticate(self, request: Request, credentials: HTTPAuthorizationCredentials | None) -> Caller:
        if credentials is None:
            self._refuse("", "no API key")
        assert credentials is not None
        result = self.keys.authenticate(credentials.credentials)
        if result.key is None:
            parsed = parse_secret(credentials.credentials)  # the audit names a key id, never a secret
            self._refuse(f"key {parsed[0]}" if parsed else "", result.reason)
        key = result.key
        assert key is not None
        principal = self.system.plugins.resolve_principal(key.principal, self.system.config)
        if principal is None:
            self._refuse(key.key_id, f"the key's principal {key.principal!r} is not configured any more")
        assert principal is not None
        if key.rate_limit is not None and self.system.shared_rate_limits is None:
            bucket = self.limits.get(key.key_id)
            if bucket is None:
                bucket = self.limits[key.key_id] = TokenBucket(key.rate_limit, max(1.0, key.rate_limit),
                                                               name=f"key {key.key_id}")
            if not bucket.try_acquire():
                raise Problem(429, f"API key {key.key_id} is limited to {key.rate_limit:g} requests per second",
                              headers={"Retry-After": str(max(1, math.ceil(1 / key.rate_limit)))})
        return Caller(principal, key)

    async def shared_limit(self, caller: Caller) -> None:
        """A key's own rate limit, counted across every replica when they share a Redis."""
        shared = self.system.shared_rate_limits
        rate = caller.key.rate_limit
        if shared is None or rate is None:
            return
        try:
            await shared.acquire_key(f"key:{caller.key.key_id}", rate, 0.0, what=f"API key {caller.key.key_id}")
        except RateLimitedError as exc:
            raise Problem(429, str(exc), headers={"Retry-After": str(max(1, math.ceil(exc.retry_after_s or 1)))}
                          ) from exc

    def _refuse(self, key_hint: str, reason: str) -> None:
        self.metrics.auth_failures.labels(reason).inc()
        self.system.audit.record(run_id="", principal="", action="authenticate", tool="", decision="deny",
                                 reason=f"API key refused: {reason}" + (f" ({key_hint})" if key_hint else ""),
                                 arg_keys=())
        self.system.stores.flush()
        raise Problem(401, f"authentication failed: {reason}; send Authorization: Bearer KEY with a key from "
                           "`agentkeel keys create`", headers={"WWW-Authenticate": "Bearer"})

    # --- runs ---------------------------------------------------------------------

    def record(self, caller: Caller, run_id: str) -> RunRecord:
        """The journaled run if the caller may see it; 404 otherwise (unknown and foreign alike)."""
        try:
            record = self.system.journal.load(run_id).run
        except RunNotFoundError:
            record = None
        if record is None or not caller.sees(record.user_id):
            raise Problem(404, f"no run {run_id}")
        return record

    def live(self, caller: Caller, run_id: str) -> LiveRun | None:
        live = self.manager.get(run_id)
        if live is None:
            return None
        if not caller.sees(live.principal):
            raise Problem(404, f"no run {run_id}")
        return live

    def admit(self, submit: Callable[[], LiveRun]) -> LiveRun:
        try:
            return submit()
        except Overloaded as exc:
            self.metrics.rejected.inc()
            raise Problem(503 if self.manager.draining else 429, str(exc),
                          headers={"Retry-After": str(exc.retry_after_s)}) from exc
        except RunBusy as exc:
            raise Problem(409, str(exc)) from exc


def service_of(request: Request) -> Service:
    service: Service = request.app.state.service
    return service


async def authenticated(
    request: Request,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)],
) -> Caller:
    service = service_of(request)
    caller = service.authenticate(request, credentials)
    await service.shared_limit(caller)
    return caller


ServiceDep = Annotated[Service, Depends(service_of)]
CallerDep = Annotated[Caller, Depends(authenticated)]
