"""One child protocol: the subprocess child and the in-container runner encode a tool's
outcome with ``agentkeel.sandbox.envelope``, and both hosts decode it with the same module.

The first tests run both children as real processes on this host (no Docker):
the subprocess child as the subprocess backend starts it, and the runner's
worker (``runner.py --child``) from the sandbox image's build context. The
last one compares what the runner inside a real container answers.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from agentkeel.errors import ToolError
from agentkeel.sandbox import envelope

HERE = Path(__file__).parent
TOOLS_DIR = HERE / "sandbox_testtools"
CHILD_MODULE = "agentkeel.sandbox.subprocess.child"

# Failing tools of agentkeel_abuse_tools that both children can run on this host.
FAILING = ["raises", "refuses", "refuses_custom", "refuses_async", "non_json"]


def _import_path() -> list[str]:
    return [str(TOOLS_DIR), *(p for p in sys.path if p)]


def subprocess_child(target: str, args: dict[str, Any] | None = None) -> dict[str, Any]:
    """The envelope the subprocess sandbox's child writes for one call."""
    request = {"tool": target, "args": args or {}, "sys_path": _import_path()}
    done = subprocess.run([sys.executable, "-m", CHILD_MODULE], input=json.dumps(request).encode(),
                          capture_output=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr.decode()
    return json.loads(done.stdout)  # type: ignore[no-any-return]


@pytest.fixture(scope="module")
def runner_context(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The sandbox image's build context, assembled as `agentkeel sandbox build` does."""
    from agentkeel.sandbox.docker.build import sandbox_context

    return sandbox_context(tmp_path_factory.mktemp("sandbox-python"))


def runner_child(context: Path, target: str, args: dict[str, Any] | None = None) -> dict[str, Any]:
    """The envelope the in-container runner's worker writes for one call (run here, uncontained)."""
    result_r, result_w = os.pipe()
    ready_r, ready_w = os.pipe()
    env = {"PATH": os.environ.get("PATH", os.defpath), "PYTHONPATH": os.pathsep.join(_import_path())}
    proc = subprocess.Popen(
        [sys.executable, "-B", str(context / "runner.py"), "--child", str(result_w), str(ready_w)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env,
        pass_fds=(result_w, ready_w),
    )
    os.close(result_w)
    os.close(ready_w)
    try:
        assert os.read(ready_r, 1) == b"1", "the runner's worker did not get ready"
    finally:
        os.close(ready_r)
    request = {"kind": "tool", "target": target, "args": args or {}, "is_async": False}
    _, err = proc.communicate(json.dumps(request).encode(), timeout=120)
    with os.fdopen(result_r, "rb") as fh:
        data = fh.read()
    assert data, err.decode()
    return json.loads(data)  # type: ignore[no-any-return]


@pytest.mark.parametrize("name", FAILING)
def test_both_children_encode_the_same_exception_identically(runner_context: Path, name: str) -> None:
    target = f"agentkeel_abuse_tools:{name}"
    from_subprocess = subprocess_child(target)
    from_runner = runner_child(runner_context, target)
    assert from_runner == from_subprocess
    assert set(from_runner) == {"ok", "error"} and from_runner["ok"] is False
    assert set(from_runner["error"]) == {"kind", "type", "message", "retryable", "traceback"}


def test_the_envelope_says_what_the_tool_raised(runner_context: Path) -> None:
    refusal = runner_child(runner_context, "agentkeel_abuse_tools:refuses")["error"]
    assert refusal["kind"] == "exception"
    assert refusal["type"] == "agentkeel.errors.ToolError"
    assert refusal["message"] == "order 1001 was already refunded"
    assert refusal["retryable"] is False
    tb = refusal["traceback"]
    assert tb.startswith("Traceback (most recent call last):") and "agentkeel_abuse_tools.py" in tb
    assert "envelope.py" not in tb and "runner.py" not in tb  # starts at the tool's frame
    custom = runner_child(runner_context, "agentkeel_abuse_tools:refuses_custom")["error"]
    assert custom["type"] == "agentkeel_abuse_tools.Refusal" and custom["retryable"] is False
    plain = runner_child(runner_context, "agentkeel_abuse_tools:raises")["error"]
    assert plain["type"] == "ValueError" and plain["retryable"] is True
    assert runner_child(runner_context, "agentkeel_abuse_tools:async_add", {"a": 1, "b": 2}) == {
        "ok": True, "value": 3}


def _load_runner(context: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location("agentkeel_runner_under_test", context / "runner.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_runner_and_host_speak_the_same_protocol(runner_context: Path) -> None:
    from agentkeel.sandbox.docker.settings import RUNNER_PROTOCOL

    runner = _load_runner(runner_context)
    assert runner.PROTOCOL == RUNNER_PROTOCOL
    assert runner.envelope.KINDS == envelope.KINDS  # the copy in the context is this module
    dockerfile = (runner_context / "Dockerfile").read_text()
    assert f'io.agentkeel.protocol="{RUNNER_PROTOCOL}"' in dockerfile
    assert "envelope.py" in dockerfile


def test_retryable_follows_the_exception() -> None:
    class Refusal(Exception):
        retryable = False

    class Odd(Exception):
        retryable = "no"  # not a bool: ignored

    cases = [(ToolError("gone", retryable=False), False), (ToolError("busy"), True), (Refusal("no"), False),
             (Odd("?"), True), (ValueError("bad"), True)]
    for exc, retryable in cases:
        decoded = envelope.decode(envelope.encode_exception(exc))
        assert isinstance(decoded, envelope.Failure)
        assert decoded.kind == "exception" and decoded.retryable is retryable, exc


def test_failures_around_the_tool_are_not_retryable() -> None:
    for kind in ("import", "bad_request", "bad_output", "result_too_large", "oom", "output_limit"):
        decoded = envelope.decode(envelope.dumps(envelope.failure(kind, "x")))
        assert isinstance(decoded, envelope.Failure) and decoded.retryable is False, kind
    assert envelope.decode(envelope.OUT_OF_MEMORY_ENVELOPE) == envelope.Failure(
        "oom", "MemoryError", "out of memory (MemoryError)", False, "")


def test_values_are_encoded_or_refused() -> None:
    assert envelope.decode(envelope.encode_value({"a": [1, 2.5, None]})) == envelope.Success({"a": [1, 2.5, None]})
    with pytest.raises(envelope.BadResultError, match="returned a set, which is not JSON"):
        envelope.encode_value({"s": {1}})
    with pytest.raises(envelope.BadResultError, match="not valid JSON"):
        envelope.encode_value(float("nan"))
    with pytest.raises(envelope.ResultTooLargeError, match="more than the limit of 100 bytes"):
        envelope.encode_value("x" * 200, max_bytes=100)


def test_decode_refuses_what_is_not_an_envelope() -> None:
    for data in (b"", b"not json", b"[]", b'{"ok": "yes"}', b'{"ok": false}', b'{"ok": false, "error": {}}'):
        with pytest.raises(envelope.MalformedEnvelopeError):
            envelope.decode(data)
    odd = envelope.decode({"ok": False, "error": {"kind": "from-the-future", "message": "?"}})
    assert isinstance(odd, envelope.Failure) and odd.kind == "internal"


def _raised(exc: Exception) -> Exception:
    try:
        raise exc
    except Exception as caught:  # noqa: BLE001 - the point is its traceback
        return caught


def test_describe_names_the_exception() -> None:
    failure = envelope.decode(envelope.encode_exception(_raised(ValueError("card declined"))))
    assert isinstance(failure, envelope.Failure)
    assert failure.describe("tool 'pay'") == "tool 'pay' raised ValueError: card declined"
    assert "Traceback" in failure.describe("tool 'pay'", traceback_limit=4000)
    assert envelope.format_traceback(ValueError("never raised")) == ""
    oom = envelope.decode(envelope.OUT_OF_MEMORY_ENVELOPE)
    assert isinstance(oom, envelope.Failure)
    assert oom.describe("tool 'x'") == "tool 'x': out of memory (MemoryError)"


@pytest.mark.docker
@pytest.mark.parametrize("name", ["refuses", "refuses_custom", "raises"])
def test_the_runner_in_a_container_encodes_like_the_subprocess_child(tools_image: str, name: str) -> None:
    from agentkeel.sandbox.docker import DockerBackend, DockerSettings, protocol
    from agentkeel.sandbox.docker.container import SandboxContainer
    from agentkeel.sandbox.docker.labels import container_labels

    target = f"agentkeel_abuse_tools:{name}"
    backend = DockerBackend(DockerSettings(pool_size=0))
    api = backend.client.get()
    limits = backend.settings.limits
    container = SandboxContainer.launch(api, tools_image, backend.settings, limits,
                                        container_labels(backend.owner, tools_image, False, name))
    request = protocol.tool_request(target, {}, False, 20, limits)
    try:
        exchange = container.exchange(request.line, time.monotonic() + 60, protocol.max_reply_bytes(limits))
    finally:
        container.destroy()
        backend.client.close()
    reply = protocol.parse_reply(exchange, name, request.key, limits)
    in_container = reply["error"]
    on_host = subprocess_child(target)["error"]
    tb_container, tb_host = in_container.pop("traceback"), on_host.pop("traceback")
    assert in_container == on_host
    assert tb_container.splitlines()[-1] == tb_host.splitlines()[-1]
    assert "agentkeel_abuse_tools.py" in tb_container
