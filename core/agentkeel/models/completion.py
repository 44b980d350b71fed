"""The priced chat completion every LLM component calls (the planner, the responder).

- Endpoint: ``[models] base_url`` from the config, else ``$OPENAI_BASE_URL``,
  else OpenAI; key from ``$OPENAI_API_KEY`` (a placeholder when only a base URL
  is set, for local servers that ignore it). Neither set: not configured
  (``endpoint_configured`` is False and ``make_client`` raises ``ConfigError``
  with the caller's message).
- Retries of failed HTTP calls happen in one layer only: the openai client's
  (``max_retries``, honouring ``Retry-After``; ``[plugins.planner_llm]
  max_retries`` in the config, default 2, for every LLM call). Nothing here
  re-sends a failed call.
- Deadline: each call, the client's retries and ``Retry-After`` waits
  included, ends within the tier's ``timeout_s`` (``[models] timeout_s`` unless
  the tier sets its own). A call past its deadline is cancelled:
  ``LLMTimeoutError``.
- Budget: before the call the worst case is reserved with ``run.reserve_llm``
  (``BudgetExceededError`` propagates, nothing is sent); after it the
  reservation is settled to the reported usage and the cost recorded in
  ``run.costs``. A call that ends in an HTTP error status is released (an error
  answer is not billed), and so is one that never reached a server (connection
  refused) and one whose deadline passed while every request sent had been
  answered with an error (waiting out a ``Retry-After``). A call whose fate is
  unknown (timed out after sending, connection lost mid-answer, unreadable
  body, usage not reported, cancelled after sending) is settled to the worst
  case and its cost record is marked ``estimated``: an unknown cost is never
  recorded as free.
- Reported usage is checked before it is billed (``bounded_usage``): counts
  must be integers >= 0, prompt tokens at most the reservation's bound on what
  was sent, completion tokens at most ``max_tokens``. A count that is not is
  replaced by its bound, a warning is logged and the cost record is marked
  ``estimated``; the answer itself is still used (the call did succeed).
- Streaming: with ``on_text``, the call streams (``stream_options``
  ``include_usage``), ``on_text(delta)`` is called for each piece of content as
  it arrives, and the usage of the final chunk is billed (none reported: the
  worst case, estimated). An exception raised by ``on_text`` ends the call
  (billed at the worst case) and propagates unchanged.

Every failure of the call itself is an ``LLMCallError`` (its message names the
model and what happened), raised after the budget has been settled.
"""

from __future__ import annotations

import asyncio
import contextvars
import json
import logging
import os
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import attrs

from agentkeel.cost.budget import bounded_usage, prompt_token_upper_bound
from agentkeel.errors import AgentkeelError, ConfigError
from agentkeel.types import CostRecord, Usage

if TYPE_CHECKING:
    import openai

    from agentkeel.config import Config, ModelTier
    from agentkeel.context import RunContext
    from agentkeel.cost.budget import Reservation

DEFAULT_MAX_RETRIES = 2
PLACEHOLDER_API_KEY = "not-needed"

log = logging.getLogger(__name__)


class LLMCallError(AgentkeelError):
    """A chat completion failed, after the client's retries. The budget is already settled."""

    def __init__(self, message: str, *, model: str, status_code: int | None = None) -> None:
        super().__init__(message)
        self.model = model
        self.status_code = status_code


class LLMTimeoutError(LLMCallError):
    """The call did not end within the tier's deadline."""


class LLMStatusError(LLMCallError):
    """The server answered with an HTTP error status (``status_code``)."""


class LLMAuthError(LLMStatusError):
    """The server refused the credentials (401 or 403)."""


@attrs.frozen
class Completion:
    """What one call returned: the text, whether it was cut off at ``max_tokens``, its cost."""

    text: str | None
    truncated: bool
    cost: CostRecord


# --- the client ---------------------------------------------------------------------


def endpoint_configured(config: Config) -> bool:
    """True when an LLM endpoint is configured: ``[models] base_url``, ``$OPENAI_BASE_URL``
    or ``$OPENAI_API_KEY``."""
    return bool(config.base_url or os.environ.get("OPENAI_BASE_URL") or os.environ.get("OPENAI_API_KEY"))


