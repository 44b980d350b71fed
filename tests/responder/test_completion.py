"""The shared priced completion (``agentkeel.models.completion``) where only streaming reaches:
the real openai client, over real HTTP, against the scripted server."""

from __future__ import annotations

import asyncio
import time

import pytest
from agentkeel.models.completion import LLMCallError, LLMTimeoutError, complete, make_client
from agentkeel.testing.server import ScriptedOpenAIServer

from tests.planner.test_llm import make_run

MESSAGES = [{"role": "system", "content": "answer briefly"}, {"role": "user", "content": "hello"}]
NO_RETRIES = {"plugins": {"planner_llm": {"max_retries": 0}}}


async def test_a_streamed_call_reports_each_delta_and_bills_the_usage_chunk(
    openai_server: ScriptedOpenAIServer,
) -> None:
    openai_server.queue(chunks=["Hel", "lo", "!"], usage=(20, 3), finish_reason="length")
    run = make_run(openai_server.base_url)
    tier = run.config.tiers[0]
    deltas: list[str] = []
    async with make_client(run.config, unconfigured="-") as client:
        done = await complete(client, tier, MESSAGES, run, on_text=deltas.append)
    assert deltas == ["Hel", "lo", "!"] and done.text == "Hello!" and done.truncated
    assert done.cost is run.costs[0] and done.cost.usage is not None
    assert (done.cost.usage.input_tokens, done.cost.usage.output_tokens, done.cost.estimated) == (20, 3, False)


async def test_absurd_usage_in_a_stream_is_bounded(openai_server: ScriptedOpenAIServer) -> None:
    openai_server.queue(chunks=["x"], usage=(10, 9_000_000))
    run = make_run(openai_server.base_url)
    async with make_client(run.config, unconfigured="-") as client:
        done = await complete(client, run.config.tiers[0], MESSAGES, run, on_text=lambda d: None)
    assert done.cost.usage is not None and done.cost.usage.output_tokens == 500 and done.cost.estimated


async def test_an_exception_from_on_text_propagates_and_the_call_is_billed_at_the_worst_case(
    openai_server: ScriptedOpenAIServer,
) -> None:
    openai_server.queue(chunks=["a", "b"], usage=(5, 5))
    run = make_run(openai_server.base_url)

    def broken(delta: str) -> None:
        raise KeyError("observer bug")

    async with make_client(run.config, unconfigured="-") as client:
        with pytest.raises(KeyError, match="observer bug"):
            await complete(client, run.config.tiers[0], MESSAGES, run, on_text=broken)
    [record] = run.costs
    assert record.estimated and run.budget.reserved_usd == pytest.approx(0)


async def test_the_deadline_covers_the_whole_stream(openai_server: ScriptedOpenAIServer) -> None:
    openai_server.queue(chunks=["a", "b", "c", "d"], chunk_delay_s=0.4)
    run = make_run(openai_server.base_url, timeout_s=0.6, extra=NO_RETRIES)
    started = time.monotonic()
    deltas: list[str] = []
    async with make_client(run.config, unconfigured="-") as client:
        with pytest.raises(LLMTimeoutError, match=r"did not answer within its 0\.6 s deadline"):
            await complete(client, run.config.tiers[0], MESSAGES, run, on_text=deltas.append)
    assert time.monotonic() - started < 1.5
    assert deltas == ["a"]
    [record] = run.costs
    assert record.estimated and record.usage is not None and record.usage.output_tokens == 500


async def test_a_malformed_stream_is_billed_at_the_worst_case(openai_server: ScriptedOpenAIServer) -> None:
    openai_server.queue_malformed()
    run = make_run(openai_server.base_url, extra=NO_RETRIES)
    async with make_client(run.config, unconfigured="-") as client:
        with pytest.raises(LLMCallError, match="m-fast call failed: JSONDecodeError"):
            await complete(client, run.config.tiers[0], MESSAGES, run, on_text=lambda d: None)
    assert [c.estimated for c in run.costs] == [True]


async def test_a_cancelled_call_settles_its_reservation(openai_server: ScriptedOpenAIServer) -> None:
    openai_server.queue_slow(5.0, "late")
    run = make_run(openai_server.base_url, extra=NO_RETRIES)
    async with make_client(run.config, unconfigured="-") as client:
        task = asyncio.ensure_future(complete(client, run.config.tiers[0], MESSAGES, run))
        while not openai_server.requests:
            await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    # The request had been sent: its fate is unknown, so it is billed at the worst case, not left reserved.
    assert run.budget.reserved_usd == pytest.approx(0)
    assert [c.estimated for c in run.costs] == [True]
