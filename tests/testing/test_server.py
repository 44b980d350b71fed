"""The scripted OpenAI-compatible server, driven by the real openai client over HTTP."""

from __future__ import annotations

import json
import os
import urllib.error
import urllib.request

import openai
import pytest
from agentkeel.testing.server import ScriptedOpenAIServer
from openai.types.chat import ChatCompletionMessageParam
from openai.types.shared_params import ResponseFormatJSONSchema

MESSAGES: list[ChatCompletionMessageParam] = [{"role": "user", "content": "hello"}]


def client(server: ScriptedOpenAIServer, **kwargs: object) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.base_url, api_key="sk-test", **kwargs)  # type: ignore[arg-type]


def test_completion_has_the_openai_shape(openai_server: ScriptedOpenAIServer) -> None:
    openai_server.queue("hi there", usage=(12, 3))
    response = client(openai_server).chat.completions.create(
        model="gpt-4o-mini", messages=MESSAGES, max_tokens=50
    )
    assert response.choices[0].message.content == "hi there"
    assert response.choices[0].finish_reason == "stop"
    assert response.model == "gpt-4o-mini"
    assert response.id.startswith("chatcmpl-")
    assert response.usage is not None
    assert (
        response.usage.prompt_tokens,
        response.usage.completion_tokens,
        response.usage.total_tokens,
    ) == (12, 3, 15)
    [body] = openai_server.requests
    assert body["model"] == "gpt-4o-mini"
    assert body["max_tokens"] == 50
    assert body["messages"] == MESSAGES
    assert openai_server.request_headers[0]["authorization"] == "Bearer sk-test"


def test_objects_are_sent_as_json_and_usage_can_be_estimated_or_omitted(
    openai_server: ScriptedOpenAIServer,
) -> None:
    openai_server.queue({"steps": [1, 2]}, model="other-model")
    openai_server.queue("x", report_usage=False, finish_reason="length")
    c = client(openai_server)
    first = c.chat.completions.create(model="gpt-4o", messages=MESSAGES)
    assert json.loads(first.choices[0].message.content or "") == {"steps": [1, 2]}
    assert first.model == "other-model"
    assert first.usage is not None and first.usage.prompt_tokens >= 1
    second = c.chat.completions.create(model="gpt-4o", messages=MESSAGES)
    assert second.usage is None
    assert second.choices[0].finish_reason == "length"


def test_replies_are_served_in_order(openai_server: ScriptedOpenAIServer) -> None:
    for text in ("one", "two", "three"):
        openai_server.queue(text)
    c = client(openai_server)
    got = [
        c.chat.completions.create(model="m", messages=MESSAGES).choices[0].message.content
        for _ in range(3)
    ]
    assert got == ["one", "two", "three"]
    assert openai_server.pending == 0


def test_empty_queue_is_a_clear_500_that_the_client_does_not_retry(
    openai_server: ScriptedOpenAIServer,
) -> None:
    with pytest.raises(openai.InternalServerError, match="no reply was scripted"):
        client(openai_server, max_retries=2).chat.completions.create(model="m", messages=MESSAGES)
    assert len(openai_server.requests) == 1


def test_429_with_retry_after_is_retried_by_the_client(openai_server: ScriptedOpenAIServer) -> None:
    openai_server.queue_error(429, retry_after=0.05)
    openai_server.queue("after the wait")
    response = client(openai_server, max_retries=1).chat.completions.create(
        model="m", messages=MESSAGES
    )
    assert response.choices[0].message.content == "after the wait"
    assert len(openai_server.requests) == 2


def test_retry_after_header_and_error_body(openai_server: ScriptedOpenAIServer) -> None:
    openai_server.queue_error(429, retry_after=3, message="slow down")
    openai_server.queue_error(500)
    with pytest.raises(openai.RateLimitError) as rate:
        client(openai_server, max_retries=0).chat.completions.create(model="m", messages=MESSAGES)
    assert rate.value.response.headers["retry-after"] == "3"
    assert rate.value.body == {
        "message": "slow down",
        "type": "rate_limit_error",
        "param": None,
        "code": None,
    }
    with pytest.raises(openai.InternalServerError):
        client(openai_server, max_retries=0).chat.completions.create(model="m", messages=MESSAGES)


def test_slow_reply_trips_the_client_timeout(openai_server: ScriptedOpenAIServer) -> None:
    openai_server.queue_slow(2.0, "late")
    with pytest.raises(openai.APITimeoutError):
        client(openai_server, max_retries=0, timeout=0.2).chat.completions.create(
            model="m", messages=MESSAGES
        )
    openai_server.queue_slow(0.05, "a little late")
    response = client(openai_server).chat.completions.create(model="m", messages=MESSAGES)
    assert response.choices[0].message.content == "a little late"