def max_retries(config: Config) -> int:
    """The client's retries (``[plugins.planner_llm] max_retries``); ``ConfigError`` naming it."""
    retries = config.section("plugins", "planner_llm").get("max_retries", DEFAULT_MAX_RETRIES)
    if isinstance(retries, bool) or not isinstance(retries, int) or retries < 0:
        raise ConfigError(
            f"invalid configuration in {config.source}: plugins.planner_llm.max_retries: "
            f"must be an integer >= 0, got {retries!r}"
        )
    return retries


def make_client(config: Config, *, unconfigured: str) -> openai.AsyncOpenAI:
    """An ``AsyncOpenAI`` for the configured endpoint (``ConfigError(unconfigured)`` when there is none)."""
    import openai  # imported on first use: it takes longer to import than the rest of agentkeel

    base_url = config.base_url or os.environ.get("OPENAI_BASE_URL") or None
    api_key = os.environ.get("OPENAI_API_KEY")
    if not api_key and not base_url:
        raise ConfigError(unconfigured)
    retries = max_retries(config)
    return openai.AsyncOpenAI(
        api_key=api_key or PLACEHOLDER_API_KEY,
        base_url=base_url,
        timeout=config.llm_timeout_s,
        max_retries=retries,
        http_client=openai.DefaultAsyncHttpxClient(
            timeout=config.llm_timeout_s,
            event_hooks={"request": [_on_request], "response": [_on_response]},
        ),
    )


class _Attempts:
    """What became of the HTTP requests one call sent (the client may retry)."""

    __slots__ = ("error_answers", "sent")

    def __init__(self) -> None:
        self.sent = 0
        self.error_answers = 0

    @property
    def all_refused(self) -> bool:
        """Every request sent was answered with an HTTP error status: nothing to pay."""
        return self.error_answers == self.sent


_ATTEMPTS: contextvars.ContextVar[_Attempts | None] = contextvars.ContextVar("agentkeel_llm_attempts", default=None)


async def _on_request(request: Any) -> None:
    attempts = _ATTEMPTS.get()
    if attempts is not None:
        attempts.sent += 1


async def _on_response(response: Any) -> None:
    attempts = _ATTEMPTS.get()
    if attempts is not None and getattr(response, "status_code", 200) >= 400:
        attempts.error_answers += 1


# --- the priced call ----------------------------------------------------------------


class _CallbackFailed(Exception):
    """``on_text`` raised (its exception is the cause): not a failure of the call."""


async def complete(
    client: openai.AsyncOpenAI,
    tier: ModelTier,
    messages: Sequence[Mapping[str, Any]],
    run: RunContext,
    *,
    response_format: Mapping[str, Any] | None = None,
    on_text: Callable[[str], None] | None = None,
    purpose: str = "plan",
    reason: str = "",
) -> Completion:
    """One priced chat completion on ``tier`` (see the module docs for the billing rules),
    observed as an ``llm`` span of the run (``RunContext.span``) when a plugin observes.

    Raises ``BudgetExceededError`` (nothing sent) or ``UnknownModelPriceError`` from the
    reservation, ``LLMCallError`` when the call failed, or what ``on_text`` raised."""
    if run.observers is None:
        return await _complete(client, tier, messages, run, response_format=response_format, on_text=on_text,
                               purpose=purpose, reason=reason)
    with run.span("llm", operation="chat", model=tier.model, tier=tier.name, purpose=purpose,
                  max_tokens=tier.max_tokens, temperature=tier.temperature, base_url=str(client.base_url),
                  streaming=on_text is not None, structured=response_format is not None,
                  messages=messages) as span:
        completion = await _complete(client, tier, messages, run, response_format=response_format,
                                     on_text=on_text, purpose=purpose, reason=reason)
        usage = completion.cost.usage
        span.set(cost_usd=completion.cost.cost_usd, estimated=completion.cost.estimated,
                 finish_reason="length" if completion.truncated else "stop", output=completion.text,
                 **({"input_tokens": usage.input_tokens, "output_tokens": usage.output_tokens}
                    if usage is not None else {}))
        return completion


