"""The per-run context handed to planners and recovery hooks."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

import attrs

from agentkeel.cost.budget import Budget, Pricer, Reservation, prompt_token_upper_bound
from agentkeel.types import AgentRequest, CostRecord, Principal, Usage

if TYPE_CHECKING:
    from agentkeel.config import Config
    from agentkeel.runtime.system import AgentSystem


@attrs.define(eq=False)
class RunContext:
    """What a hook needs to know about the run it serves, and the budget it spends from."""

    request: AgentRequest
    principal: Principal
    config: Config
    budget: Budget
    pricer: Pricer
    system: AgentSystem | None = None
    costs: list[CostRecord] = attrs.field(factory=list)

    @property
    def run_id(self) -> str:
        return self.request.run_id

    def reserve_llm(self, model: str, messages: Iterable[Mapping[str, Any]], max_tokens: int) -> Reservation:
        """Reserve the worst-case cost of one chat completion before making it."""
        worst = self.pricer.worst_case(model, prompt_token_upper_bound(messages), max_tokens)
        return self.budget.reserve(worst, f"a call to {model}")

    def settle_llm(self, reservation: Reservation, *, model: str, tier: str | None, usage: Usage) -> CostRecord:
        """Settle a reservation to the real usage and record the cost."""
        cost = self.pricer.cost(model, usage)
        reservation.settle(cost)
        record = CostRecord(kind="llm", cost_usd=cost, model=model, tier=tier, usage=usage)
        self.costs.append(record)
        return record
