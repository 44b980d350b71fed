"""Cost controller: prices, worst-case reservations and settlement.

Before every priced call the worst case (an upper bound on prompt tokens plus
``max_tokens``, at the model's real price) is reserved; after the call the
reservation is settled to the real usage. A reservation that would take the
budget past its limit is refused before the call is made.
"""

from __future__ import annotations

import math
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


def prompt_token_upper_bound(messages: Iterable[Mapping[str, Any]]) -> int:
    """An upper bound on prompt tokens: byte-level BPE never emits more tokens than bytes."""
    total = 3
    for message in messages:
        content = message.get("content") or ""
        total += len(str(content).encode()) + MESSAGE_OVERHEAD_TOKENS
    return total


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
        with self._lock:
            self.spent_usd += amount_usd

    def _settle(self, reservation: Reservation, actual_usd: float) -> None:
        with self._lock:
            if not reservation._open:
                raise RuntimeError(f"reservation for {reservation.label} was already settled")
            reservation._open = False
            self.reserved_usd -= reservation.amount
            self.spent_usd += actual_usd


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
        self._cache[model] = price
        return price

    def worst_case_for_messages(self, model: str, messages: Iterable[Mapping[str, Any]], max_tokens: int) -> float:
        """The most a chat completion of ``messages`` with ``max_tokens`` can cost."""
        return self.worst_case(model, prompt_token_upper_bound(messages), max_tokens)

    def worst_case(self, model: str, prompt_tokens: int, max_tokens: int) -> float:
        return self.price(model).cost(Usage(input_tokens=prompt_tokens, output_tokens=max_tokens))

    def cost(self, model: str, usage: Usage) -> float:
        return self.price(model).cost(usage)
