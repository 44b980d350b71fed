"""Budgets, reservations and prices (the cost controller)."""

from __future__ import annotations

import math

import pytest
from agentkeel import (
    AgentRequest,
    BudgetExceededError,
    Config,
    ConfigError,
    ModelPrice,
    Principal,
    UnknownModelPriceError,
    Usage,
)
from agentkeel.context import RunContext
from agentkeel.cost.budget import Budget, Pricer, bounded_usage, prompt_token_upper_bound


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


# --- amounts that are not money ------------------------------------------------------

NOT_MONEY = [math.nan, math.inf, -math.inf, -0.01, -7.4, True, "0.1", None, 10**400]


@pytest.mark.parametrize("amount", NOT_MONEY)
def test_a_reservation_must_be_a_finite_amount_not_negative(amount: object) -> None:
    budget = Budget(1.0)
    with pytest.raises(ValueError, match=r"the reservation for a call to m must be a finite amount of USD >= 0"):
        budget.reserve(amount, "a call to m")  # type: ignore[arg-type]
    assert (budget.spent_usd, budget.reserved_usd) == (0.0, 0.0)


@pytest.mark.parametrize("amount", NOT_MONEY)
def test_a_settlement_must_be_a_finite_amount_not_negative_and_leaves_the_money_held(amount: object) -> None:
    budget = Budget(1.0)
    reservation = budget.reserve(0.5, "a call to m")
    with pytest.raises(ValueError, match=r"the settled cost of a call to m must be a finite amount of USD >= 0"):
        reservation.settle(amount)  # type: ignore[arg-type]
    assert budget.reserved_usd == pytest.approx(0.5) and budget.spent_usd == 0.0
    reservation.settle(0.2)  # still open: it can be settled properly
    assert budget.spent_usd == pytest.approx(0.2) and budget.reserved_usd == pytest.approx(0.0)


def test_a_negative_cost_cannot_buy_more_budget() -> None:
    """The report: -50M prompt tokens recorded -$7.40 and let ten priced steps run where one fit."""
    budget = Budget(1.0)
    reservation = budget.reserve(0.9, "a call to m")
    with pytest.raises(ValueError):
        reservation.settle(-7.40)
    reservation.settle(0.9)
    with pytest.raises(BudgetExceededError):
        budget.reserve(0.9, "tool t")


@pytest.mark.parametrize("amount", NOT_MONEY)
def test_money_spent_elsewhere_must_be_a_finite_amount_not_negative(amount: object) -> None:
    budget = Budget(1.0)
    with pytest.raises(ValueError, match="money already spent must be a finite amount of USD >= 0"):
        budget.record_spent(amount)  # type: ignore[arg-type]
    assert budget.spent_usd == 0.0


def test_a_settlement_above_its_reservation_is_counted_with_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    budget = Budget(1.0)
    with caplog.at_level("WARNING", logger="agentkeel.cost.budget"):
        budget.reserve(0.1, "a call to m").settle(0.1)  # exactly the reservation: no warning
        assert caplog.text == ""
        budget.reserve(0.1, "a call to m").settle(0.3)
    assert budget.spent_usd == pytest.approx(0.4)
    assert "a call to m cost $0.300000, more than the $0.100000 reserved" in caplog.text


@pytest.mark.parametrize("bad", [math.nan, math.inf, -1.0])
@pytest.mark.parametrize("field", ["input_per_mtok", "output_per_mtok"])
def test_an_invalid_price_from_a_plugin_is_refused_naming_the_field(bad: float, field: str) -> None:
    config = Config.from_dict({}, "<t>")
    prices = {"input_per_mtok": 1.0, "output_per_mtok": 1.0, field: bad}
    pricer = Pricer(lambda model, cfg: ModelPrice(**prices), config)
    with pytest.raises(UnknownModelPriceError, match=rf"model 'm' is invalid: {field} is {bad!r}, not a finite"):
        pricer.worst_case("m", 10, 10)
    with pytest.raises(UnknownModelPriceError):
        pricer.price("m")  # not cached as anything


@pytest.mark.parametrize("bad", [math.nan, math.inf, -1.0, True, "1.0"])
def test_prices_in_the_config_are_checked_when_it_loads(bad: object) -> None:
    """A regression guard: ``Config.from_dict`` already refused these before the hardening."""
    with pytest.raises(ConfigError, match=r'prices\.m\.input_per_mtok'):
        Config.from_dict({"prices": {"m": {"input_per_mtok": bad, "output_per_mtok": 1.0}}}, "<t>")


# --- usage a server reports ------------------------------------------------------------


def test_usage_within_its_bounds_is_kept() -> None:
    assert bounded_usage(0, 0, prompt_bound=100, max_tokens=50) == (Usage(0, 0), [])
    assert bounded_usage(100, 50, prompt_bound=100, max_tokens=50) == (Usage(100, 50), [])


@pytest.mark.parametrize(
    ("prompt", "output", "billed", "problem"),
    [
        (-50_000_000, 10, Usage(100, 10), "prompt_tokens -50000000 is negative"),
        (10, -1, Usage(10, 50), "completion_tokens -1 is negative"),
        (5_000_000, 10, Usage(100, 10), "prompt_tokens 5000000 is more than the request can have used (100)"),
        (10, 5_000_000, Usage(10, 50), "completion_tokens 5000000 is more than max_tokens (50)"),
        (1.5, 10, Usage(100, 10), "prompt_tokens 1.5 is not a whole number of tokens"),
        (math.nan, 10, Usage(100, 10), "prompt_tokens nan is not a whole number of tokens"),
        ("12", 10, Usage(100, 10), "prompt_tokens '12' is not a whole number of tokens"),
        (None, 10, Usage(100, 10), "prompt_tokens None is not a whole number of tokens"),
        (10, True, Usage(10, 50), "completion_tokens True is not a whole number of tokens"),
        pytest.param(10**400, 10, Usage(100, 10), "prompt_tokens an integer of 401 digits is more than",
                     id="an-integer-of-401-digits"),
        ("x" * 1000, 10, Usage(100, 10), "prompt_tokens '" + "x" * 36 + "... is not a whole number"),
    ],
)
def test_unusable_usage_is_billed_at_its_bound(prompt: object, output: object, billed: Usage, problem: str) -> None:
    usage, problems = bounded_usage(prompt, output, prompt_bound=100, max_tokens=50)
    assert usage == billed
    [found] = problems
    assert found.startswith(problem)


def test_the_run_context_refuses_to_settle_at_a_nan_price() -> None:
    config = Config.from_dict({}, "<t>")
    run = RunContext(AgentRequest(message="m", user_id="u"), Principal("u"), config, Budget(1.0),
                     Pricer(lambda model, cfg: ModelPrice(math.nan, 1.0), config))
    with pytest.raises(UnknownModelPriceError, match="input_per_mtok is nan"):
        run.reserve_llm("m", [{"role": "user", "content": "hi"}], max_tokens=100)
    assert run.budget.reserved_usd == 0.0 and run.costs == []
