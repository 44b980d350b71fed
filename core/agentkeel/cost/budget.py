"""Cost controller: prices, worst-case reservations and settlement.

Before every priced call the worst case (an upper bound on prompt tokens plus
``max_tokens``, at the model's real price) is reserved; after the call the
reservation is settled to the real usage. A reservation that would take the
budget past its limit is refused before the call is made.

Amounts are checked where they enter: a reservation, a settlement or money
spent elsewhere must be a finite number of USD >= 0 (``ValueError`` naming the
amount otherwise: a NaN would pass every ``>`` comparison, and a negative cost
would add money to the budget). A settlement above its reservation is counted
(it is what was spent) but logged as a warning. Usage reported by a server is
bounded by ``bounded_usage`` before it is priced.
"""

from __future__ import annotations

import logging
import math
import numbers
import threading
from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any

from agentkeel.errors import BudgetExceededError, UnknownModelPriceError
from agentkeel.types import ModelPrice, Usage

if TYPE_CHECKING:
    from agentkeel.config import Config

PriceLookup = Callable[[str, "Config"], "ModelPrice | None"]

# Each chat message costs a few tokens of framing on top of its content.
MESSAGE_OVERHEAD_TOKENS = 8

log = logging.getLogger(__name__)


def _usd(amount: object, what: str) -> float:
    """``amount`` as a float, or ValueError naming ``what`` unless it is a finite number >= 0."""
    if isinstance(amount, bool) or not isinstance(amount, numbers.Real):
        raise ValueError(f"{what} must be a finite amount of USD >= 0, got {_shown(amount)}")
    try:
        value = float(amount)
    except OverflowError:  # an int too large for a float
        value = math.inf
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{what} must be a finite amount of USD >= 0, got {_shown(amount)}")
    return value


def prompt_token_upper_bound(messages: Iterable[Mapping[str, Any]]) -> int:
    """An upper bound on prompt tokens: byte-level BPE never emits more tokens than bytes."""
    total = 3
    for message in messages:
        content = message.get("content") or ""
        total += len(str(content).encode()) + MESSAGE_OVERHEAD_TOKENS
    return total


def bounded_usage(
    prompt_tokens: object, output_tokens: object, *, prompt_bound: int, max_tokens: int
) -> tuple[Usage, list[str]]:
    """The usage to bill for one reported by a server, and what was wrong with the report.

    Each count must be an integer >= 0 and at most its bound: ``prompt_bound``
    (``prompt_token_upper_bound`` of what was sent, the bound the reservation was
    made with) and ``max_tokens`` (what was asked for). A count that is not (a
    negative, a float, a string, missing, or more than could have been used) is
    replaced by its bound, so the bill is never negative and never above the
    reservation; the caller should log the problems and mark the cost ``estimated``.
    """
    problems: list[str] = []

    def bounded(value: object, bound: int, name: str, why_bound: str) -> int:
        shown = _shown(value)
        if isinstance(value, bool) or not isinstance(value, int):
            problems.append(f"{name} {shown} is not a whole number of tokens")
        elif value < 0:
            problems.append(f"{name} {shown} is negative")
        elif value > bound:
            problems.append(f"{name} {shown} is more than {why_bound} ({bound})")
        else:
            return value
        return bound

    prompt = bounded(prompt_tokens, prompt_bound, "prompt_tokens", "the request can have used")
    output = bounded(output_tokens, max_tokens, "completion_tokens", "max_tokens")
    return Usage(input_tokens=prompt, output_tokens=output), problems


def _shown(value: object, limit: int = 40) -> str:
    """``repr(value)``, cut short: a server chooses it, and it goes into the log."""
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) >= 10**limit:
        return f"{'-' if value < 0 else ''}an integer of {len(str(abs(value)))} digits"
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


class Reservation:
    """Money held for one call. Settle it with the real cost, or release it."""

    __slots__ = ("_budget", "_open", "amount", "label")

    def __init__(self, budget: Budget, amount: float, label: str) -> None:
        self._budget = budget
        self.amount = amount
        self.label = label
        self._open = True

    def settle(self, actual_usd: float) -> None:
        self._budget._settle(self, actual_usd)

    def release(self) -> None:
        self._budget._settle(self, 0.0)


