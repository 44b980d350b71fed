"""agentkeel: run AI agents in production through pluggable, audited components."""

from typing import TYPE_CHECKING, Any

from agentkeel.errors import (
    AgentkeelError,
    BudgetExceededError,
    CircuitOpenError,
    ConfigError,
    PermissionDeniedError,
    PlanningError,
    PlanRejectedError,
    PluginError,
    RateLimitedError,
    SandboxError,
    ToolError,
    ToolSpecError,
    ToolTimeoutError,
    UnknownModelPriceError,
)
from agentkeel.markers import hookimpl, hookspec
from agentkeel.tools.decorator import tool
from agentkeel.types import (
    AgentRequest,
    AgentResponse,
    AuditRecord,
    CostRecord,
    Decision,
    Event,
    MemoryContext,
    ModelPrice,
    Plan,
    PlanStep,
    Principal,
    RecoveryDecision,
    RunStatus,
    StepResult,
    StepStatus,
    ToolSpec,
    Usage,
    Verdict,
)

if TYPE_CHECKING:
    from agentkeel.config import Config, ModelTier
    from agentkeel.planner.plan import PlanTemplate

# Imported on first use: a tool running in a sandbox child process needs only
# ``tool`` and the types, not the configuration and JSON Schema machinery.
_LAZY = {"Config": "agentkeel.config", "ModelTier": "agentkeel.config", "PlanTemplate": "agentkeel.planner.plan"}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'agentkeel' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


__all__ = [
    "AgentRequest",
    "AgentResponse",
    "AgentkeelError",
    "AuditRecord",
    "BudgetExceededError",
    "CircuitOpenError",
    "Config",
    "ConfigError",
    "CostRecord",
    "Decision",
    "Event",
    "MemoryContext",
    "ModelPrice",
    "ModelTier",
    "PermissionDeniedError",
    "Plan",
    "PlanRejectedError",
    "PlanStep",
    "PlanTemplate",
    "PlanningError",
    "PluginError",
    "Principal",
    "RateLimitedError",
    "RecoveryDecision",
    "RunStatus",
    "SandboxError",
    "StepResult",
    "StepStatus",
    "ToolError",
    "ToolSpec",
    "ToolSpecError",
    "ToolTimeoutError",
    "UnknownModelPriceError",
    "Usage",
    "Verdict",
    "hookimpl",
    "hookspec",
    "tool",
]
