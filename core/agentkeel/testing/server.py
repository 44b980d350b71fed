"""A scripted OpenAI-compatible HTTP server for tests.

A real HTTP server on 127.0.0.1 (a free port) that speaks the Chat Completions
wire format, so the real ``openai`` client — its retries, timeouts and error
classes included — is exercised end to end. Standard library only.

Each ``POST /v1/chat/completions`` takes the next scripted reply from a FIFO
queue: a completion (``queue``), an HTTP error (``queue_error``, optionally
with ``Retry-After``), a reply that arrives late (``queue_slow``), a body
that is not JSON (``queue_malformed``) or one whose connection drops halfway
(``queue_cut``). A request with ``"stream": true`` gets the same replies as
Server-Sent Events in the ``chat.completion.chunk`` format: the content in a
few chunks (``finish_reason`` in the last), then, when ``stream_options``
asks for ``include_usage``, a chunk with empty ``choices`` and the usage, then
``data: [DONE]`` (errors are answered as usual, with their status and JSON
body). Every request body received is kept in
``requests`` so a test can assert on ``model``, ``messages``, ``max_tokens``
or ``response_format``. When nothing is queued the server answers 500 with a
message saying so and ``x-should-retry: false``, so a test that forgot a reply
fails at once instead of after the client's retries.

``POST /v1/embeddings`` answers every request from ``embed`` (a function of one
text to its vector; by default ``hashed_embedding``: words hashed into 64
dimensions, so texts sharing words are close), with ``prompt_tokens`` the
number of words. ``queue_embedding_error`` makes the next embeddings request
fail with an HTTP status. Its request bodies are kept in ``embedding_requests``.

    with ScriptedOpenAIServer() as server:
        server.queue({"reasoning": "...", "steps": []}, usage=(120, 30))
        client = openai.OpenAI(base_url=server.base_url, api_key="test")
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import itertools
import json
import math
import sys
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Self

__all__ = ["OpenAIServer", "ScriptedOpenAIServer", "ScriptedReply", "hashed_embedding"]

EMBEDDING_DIMS = 64


def hashed_embedding(text: str, dims: int = EMBEDDING_DIMS) -> list[float]:
    """A deterministic unit vector for ``text``: each lower-cased word adds one to a
    dimension chosen by its hash (zero words: the first axis)."""
    vector = [0.0] * dims
    for word in "".join(c if c.isalnum() else " " for c in text.lower()).split():
        vector[int.from_bytes(hashlib.sha256(word.encode()).digest()[:4], "big") % dims] += 1.0
    norm = math.sqrt(sum(x * x for x in vector))
    if not norm:
        vector[0] = norm = 1.0
    return [x / norm for x in vector]


@dataclasses.dataclass(frozen=True)
class ScriptedReply:
    """One queued answer. ``body`` is sent as is when it is bytes, else as JSON."""

    status: int
    body: bytes | Mapping[str, Any] | None
    headers: Mapping[str, str] = dataclasses.field(default_factory=dict)
    delay_s: float = 0.0
    content: str | None = None
    usage: tuple[int, int] | None = None
    usage_body: Mapping[str, Any] | None = None
    report_usage: bool = True
    model: str | None = None
    finish_reason: str = "stop"
    chunks: tuple[str, ...] | None = None
    """How a streamed answer splits ``content`` (None: into a few chunks of about equal length)."""
    chunk_delay_s: float = 0.0
    """A pause before each chunk of a streamed answer."""
    cut_after: int | None = None
    """Drop the connection after this many content chunks (streamed) or half the body (not streamed)."""


def _split(text: str, pieces: int = 4) -> tuple[str, ...]:
    """``text`` in at most ``pieces`` chunks of about equal length (one empty chunk for "")."""
    if not text:
        return ("",)
    size = math.ceil(len(text) / pieces)
    return tuple(text[i : i + size] for i in range(0, len(text), size))


def _error_body(
    message: str, *, error_type: str, param: str | None = None, code: str | None = None
) -> dict[str, Any]:
    return {"error": {"message": message, "type": error_type, "param": param, "code": code}}


def _estimate_tokens(text: str) -> int:
    return max(1, len(text) // 4)


class _Handler(BaseHTTPRequestHandler):
    server: _HTTPServer
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:
        """Stay quiet: test output is for the test."""

    def do_GET(self) -> None:
        if self.path.rstrip("/") == "/v1/models":
            owner = self.server.owner
            data = [
                {"id": m, "object": "model", "created": 0, "owned_by": "agentkeel-testing"}
                for m in owner.models
            ]
            self._send(200, {"object": "list", "data": data})
        else:
            self._send(
                404, _error_body(f"no route GET {self.path}", error_type="invalid_request_error")
            )

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        if self.path.rstrip("/") == "/v1/embeddings":
            try:
                self.server.owner._handle_embeddings(self, json.loads(raw or b"null"))
            except json.JSONDecodeError as exc:
                self._send(400, _error_body(f"request body is not JSON: {exc}", error_type="invalid_request_error"))
            return
        if self.path.rstrip("/") != "/v1/chat/completions":
            self._send(
                404, _error_body(f"no route POST {self.path}", error_type="invalid_request_error")
            )
            return
        try:
            body = json.loads(raw or b"null")
        except json.JSONDecodeError as exc:
            self._send(
                400,
                _error_body(f"request body is not JSON: {exc}", error_type="invalid_request_error"),
            )
            return
        self.server.owner._handle_completion(self, body)

    def _send(
        self,
        status: int,
        body: bytes | Mapping[str, Any] | None,
        headers: Mapping[str, str] | None = None,
        *,
        cut: bool = False,
    ) -> None:
        payload = body if isinstance(body, bytes) else json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        if cut:  # half the body, then the connection drops
            self.wfile.write(payload[: len(payload) // 2])
            self.close_connection = True
            return
        self.wfile.write(payload)

    def _start_events(self) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()

    def _event(self, data: bytes) -> None:
        """One Server-Sent Event, in one HTTP chunk, sent at once."""
        event = b"data: " + data + b"\n\n"
        self.wfile.write(f"{len(event):x}\r\n".encode() + event + b"\r\n")
        self.wfile.flush()

    def _end_events(self) -> None:
        self.wfile.write(b"0\r\n\r\n")
        self.wfile.flush()


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    owner: ScriptedOpenAIServer

    def handle_error(self, request: Any, client_address: Any) -> None:
        if isinstance(sys.exc_info()[1], (ConnectionError, TimeoutError)):
            return  # a client that went away mid-reply: what the fault-injection tests do
        super().handle_error(request, client_address)


class ScriptedOpenAIServer:
    """A scripted ``/v1/chat/completions`` server. Use as a context manager or start()/stop().

    ``supports_json_schema=False`` makes it refuse ``response_format`` of type
    ``json_schema`` with a 400 (without consuming a queued reply), like servers
    that only know ``json_object``. ``api_key``, when given, is required as a
    bearer token (401 otherwise). ``models`` is what ``GET /v1/models`` lists.
    """

    def __init__(
        self,
        *,
        supports_json_schema: bool = True,
        api_key: str | None = None,
        models: Iterable[str] = ("gpt-4o-mini", "gpt-4o"),
        embed: Callable[[str], Sequence[float]] = hashed_embedding,
    ) -> None:
        self.supports_json_schema = supports_json_schema
        self.embed = embed
        self.embedding_requests: list[dict[str, Any]] = []
        self._embedding_errors: collections.deque[int] = collections.deque()
        self.api_key = api_key
        self.models = list(models)
        self.requests: list[dict[str, Any]] = []
        self.request_headers: list[dict[str, str]] = []
        self._replies: collections.deque[ScriptedReply] = collections.deque()
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._ids = itertools.count(1)
        self._httpd: _HTTPServer | None = None
        self._thread: threading.Thread | None = None

    # --- lifecycle ------------------------------------------------------------------

    def start(self) -> Self:
        if self._httpd is not None:
            return self
        self._stopping.clear()
        httpd = _HTTPServer(("127.0.0.1", 0), _Handler)
        httpd.owner = self
        self._httpd = httpd
        self._thread = threading.Thread(
            target=httpd.serve_forever,
            kwargs={"poll_interval": 0.05},
            name="scripted-openai",
            daemon=True,
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving; replies still sleeping in ``queue_slow`` are cut short."""
        httpd, self._httpd = self._httpd, None
        if httpd is None:
            return
        self._stopping.set()
        httpd.shutdown()
        httpd.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def port(self) -> int:
        if self._httpd is None:
            raise RuntimeError("the scripted OpenAI server is not running; call start() first")
        return int(self._httpd.server_address[1])

    @property
    def base_url(self) -> str:
        """``http://127.0.0.1:PORT/v1``, what ``OPENAI_BASE_URL`` should be set to."""
        return f"http://127.0.0.1:{self.port}/v1"

    # --- scripting ------------------------------------------------------------------

    def queue(
        self,
        content: Any = "",
        *,
        usage: tuple[int, int] | None = None,
        usage_body: Mapping[str, Any] | None = None,
        report_usage: bool = True,
        model: str | None = None,
        finish_reason: str = "stop",
        chunks: Sequence[str] | None = None,
        chunk_delay_s: float = 0.0,
    ) -> None:
        """Queue a completion. ``content`` that is not a string is sent as its JSON dump.

        ``usage=(prompt_tokens, completion_tokens)``, sent as given (negative or
        absurd counts included, to test how a client copes); None estimates it
        from the text (about 4 characters a token). ``usage_body`` is sent as the
        ``usage`` object verbatim (fields missing or of the wrong type).
        ``report_usage=False`` leaves the ``usage`` field out, as some servers
        do. ``model`` overrides the echo of the requested model.

        Streamed (a request with ``"stream": true``): ``chunks`` are the pieces the
        content is sent in (their concatenation is the content; by default a few
        pieces of about equal length), each after ``chunk_delay_s``.
        """
        text = content if isinstance(content, str) else json.dumps(content)
        if chunks is not None:
            text = "".join(chunks)
        self._push(
            ScriptedReply(
                200,
                None,
                content=text,
                usage=usage,
                usage_body=usage_body,
                report_usage=report_usage,
                model=model,
                finish_reason=finish_reason,
                chunks=tuple(chunks) if chunks is not None else None,
                chunk_delay_s=chunk_delay_s,
            )
        )

    def queue_error(
        self,
        status: int,
        *,
        message: str | None = None,
        retry_after: float | None = None,
        error_type: str | None = None,
        code: str | None = None,
    ) -> None:
        """Queue an HTTP error in OpenAI's error format; ``retry_after`` sets the header.

        ``queue_error(429, retry_after=20)`` is a rate limit asking the client to
        wait 20 s before trying again (the openai client honours it).
        """
        headers = {"Retry-After": f"{retry_after:g}"} if retry_after is not None else {}
        default_type = {429: "rate_limit_error", 401: "authentication_error"}.get(
            status, "server_error" if status >= 500 else "invalid_request_error"
        )
        text = message or f"scripted error {status}"
        body = _error_body(text, error_type=error_type or default_type, code=code)
        self._push(ScriptedReply(status, body, headers=headers))

    def queue_slow(self, seconds: float, content: Any = "", **kwargs: Any) -> None:
        """Queue a completion sent only after ``seconds`` (to trip client timeouts)."""
        self.queue(content, **kwargs)
        with self._lock:
            self._replies[-1] = dataclasses.replace(self._replies[-1], delay_s=seconds)

    def queue_malformed(self, body: bytes = b'{"id": "chatcmpl-broken", "choices": [') -> None:
        """Queue a 200 whose body is not valid JSON (streamed: an event whose data is ``body``)."""
        self._push(ScriptedReply(200, body))

    def queue_cut(self, content: Any = "", *, after_chunks: int = 1, **kwargs: Any) -> None:
        """Queue a completion whose connection drops before it is complete: streamed, after
        ``after_chunks`` content chunks; not streamed, after half the body."""
        self.queue(content, **kwargs)
        with self._lock:
            self._replies[-1] = dataclasses.replace(self._replies[-1], cut_after=after_chunks)

    def queue_embedding_error(self, status: int = 500) -> None:
        """Make the next ``/v1/embeddings`` request fail with ``status`` (no retry asked for)."""
        with self._lock:
            self._embedding_errors.append(status)

    def _push(self, reply: ScriptedReply) -> None:
        with self._lock:
            self._replies.append(reply)

    @property
    def pending(self) -> int:
        """How many scripted replies have not been used yet."""
        with self._lock:
            return len(self._replies)

    def reset(self) -> None:
        """Forget queued replies and recorded requests."""
        with self._lock:
            self._replies.clear()
            self._embedding_errors.clear()
            self.embedding_requests.clear()
            self.requests.clear()
            self.request_headers.clear()

    # --- serving --------------------------------------------------------------------

    def _handle_completion(self, handler: _Handler, body: Any) -> None:
        with self._lock:
            self.requests.append(body)
            self.request_headers.append({k.lower(): v for k, v in handler.headers.items()})
        if (
            self.api_key is not None
            and handler.headers.get("Authorization") != f"Bearer {self.api_key}"
        ):
            handler._send(
                401,
                _error_body(
                    "invalid API key", error_type="authentication_error", code="invalid_api_key"
                ),
            )
            return
        if not isinstance(body, dict):
            handler._send(
                400,
                _error_body(
                    "request body must be a JSON object", error_type="invalid_request_error"
                ),
            )
            return
        response_format = body.get("response_format")
        refused = isinstance(response_format, dict) and response_format.get("type") == "json_schema"
        if refused and not self.supports_json_schema:
            message = "Invalid parameter: 'response_format' of type 'json_schema' is not supported with this model."
            handler._send(
                400,
                _error_body(message, error_type="invalid_request_error", param="response_format"),
            )
            return
        with self._lock:
            reply = self._replies.popleft() if self._replies else None
        if reply is None:
            message = (
                f"no reply was scripted for request #{len(self.requests)} (model {body.get('model')!r}); "
                "call server.queue(...) before the client calls the server"
            )
            handler._send(
                500, _error_body(message, error_type="server_error"), {"x-should-retry": "false"}
            )
            return
        if reply.delay_s and self._stopping.wait(reply.delay_s):
            return
        streamed = bool(body.get("stream"))
        try:
            if reply.content is None and streamed and reply.status == 200 and isinstance(reply.body, bytes):
                handler._start_events()  # malformed: an event whose data is not JSON
                handler._event(reply.body)
                handler._end_events()
            elif reply.content is None:
                handler._send(reply.status, reply.body, reply.headers)
            elif streamed:
                self._stream(handler, body, reply)
            else:
                handler._send(200, self._completion(body, reply), cut=reply.cut_after is not None)
        except (BrokenPipeError, ConnectionResetError):  # the client hung up (a deadline): nothing to do
            handler.close_connection = True

    def _handle_embeddings(self, handler: _Handler, body: Any) -> None:
        with self._lock:
            self.embedding_requests.append(body)
            status = self._embedding_errors.popleft() if self._embedding_errors else None
        if self.api_key is not None and handler.headers.get("Authorization") != f"Bearer {self.api_key}":
            handler._send(401, _error_body("invalid API key", error_type="authentication_error",
                                           code="invalid_api_key"))
            return
        if status is not None:
            handler._send(status, _error_body(f"scripted embeddings error {status}", error_type="server_error"),
                          {"x-should-retry": "false"})
            return
        texts = body.get("input") if isinstance(body, dict) else None
        if isinstance(texts, str):
            texts = [texts]
        if not isinstance(texts, list) or not texts or not all(isinstance(t, str) for t in texts):
            handler._send(400, _error_body("input must be a string or a non-empty list of strings",
                                           error_type="invalid_request_error", param="input"))
            return
        words = sum(len(t.split()) for t in texts)
        handler._send(200, {
            "object": "list",
            "model": body.get("model"),
            "data": [{"object": "embedding", "index": i, "embedding": list(self.embed(t))}
                     for i, t in enumerate(texts)],
            "usage": {"prompt_tokens": words, "total_tokens": words},
        })

    def _stream(self, handler: _Handler, request: Mapping[str, Any], reply: ScriptedReply) -> None:
        """The reply as Server-Sent Events of ``chat.completion.chunk`` objects."""
        content = reply.content or ""
        options = request.get("stream_options")
        include_usage = isinstance(options, dict) and bool(options.get("include_usage"))
        head: dict[str, Any] = {
            "id": f"chatcmpl-scripted-{next(self._ids)}",
            "object": "chat.completion.chunk",
            "created": int(time.time()),
            "model": reply.model or request.get("model") or "unknown",
            "system_fingerprint": None,
        }
        pieces = reply.chunks if reply.chunks else _split(content)
        handler._start_events()
        for index, piece in enumerate(pieces):
            if reply.chunk_delay_s and self._stopping.wait(reply.chunk_delay_s):
                handler.close_connection = True
                return
            if reply.cut_after is not None and index >= reply.cut_after:
                handler.close_connection = True  # no terminating chunk: the body is incomplete
                return
            delta: dict[str, Any] = {"content": piece}
            if index == 0:
                delta = {"role": "assistant", **delta}
            last = index == len(pieces) - 1
            chunk = {**head, "choices": [{"index": 0, "delta": delta, "logprobs": None,
                                          "finish_reason": reply.finish_reason if last else None}]}
            if include_usage:
                chunk["usage"] = None
            handler._event(json.dumps(chunk).encode())
        usage = self._usage(request, reply, content)
        if include_usage and usage is not None:
            handler._event(json.dumps({**head, "choices": [], "usage": usage}).encode())
        handler._event(b"[DONE]")
        handler._end_events()

    def _usage(self, request: Mapping[str, Any], reply: ScriptedReply, content: str) -> dict[str, Any] | None:
        """The ``usage`` object to report (None: leave it out)."""
        if not reply.report_usage:
            return None
        if reply.usage_body is not None:
            return dict(reply.usage_body)
        if reply.usage is not None:
            prompt, completion = reply.usage
        else:
            messages = request.get("messages") or []
            prompt = sum(
                _estimate_tokens(str(m.get("content") or "")) for m in messages if isinstance(m, dict)
            )
            completion = _estimate_tokens(content)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    def _completion(self, request: Mapping[str, Any], reply: ScriptedReply) -> dict[str, Any]:
        content = reply.content or ""
        out: dict[str, Any] = {
            "id": f"chatcmpl-scripted-{next(self._ids)}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": reply.model or request.get("model") or "unknown",
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": content, "refusal": None},
                    "finish_reason": reply.finish_reason,
                    "logprobs": None,
                }
            ],
        }
        usage = self._usage(request, reply, content)
        if usage is not None:
            out["usage"] = usage
        return out


OpenAIServer = ScriptedOpenAIServer
"""The short name ``agentkeel.testing`` exports."""
