"""agentkeel: run AI agents in production through pluggable, audited components."""

from typing import TYPE_CHECKING, Any

from agentkeel.errors import (
    AgentkeelError,
    ApprovalError,
    AuditLogError,
    BudgetExceededError,
    CircuitOpenError,
    ConfigError,
    FencedError,
    JournalRecordError,
    LeaseHeldError,
    PermissionDeniedError,
    PlanningError,
    PlanRejectedError,
    PluginError,
    RateLimitedError,
    RunExistsError,
    RunNotFoundError,
    SandboxError,
    StoreError,
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
    Answer,
    AuditRecord,
    CostRecord,
    Decision,
    Event,
    MemoryContext,
    ModelPrice,
    Plan,
    PlanRevision,
    PlanStep,
    Principal,
    Progress,
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
    from agentkeel.context import RunContext
    from agentkeel.journal.base import ApprovalRecord, Journal
    from agentkeel.planner.plan import PlanTemplate, parse_plan
    from agentkeel.runtime.system import AgentSystem
    from agentkeel.sandbox.protocol import SandboxBackend, ToolCall

# Imported on first use: a tool running in a sandbox child process needs only
# ``tool`` and the types, not the configuration and JSON Schema machinery.
_LAZY = {
    "AgentSystem": "agentkeel.runtime.system",
    "Config": "agentkeel.config",
    "ApprovalRecord": "agentkeel.journal.base",
    "Journal": "agentkeel.journal.base",
    "ModelTier": "agentkeel.config",
    "PlanTemplate": "agentkeel.planner.plan",
    "RunContext": "agentkeel.context",
    "SandboxBackend": "agentkeel.sandbox.protocol",
    "ToolCall": "agentkeel.sandbox.protocol",
    "parse_plan": "agentkeel.planner.plan",
}


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
    "AgentSystem",
    "AgentkeelError",
    "Answer",
    "ApprovalError",
    "ApprovalRecord",
    "AuditLogError",
    "AuditRecord",
    "BudgetExceededError",
    "CircuitOpenError",
    "Config",
    "ConfigError",
    "CostRecord",
    "Decision",
    "Event",
    "FencedError",
    "Journal",
    "JournalRecordError",
    "LeaseHeldError",
    "MemoryContext",
    "ModelPrice",
    "ModelTier",
    "PermissionDeniedError",
    "Plan",
    "PlanRejectedError",
    "PlanRevision",
    "PlanStep",
    "PlanTemplate",
    "PlanningError",
    "PluginError",
    "Principal",
    "Progress",
    "RateLimitedError",
    "RecoveryDecision",
    "RunContext",
    "RunExistsError",
    "RunNotFoundError",
    "RunStatus",
    "SandboxBackend",
    "SandboxError",
    "StepResult",
    "StepStatus",
    "StoreError",
    "ToolCall",
    "ToolError",
    "ToolSpec",
    "ToolSpecError",
    "ToolTimeoutError",
    "UnknownModelPriceError",
    "Usage",
    "Verdict",
    "hookimpl",
    "hookspec",
    "parse_plan",
    "tool",
]