async def _complete(
    client: openai.AsyncOpenAI,
    tier: ModelTier,
    messages: Sequence[Mapping[str, Any]],
    run: RunContext,
    *,
    response_format: Mapping[str, Any] | None,
    on_text: Callable[[str], None] | None,
    purpose: str,
    reason: str,
) -> Completion:
    import openai

    deadline_s = run.config.tier_timeout_s(tier)
    # The bound covers everything sent: the messages and the response format's schema.
    sent = [*messages, {"role": "system", "content": json.dumps(response_format)}] if response_format else [
        *messages]
    prompt_bound = prompt_token_upper_bound(sent)
    reservation = run.reserve_llm(tier.model, sent, tier.max_tokens, purpose=purpose, reason=reason)
    kwargs: dict[str, Any] = {
        "model": tier.model,
        "messages": list(messages),
        "max_tokens": tier.max_tokens,
        "temperature": tier.temperature,
        "timeout": deadline_s,
    }
    if response_format is not None:
        kwargs["response_format"] = dict(response_format)
    attempts = _Attempts()
    token = _ATTEMPTS.set(attempts)
    model = tier.model
    try:
        async with asyncio.timeout(deadline_s):
            if on_text is None:
                text, finish, usage = await _call(client, kwargs)
            else:
                text, finish, usage = await _stream(client, kwargs, on_text)
    except _CallbackFailed as exc:
        _settle_worst_case(run, reservation, tier, prompt_bound)
        cause = exc.__cause__
        assert cause is not None
        raise cause from None
    except TimeoutError as exc:
        if attempts.sent and attempts.all_refused:
            reservation.release()  # waiting out a Retry-After: every answer so far was an error
        else:
            _settle_worst_case(run, reservation, tier, prompt_bound)
        raise LLMTimeoutError(
            f"{model} did not answer within its {deadline_s:g} s deadline "
            f"({attempts.sent} request(s) sent, retries and Retry-After waits included)",
            model=model,
        ) from exc
    except openai.APIStatusError as exc:
        _settle_failed(run, reservation, tier, prompt_bound, attempts)
        if isinstance(exc, openai.AuthenticationError | openai.PermissionDeniedError):
            raise LLMAuthError(
                f"{model} refused the credentials (HTTP {exc.status_code}): {exc.message}",
                model=model, status_code=exc.status_code,
            ) from exc
        if exc.status_code == 400:
            message = f"{model} rejected the request (400): {exc.message}"
        else:
            message = f"{model} failed with HTTP {exc.status_code}: {exc.message}"
        raise LLMStatusError(message, model=model, status_code=exc.status_code) from exc
    except openai.APIConnectionError as exc:
        if _never_sent(exc):
            reservation.release()  # nothing reached a server: nothing to pay
        else:
            _settle_worst_case(run, reservation, tier, prompt_bound)
        raise LLMCallError(f"{model} call failed: {type(exc).__name__}: {exc}", model=model) from exc
    except (openai.APIError, json.JSONDecodeError) as exc:
        _settle_worst_case(run, reservation, tier, prompt_bound)
        raise LLMCallError(f"{model} call failed: {type(exc).__name__}: {exc}", model=model) from exc
    except Exception as exc:  # an answer of an unexpected shape: the server did process the call
        _settle_worst_case(run, reservation, tier, prompt_bound)
        raise LLMCallError(f"{model} sent an answer that cannot be read: {type(exc).__name__}: {exc}",
                           model=model) from exc
    except BaseException:  # cancelled (or interrupted): settle before the exception goes on
        if attempts.sent:
            _settle_worst_case(run, reservation, tier, prompt_bound)
        else:
            reservation.release()
        raise
    finally:
        _ATTEMPTS.reset(token)
    record = _settle_usage(run, reservation, tier, prompt_bound, usage)
    return Completion(text=text, truncated=finish == "length", cost=record)


