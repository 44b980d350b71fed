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
    """A tool call failed. `retryable` says whether the failure is transient."""

    def __init__(self, message: str, *, retryable: bool = True) -> None:
        self.retryable = retryable
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