class Budget:
    """A spending limit in USD. Thread-safe: concurrent reservations cannot overspend."""

    def __init__(self, limit_usd: float) -> None:
        if not math.isfinite(limit_usd) or limit_usd < 0:
            raise ValueError(f"a budget must be a finite amount of USD >= 0, got {limit_usd!r}")
        self.limit_usd = float(limit_usd)
        self.spent_usd = 0.0
        self.reserved_usd = 0.0
        self._lock = threading.Lock()

    @property
    def remaining_usd(self) -> float:
        return self.limit_usd - self.spent_usd - self.reserved_usd

    def reserve(self, amount_usd: float, label: str) -> Reservation:
        """Hold ``amount_usd`` for ``label``; BudgetExceededError when it does not fit."""
        amount_usd = _usd(amount_usd, f"the reservation for {label}")
        with self._lock:
            if self.spent_usd + self.reserved_usd + amount_usd > self.limit_usd + 1e-12:
                raise BudgetExceededError(
                    f"{label} needs up to ${amount_usd:.6f} but only ${self.remaining_usd:.6f} of the "
                    f"${self.limit_usd:.4f} budget is left; raise the budget (--budget) or use a cheaper model"
                )
            self.reserved_usd += amount_usd
        return Reservation(self, amount_usd, label)

    def record_spent(self, amount_usd: float) -> None:
        """Count money already spent elsewhere (a resumed run's earlier steps)."""
        amount_usd = _usd(amount_usd, "money already spent")
        with self._lock:
            self.spent_usd += amount_usd

    def _settle(self, reservation: Reservation, actual_usd: float) -> None:
        # An invalid amount raises before anything changes: the reservation stays
        # open and its money stays held, so nothing is lost and nothing is freed.
        actual_usd = _usd(actual_usd, f"the settled cost of {reservation.label}")
        with self._lock:
            if not reservation._open:
                raise RuntimeError(f"reservation for {reservation.label} was already settled")
            reservation._open = False
            self.reserved_usd -= reservation.amount
            self.spent_usd += actual_usd
        if actual_usd > reservation.amount * (1 + 1e-9) + 1e-12:
            log.warning(
                "%s cost $%.6f, more than the $%.6f reserved for it; the budget counts what was spent",
                reservation.label, actual_usd, reservation.amount,
            )


class Pricer:
    """Looks prices up through ``lookup`` (the ``agentkeel_model_price`` hook), once per model."""

    def __init__(self, lookup: PriceLookup, config: Config) -> None:
        self._lookup = lookup
        self._config = config
        self._cache: dict[str, ModelPrice] = {}

    def price(self, model: str) -> ModelPrice:
        cached = self._cache.get(model)
        if cached is not None:
            return cached
        price = self._lookup(model, self._config)
        if price is None:
            raise UnknownModelPriceError(
                f"no price is known for model {model!r}; add it to agentkeel.toml as "
                f'[prices."{model}"] with input_per_mtok and output_per_mtok'
            )
        for field in ("input_per_mtok", "output_per_mtok"):
            value = getattr(price, field, None)
            number = float(value) if isinstance(value, numbers.Real) and not isinstance(value, bool) else math.nan
            if not (math.isfinite(number) and number >= 0):
                raise UnknownModelPriceError(
                    f"the price of model {model!r} is invalid: {field} is {value!r}, not a finite number "
                    f"of USD >= 0 (check [prices.\"{model}\"] and the plugins implementing agentkeel_model_price)"
                )
        self._cache[model] = price
        return price

    def worst_case_for_messages(self, model: str, messages: Iterable[Mapping[str, Any]], max_tokens: int) -> float:
        """The most a chat completion of ``messages`` with ``max_tokens`` can cost."""
        return self.worst_case(model, prompt_token_upper_bound(messages), max_tokens)

    def worst_case(self, model: str, prompt_tokens: int, max_tokens: int) -> float:
        return self.price(model).cost(Usage(input_tokens=prompt_tokens, output_tokens=max_tokens))

    def cost(self, model: str, usage: Usage) -> float:
        return self.price(model).cost(usage)