def test_malformed_body_is_not_json(openai_server: ScriptedOpenAIServer) -> None:
    openai_server.queue_malformed()
    url = openai_server.base_url + "/chat/completions"
    request = urllib.request.Request(
        url, data=json.dumps({"model": "m", "messages": []}).encode(), method="POST"
    )
    with urllib.request.urlopen(request) as answer:
        raw = answer.read()
    with pytest.raises(json.JSONDecodeError):
        json.loads(raw)


def test_json_schema_refused_when_unsupported_without_consuming_a_reply() -> None:
    with ScriptedOpenAIServer(supports_json_schema=False) as server:
        server.queue("{}")
        c = client(server, max_retries=0)
        schema_format: ResponseFormatJSONSchema = {
            "type": "json_schema",
            "json_schema": {"name": "x", "schema": {"type": "object"}},
        }
        with pytest.raises(openai.BadRequestError, match="json_schema"):
            c.chat.completions.create(model="m", messages=MESSAGES, response_format=schema_format)
        assert server.pending == 1
        response = c.chat.completions.create(
            model="m", messages=MESSAGES, response_format={"type": "json_object"}
        )
        assert response.choices[0].message.content == "{}"
        assert [r["response_format"]["type"] for r in server.requests] == [
            "json_schema",
            "json_object",
        ]


def test_api_key_is_enforced_when_configured() -> None:
    with ScriptedOpenAIServer(api_key="right") as server:
        server.queue("ok")
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=server.base_url, api_key="wrong").chat.completions.create(
                model="m", messages=MESSAGES
            )
        ok = openai.OpenAI(base_url=server.base_url, api_key="right").chat.completions.create(
            model="m", messages=MESSAGES
        )
        assert ok.choices[0].message.content == "ok"


def test_models_endpoint_and_unknown_routes(openai_server: ScriptedOpenAIServer) -> None:
    ids = [m.id for m in client(openai_server).models.list()]
    assert ids == ["gpt-4o-mini", "gpt-4o"]
    with pytest.raises(urllib.error.HTTPError) as missing:
        urllib.request.urlopen(openai_server.base_url + "/nothing")
    assert missing.value.code == 404


def test_stop_is_prompt_and_base_url_needs_a_running_server() -> None:
    server = ScriptedOpenAIServer().start()
    assert server.base_url.endswith("/v1")
    server.queue_slow(30, "never sent")
    server.stop()
    with pytest.raises(RuntimeError, match="start"):
        _ = server.base_url


def test_env_fixture_points_the_default_client_at_the_server(
    openai_server_env: ScriptedOpenAIServer,
) -> None:
    assert os.environ["OPENAI_BASE_URL"] == openai_server_env.base_url
    openai_server_env.queue("from env")
    response = openai.OpenAI().chat.completions.create(model="m", messages=MESSAGES)
    assert response.choices[0].message.content == "from env"


def test_reset_forgets_replies_and_requests(openai_server: ScriptedOpenAIServer) -> None:
    openai_server.queue("a")
    client(openai_server).chat.completions.create(model="m", messages=MESSAGES)
    openai_server.queue("b")
    openai_server.reset()
    assert openai_server.pending == 0 and openai_server.requests == []


# --- streaming ----------------------------------------------------------------------


def test_a_streamed_answer_is_chunks_then_usage_then_done(openai_server: ScriptedOpenAIServer) -> None:
    openai_server.queue("the order shipped on Monday", usage=(20, 6))
    stream = client(openai_server).chat.completions.create(
        model="gpt-4o-mini", messages=MESSAGES, stream=True, stream_options={"include_usage": True}
    )
    chunks = list(stream)
    content = [c for c in chunks if c.choices]
    assert len(content) > 1  # split into a few chunks
    assert all(c.object == "chat.completion.chunk" and c.model == "gpt-4o-mini" for c in chunks)
    assert len({c.id for c in chunks}) == 1 and chunks[0].id.startswith("chatcmpl-")
    assert "".join(c.choices[0].delta.content or "" for c in content) == "the order shipped on Monday"
    assert content[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in content] == [None] * (len(content) - 1) + ["stop"]
    assert all(c.usage is None for c in content)
    usage = chunks[-1]
    assert usage.choices == [] and usage.usage is not None
    assert (usage.usage.prompt_tokens, usage.usage.completion_tokens, usage.usage.total_tokens) == (20, 6, 26)
    [body] = openai_server.requests
    assert body["stream"] is True and body["stream_options"] == {"include_usage": True}


