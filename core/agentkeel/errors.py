"""Every exception agentkeel raises. Each one says what went wrong and what to do next."""

from __future__ import annotations

from collections.abc import Sequence


class AgentkeelError(Exception):
    """Base class of all agentkeel errors."""


class ConfigError(AgentkeelError):
    """The configuration file (or an override) is invalid. The message names the field."""


class PluginError(AgentkeelError):
    """A plugin failed to load, misspelled a hook or registered something invalid."""

    def __init__(self, plugin: str, message: str) -> None:
        self.plugin = plugin
        super().__init__(f"plugin {plugin!r}: {message}")


class ToolSpecError(PluginError):
    """A tool declaration is invalid (bad schema, duplicate name, unknown rollback target...)."""


class PlanningError(AgentkeelError):
    """No planner produced a plan (no template matched and the LLM planner was unavailable)."""


class PlanRejectedError(AgentkeelError):
    """The plan failed the pre-execution check; nothing ran. `reasons` lists every problem."""

    def __init__(self, reasons: Sequence[str]) -> None:
        self.reasons = tuple(reasons)
        super().__init__("plan rejected: " + "; ".join(self.reasons))


class PermissionDeniedError(AgentkeelError):
    """The principal is unknown or may not call this tool with these arguments."""


class BudgetExceededError(AgentkeelError):
    """Reserving the worst-case cost of the next priced call would exceed the budget."""


class UnknownModelPriceError(AgentkeelError):
    """No price is known for a model. Add one under [prices."MODEL"] in agentkeel.toml."""


class ToolError(AgentkeelError):
    """A tool call failed. ``retryable`` says whether the failure is transient,
    ``retry_after_s`` (when known) how soon trying again could succeed, and
    ``stderr_tail`` what the tool's process last wrote to stderr (out-of-process
    sandboxes)."""

    def __init__(
        self, message: str, *, retryable: bool = True, retry_after_s: float | None = None, stderr_tail: str = ""
    ) -> None:
        self.retryable = retryable
        self.retry_after_s = retry_after_s
        self.stderr_tail = stderr_tail
        super().__init__(message)


class ToolTimeoutError(ToolError):
    """A tool call ran past its timeout and was stopped."""


class CircuitOpenError(ToolError):
    """The tool's circuit breaker is open: recent calls failed, calls are refused for a while."""


class RateLimitedError(ToolError):
    """The tool's rate limit refused the call."""


class SandboxError(AgentkeelError):
    """A sandbox backend could not run a call (missing image, daemon down, bad output)."""


class StoreError(AgentkeelError):
    """The SQLite store cannot be used (a newer schema than this version knows, a failed migration)."""


class AuditLogError(AgentkeelError):
    """The audit log cannot be appended to (closed, damaged last line, short write)."""


class LeaseHeldError(AgentkeelError):
    """Another live process holds the run's lease; the message names it and when its lease expires."""

    def __init__(
        self, message: str, *, run_id: str = "", holder: str = "", expires_at: float = 0.0
    ) -> None:
        self.run_id = run_id
        self.holder = holder
        self.expires_at = expires_at
        super().__init__(message)


class FencedError(AgentkeelError):
    """This process's lease on a run was taken over (or released); its writes are refused."""

    def __init__(
        self,
        message: str,
        *,
        run_id: str = "",
        epoch: int = 0,
        current_epoch: int = 0,
        holder: str = "",
    ) -> None:
        self.run_id = run_id
        self.epoch = epoch
        self.current_epoch = current_epoch
        self.holder = holder
        super().__init__(message)


class RunNotFoundError(AgentkeelError):
    """No run with this id is in the journal."""

    def __init__(self, message: str, *, run_id: str = "") -> None:
        self.run_id = run_id
        super().__init__(message)


class RunExistsError(AgentkeelError):
    """``create_run`` was given a run id the journal already holds."""

    def __init__(self, message: str, *, run_id: str = "") -> None:
        self.run_id = run_id
        super().__init__(message)


class JournalRecordError(AgentkeelError):
    """A record cannot be journaled: a value is not JSON, or the phase/kind is wrong for the call."""


class ApprovalError(AgentkeelError):
    """An approval cannot be decided: none is pending, it expired, or the approver may not decide it."""
