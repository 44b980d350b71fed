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
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import attrs

from agentkeel.cost.store import EPSILON, LedgerEntry, ScopeLimit, resets_at
from agentkeel.errors import BudgetExceededError, UnknownModelPriceError
from agentkeel.types import CostRecord, ModelPrice, Usage

if TYPE_CHECKING:
    from agentkeel.config import Config
    from agentkeel.cost.store import BudgetStore

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
    """Money held for one call. Settle it with the real cost (and the ``CostRecord`` the
    ledger keeps), or release it. ``purpose`` and ``reason`` say what the call is for."""

    __slots__ = ("_budget", "_open", "amount", "label", "purpose", "reason", "store_id")

    def __init__(self, budget: Budget, amount: float, label: str, store_id: str | None = None,
                 purpose: str = "", reason: str = "") -> None:
        self._budget = budget
        self.amount = amount
        self.label = label
        self.store_id = store_id
        self.purpose = purpose
        self.reason = reason
        self._open = True

    def settle(self, actual_usd: float, record: CostRecord | None = None) -> None:
        self._budget._settle(self, actual_usd, record)

    def release(self) -> None:
        self._budget._settle(self, 0.0, None)


@attrs.frozen
class LedgerOwner:
    """Whose spending a run's ledger rows are: the run, its user, session and principal."""

    run_id: str
    user_id: str
    session_id: str
    principal: str


class Budget:
    """A run's spending limit in USD, and (with a ``store``) the scoped budgets it also
    spends from and the ledger its costs settle into. Thread-safe: concurrent
    reservations cannot overspend; with a shared store, neither can other runs or
    processes (``agentkeel.cost.store``)."""

    def __init__(
        self,
        limit_usd: float,
        *,
        store: BudgetStore | None = None,
        scopes: Sequence[ScopeLimit] = (),
        owner: LedgerOwner | None = None,
        holder: str = "",
        ttl_s: float = 600.0,
    ) -> None:
        if not math.isfinite(limit_usd) or limit_usd < 0:
            raise ValueError(f"a budget must be a finite amount of USD >= 0, got {limit_usd!r}")
        if store is not None and owner is None:
            raise ValueError("a budget with a ledger store needs the owner its rows belong to")
        self.limit_usd = float(limit_usd)
        self.spent_usd = 0.0
        self.reserved_usd = 0.0
        self.store = store
        self.scopes = tuple(scopes)
        self.owner = owner
        self.holder = holder
        self.ttl_s = ttl_s
        self._lock = threading.Lock()

    @property
    def remaining_usd(self) -> float:
        return self.limit_usd - self.spent_usd - self.reserved_usd

    def exhausted_scope(self) -> str | None:
        """Why no priced call of this run could be afforded now (a scope with nothing
        left, named with when it resets), or None. Checked before planning."""
        if self.store is None:
            return None
        for scope in self.scopes:
            if self.store.left(scope) <= EPSILON:
                when = resets_at(scope)
                reset = f"; it resets at {when}" if when else ""
                return (f"the budget {scope.label} (${scope.limit_usd:.4f}) is used up{reset}; "
                        "nothing was planned or run")
        return None

    def reserve(self, amount_usd: float, label: str, *, purpose: str = "", reason: str = "") -> Reservation:
        """Hold ``amount_usd`` for ``label`` against this run's budget and every scope;
        BudgetExceededError naming what cannot afford it otherwise (nothing held)."""
        amount_usd = _usd(amount_usd, f"the reservation for {label}")
        with self._lock:
            if self.spent_usd + self.reserved_usd + amount_usd > self.limit_usd + 1e-12:
                raise BudgetExceededError(
                    f"{label} needs up to ${amount_usd:.6f} but only ${self.remaining_usd:.6f} of the "
                    f"${self.limit_usd:.4f} budget is left; raise the budget (--budget) or use a cheaper model"
                )
            self.reserved_usd += amount_usd
        store_id = None
        if self.store is not None and self.scopes and amount_usd > 0:
            try:
                store_id = self.store.reserve(self.scopes, amount_usd, holder=self.holder, ttl_s=self.ttl_s)
            except BaseException:
                with self._lock:
                    self.reserved_usd -= amount_usd
                raise
        return Reservation(self, amount_usd, label, store_id, purpose, reason)

    def record_spent(self, amount_usd: float) -> None:
        """Count money already spent elsewhere (a resumed run's earlier steps)."""
        amount_usd = _usd(amount_usd, "money already spent")
        with self._lock:
            self.spent_usd += amount_usd

    def _settle(self, reservation: Reservation, actual_usd: float, record: CostRecord | None) -> None:
        # An invalid amount raises before anything changes: the reservation stays
        # open and its money stays held, so nothing is lost and nothing is freed.
        actual_usd = _usd(actual_usd, f"the settled cost of {reservation.label}")
        with self._lock:
            if not reservation._open:
                raise RuntimeError(f"reservation for {reservation.label} was already settled")
            reservation._open = False
            self.reserved_usd -= reservation.amount
            self.spent_usd += actual_usd
        store = self.store
        if store is not None:
            if record is None:
                if reservation.store_id is not None:
                    store.release(reservation.store_id)
            else:
                assert self.owner is not None
                entry = ledger_entry(self.owner, record, actual_usd)
                if reservation.store_id is not None:
                    store.settle(reservation.store_id, entry)
                else:
                    store.record(entry)
        if actual_usd > reservation.amount * (1 + 1e-9) + 1e-12:
            log.warning(
                "%s cost $%.6f, more than the $%.6f reserved for it; the budget counts what was spent",
                reservation.label, actual_usd, reservation.amount,
            )


def ledger_entry(owner: LedgerOwner, record: CostRecord, cost_usd: float) -> LedgerEntry:
    """The ledger row of ``record``, spent by ``owner``."""
    usage = record.usage or Usage()
    return LedgerEntry(
        run_id=owner.run_id, user_id=owner.user_id, session_id=owner.session_id, principal=owner.principal,
        kind=record.kind, cost_usd=cost_usd, purpose=record.purpose, reason=record.reason, step_id=record.step_id,
        model=record.model, tier=record.tier, tool=record.tool, input_tokens=usage.input_tokens,
        output_tokens=usage.output_tokens, cached_tokens=usage.cached_tokens, reasoning_tokens=usage.reasoning_tokens,
        estimated=record.estimated,
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
        fields = ["input_per_mtok", "output_per_mtok"]
        if getattr(price, "cached_input_per_mtok", None) is not None:
            fields.append("cached_input_per_mtok")
        for field in fields:
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
