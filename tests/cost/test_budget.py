"""Budgets, reservations and prices (the cost controller)."""

from __future__ import annotations

import math

import pytest
from agentkeel import AgentRequest, BudgetExceededError, Config, ModelPrice, Principal, UnknownModelPriceError, Usage
from agentkeel.context import RunContext
from agentkeel.cost.budget import Budget, Pricer, prompt_token_upper_bound


def test_reservations_hold_money_until_settled_or_released() -> None:
    budget = Budget(1.0)
    first = budget.reserve(0.6, "a call to m")
    assert budget.remaining_usd == pytest.approx(0.4)
    with pytest.raises(BudgetExceededError, match=r"a call to m needs up to \$0\.500000"):
        budget.reserve(0.5, "a call to m")
    first.settle(0.1)
    assert budget.spent_usd == pytest.approx(0.1) and budget.reserved_usd == pytest.approx(0.0)
    second = budget.reserve(0.9, "tool t")
    second.release()
    assert budget.spent_usd == pytest.approx(0.1) and budget.remaining_usd == pytest.approx(0.9)
    with pytest.raises(RuntimeError, match="already settled"):
        second.settle(0.1)


@pytest.mark.parametrize("limit", [-0.01, math.nan, math.inf])
def test_a_budget_must_be_finite_and_not_negative(limit: float) -> None:
    with pytest.raises(ValueError, match="finite amount"):
        Budget(limit)


def test_the_pricer_asks_the_lookup_once_per_model_and_never_prices_unknown_models_free() -> None:
    asked: list[str] = []
    config = Config.from_dict({}, "<t>")

    def lookup(model: str, cfg: Config) -> ModelPrice | None:
        assert cfg is config
        asked.append(model)
        return ModelPrice(2.0, 8.0) if model == "known" else None

    pricer = Pricer(lookup, config)
    assert pricer.cost("known", Usage(1_000_000, 500_000)) == pytest.approx(6.0)
    assert pricer.worst_case("known", 10, 20) == pytest.approx((10 * 2.0 + 20 * 8.0) / 1e6)
    with pytest.raises(UnknownModelPriceError, match="'unknown'"):
        pricer.price("unknown")
    with pytest.raises(UnknownModelPriceError):
        pricer.price("unknown")  # an unknown price is not cached as anything
    assert asked == ["known", "unknown", "unknown"]


def test_the_prompt_bound_counts_every_byte() -> None:
    messages = [{"role": "user", "content": "héllo"}]  # 6 bytes in UTF-8
    assert prompt_token_upper_bound(messages) == 3 + 6 + 8


def test_the_run_context_reserves_and_settles_llm_calls_with_estimates_marked() -> None:
    config = Config.from_dict({}, "<t>")
    run = RunContext(AgentRequest(message="m", user_id="u"), Principal("u"), config, Budget(1.0),
                     Pricer(lambda model, cfg: ModelPrice(1.0, 1.0), config))
    reservation = run.reserve_llm("m", [{"role": "user", "content": "hi"}], max_tokens=100)
    assert reservation.amount == pytest.approx((3 + 2 + 8 + 100) / 1e6)
    exact = run.settle_llm(reservation, model="m", tier="fast", usage=Usage(10, 5))
    guessed = run.settle_llm(run.reserve_llm("m", [], 50), model="m", tier="fast", usage=Usage(3, 50),
                             estimated=True)
    assert run.costs == [exact, guessed]
    assert (exact.estimated, guessed.estimated) == (False, True)
    assert run.budget.spent_usd == pytest.approx((15 + 53) / 1e6) and run.budget.reserved_usd == pytest.approx(0)
    assert run.run_id == run.request.run_id and run.tools == {}