def test_the_raw_stream_is_server_sent_events_ending_with_done(openai_server: ScriptedOpenAIServer) -> None:
    openai_server.queue(chunks=["a", "b"], finish_reason="length")
    request = urllib.request.Request(
        openai_server.base_url + "/chat/completions", method="POST",
        data=json.dumps({"model": "m", "messages": MESSAGES, "stream": True}).encode(),
    )
    with urllib.request.urlopen(request) as answer:
        assert answer.headers["Content-Type"] == "text/event-stream"
        raw = answer.read().decode()
    events = [e for e in raw.split("\n\n") if e]
    assert all(e.startswith("data: ") for e in events)
    assert events[-1] == "data: [DONE]"
    chunks = [json.loads(e.removeprefix("data: ")) for e in events[:-1]]
    # without stream_options.include_usage: no usage chunk, and no usage field in the chunks
    assert [c["choices"][0]["delta"]["content"] for c in chunks] == ["a", "b"]
    assert [c["choices"][0]["finish_reason"] for c in chunks] == [None, "length"]
    assert all("usage" not in c for c in chunks)


def test_a_streamed_answer_without_usage_has_no_usage_chunk(openai_server: ScriptedOpenAIServer) -> None:
    openai_server.queue("x", report_usage=False)
    openai_server.queue("y", usage_body={"completion_tokens": 5})
    c = client(openai_server)
    first = list(c.chat.completions.create(model="m", messages=MESSAGES, stream=True,
                                           stream_options={"include_usage": True}))
    assert [ch.usage for ch in first] == [None] and first[0].choices[0].delta.content == "x"
    second = list(c.chat.completions.create(model="m", messages=MESSAGES, stream=True,
                                            stream_options={"include_usage": True}))
    assert second[-1].choices == [] and second[-1].usage is not None
    assert second[-1].usage.model_dump(exclude_none=True) == {"completion_tokens": 5}


def test_errors_to_a_streamed_request_keep_their_status(openai_server: ScriptedOpenAIServer) -> None:
    openai_server.queue_error(429, retry_after=0.05)
    openai_server.queue("after the wait", usage=(3, 3))
    chunks = list(client(openai_server, max_retries=1).chat.completions.create(
        model="m", messages=MESSAGES, stream=True))
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == "after the wait"
    assert len(openai_server.requests) == 2
    openai_server.queue_error(500, message="boom")
    with pytest.raises(openai.InternalServerError, match="boom"):
        client(openai_server, max_retries=0).chat.completions.create(model="m", messages=MESSAGES, stream=True)


def test_a_cut_stream_is_a_connection_error_after_the_chunks_sent(openai_server: ScriptedOpenAIServer) -> None:
    openai_server.queue_cut(chunks=["one ", "two ", "three"], after_chunks=2)
    got: list[str] = []
    stream = client(openai_server, max_retries=0).chat.completions.create(model="m", messages=MESSAGES, stream=True)
    with pytest.raises(openai.APIConnectionError):
        for chunk in stream:
            got.append(chunk.choices[0].delta.content or "")
    assert got == ["one ", "two "]


def test_a_cut_answer_that_is_not_streamed_is_a_connection_error(openai_server: ScriptedOpenAIServer) -> None:
    openai_server.queue_cut("never whole")
    with pytest.raises(openai.APIConnectionError):
        client(openai_server, max_retries=0).chat.completions.create(model="m", messages=MESSAGES)


def test_a_malformed_streamed_answer_cannot_be_decoded(openai_server: ScriptedOpenAIServer) -> None:
    openai_server.queue_malformed()
    with pytest.raises(json.JSONDecodeError):
        list(client(openai_server).chat.completions.create(model="m", messages=MESSAGES, stream=True))


def test_chunk_delays_trip_a_read_timeout_mid_stream(openai_server: ScriptedOpenAIServer) -> None:
    openai_server.queue(chunks=["fast", "slow"], chunk_delay_s=1.0)
    with pytest.raises(openai.APITimeoutError):
        list(client(openai_server, max_retries=0, timeout=0.3).chat.completions.create(
            model="m", messages=MESSAGES, stream=True))


async def test_the_async_client_streams_too(openai_server: ScriptedOpenAIServer) -> None:
    openai_server.queue(chunks=["as", "ync"], usage=(1, 2))
    async with openai.AsyncOpenAI(base_url=openai_server.base_url, api_key="sk-test") as c:
        stream = await c.chat.completions.create(model="m", messages=MESSAGES, stream=True,
                                                 stream_options={"include_usage": True})
        chunks = [chunk async for chunk in stream]
    assert [ch.choices[0].delta.content for ch in chunks if ch.choices] == ["as", "ync"]
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 2