async def _call(client: openai.AsyncOpenAI, kwargs: Mapping[str, Any]) -> tuple[str | None, str | None, Any]:
    response = await client.chat.completions.create(**kwargs)
    if not response.choices:
        return None, None, response.usage
    choice = response.choices[0]
    return choice.message.content, choice.finish_reason, response.usage


async def _stream(
    client: openai.AsyncOpenAI, kwargs: Mapping[str, Any], on_text: Callable[[str], None]
) -> tuple[str | None, str | None, Any]:
    stream = await client.chat.completions.create(
        **kwargs, stream=True, stream_options={"include_usage": True}
    )
    parts: list[str] = []
    finish: str | None = None
    usage: Any = None
    try:
        async for chunk in stream:
            if chunk.usage is not None:
                usage = chunk.usage
            for choice in chunk.choices or ():
                if choice.index != 0:
                    continue
                delta = choice.delta.content if choice.delta is not None else None
                if delta:
                    parts.append(delta)
                    try:
                        on_text(delta)
                    except Exception as exc:
                        raise _CallbackFailed() from exc
                if choice.finish_reason:
                    finish = choice.finish_reason
    finally:
        await stream.close()
    return ("".join(parts) if parts or finish else None), finish, usage


def _settle_usage(
    run: RunContext, reservation: Reservation, tier: ModelTier, prompt_bound: int, usage: Any
) -> CostRecord:
    """Settle a call that succeeded to its reported usage, bounded by what was reserved."""
    if usage is None:
        return _settle_worst_case(run, reservation, tier, prompt_bound)
    billed, problems = bounded_usage(
        getattr(usage, "prompt_tokens", None),
        getattr(usage, "completion_tokens", None),
        prompt_bound=prompt_bound,
        max_tokens=tier.max_tokens,
    )
    billed = attrs.evolve(billed, cached_tokens=_detail(usage, "prompt_tokens_details", "cached_tokens",
                                                        billed.input_tokens),
                          reasoning_tokens=_detail(usage, "completion_tokens_details", "reasoning_tokens",
                                                   billed.output_tokens))
    if problems:
        log.warning(
            "%s (tier %r) reported unusable usage: %s; billed %d prompt and %d completion tokens "
            "instead (the bounds reserved for the call), marked estimated",
            tier.model, tier.name, "; ".join(problems), billed.input_tokens, billed.output_tokens,
        )
    return run.settle_llm(reservation, model=tier.model, tier=tier.name, usage=billed, estimated=bool(problems))


def _detail(usage: Any, details: str, field: str, bound: int) -> int:
    """A reported token detail (cached input, reasoning output) within [0, ``bound``]; 0 when unusable."""
    value = getattr(getattr(usage, details, None), field, None)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        return 0
    return min(value, bound)


def _settle_failed(
    run: RunContext, reservation: Reservation, tier: ModelTier, prompt_bound: int, attempts: _Attempts
) -> None:
    """A call that ended in an HTTP error status: free, unless an earlier attempt's fate is unknown."""
    if attempts.all_refused:
        reservation.release()
    else:  # an earlier attempt timed out or lost its connection, then the client retried
        _settle_worst_case(run, reservation, tier, prompt_bound)


def _settle_worst_case(run: RunContext, reservation: Reservation, tier: ModelTier, prompt_bound: int) -> CostRecord:
    worst = Usage(prompt_bound, tier.max_tokens)
    return run.settle_llm(reservation, model=tier.model, tier=tier.name, usage=worst, estimated=True)


def _never_sent(exc: BaseException) -> bool:
    """True when the request provably never reached a server: behind the error is the
    HTTP library's ``ConnectError`` (refused, unresolvable) or ``ConnectTimeout``.
    Matched by class name, so this works whichever HTTP library the client uses."""
    cause: BaseException | None = exc
    seen = 0
    while cause is not None and seen < 20:
        names = {klass.__name__ for klass in type(cause).__mro__}
        if names & {"ConnectError", "ConnectTimeout"}:
            return True
        cause = cause.__cause__ or cause.__context__
        seen += 1
    return False
