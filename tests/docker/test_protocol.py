"""The host side of the runner protocol, without Docker: per-call keys, authenticated replies
(HMAC-SHA256 over the exact reply bytes), bounded decoding, stale images, and the runner's own
refusal to serve where it cannot protect its reply channel."""

from __future__ import annotations

import hashlib
import hmac
import importlib.util
import io
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from agentkeel.errors import SandboxError, ToolError
from agentkeel.sandbox.docker import protocol
from agentkeel.sandbox.docker.container import Exchange
from agentkeel.sandbox.docker.images import protocol_problem
from agentkeel.sandbox.docker.settings import RUNNER_PROTOCOL, Limits

LIMITS = Limits()


def reply_body(**fields: Any) -> bytes:
    reply = {"v": RUNNER_PROTOCOL, "ok": True, "value": 42, "exit_code": 0, "stdout": "", "stderr": "",
             "stdout_truncated": False, "stderr_truncated": False, "duration_s": 0.01, **fields}
    return json.dumps(reply, separators=(",", ":")).encode()


def signed(key: bytes, body: bytes) -> Exchange:
    mac = hmac.new(key, body, hashlib.sha256).hexdigest().encode()
    return Exchange(mac + b" " + body + b"\n", b"")


def parse(ex: Exchange, key: bytes) -> dict[str, Any]:
    return protocol.parse_reply(ex, "tool 't'", key, LIMITS)


def test_each_request_carries_its_own_random_key() -> None:
    first = protocol.tool_request("m:f", {"a": 1}, False, 5.0, LIMITS)
    second = protocol.code_request("print(1)", 5.0, LIMITS)
    assert len(first.key) == protocol.KEY_BYTES == 32 and first.key != second.key
    for request in (first, second):
        sent = json.loads(request.line)
        assert sent["v"] == RUNNER_PROTOCOL and sent["key"] == request.key.hex()
    assert first.key.hex() not in repr(first)  # kept out of logs


def test_a_reply_with_the_right_mac_is_accepted() -> None:
    key = os.urandom(32)
    assert parse(signed(key, reply_body()), key)["value"] == 42
    assert protocol.value_of(parse(signed(key, reply_body(value=[0.5, None])), key), "t", LIMITS) == [0.5, None]


def test_a_reply_without_a_mac_is_refused_as_a_possible_forgery() -> None:
    key = os.urandom(32)
    with pytest.raises(SandboxError, match=r"carries no MAC.*forged") as info:
        parse(Exchange(reply_body() + b"\n", b""), key)
    assert not isinstance(info.value, ToolError)  # not retryable, not the tool's failure
    for line in (b"", b"garbage", b"x" * 64 + b" " + reply_body(), b"ABCDEF" * 10 + b"abcd " + reply_body()):
        with pytest.raises(SandboxError, match="carries no MAC"):
            parse(Exchange(line + b"\n", b""), key)


def test_a_reply_with_a_wrong_mac_is_refused() -> None:
    key = os.urandom(32)
    with pytest.raises(SandboxError, match=r"wrong MAC.*forged"):
        parse(signed(os.urandom(32), reply_body()), key)  # another call's key
    good = signed(key, reply_body(value=1)).stdout
    tampered = good.replace(b'"value":1', b'"value":2')
    with pytest.raises(SandboxError, match="wrong MAC"):
        parse(Exchange(tampered, b""), key)
    with pytest.raises(SandboxError, match="wrong MAC"):
        parse(Exchange(good[:64] + b" " + reply_body() + b" ", b""), key)  # trailing byte: not the exact bytes


def test_a_stale_runner_is_told_apart_from_a_forgery() -> None:
    old = json.dumps({"v": 2, "ok": False, "error": {"kind": "bad_request", "message": "protocol version 3"}})
    with pytest.raises(SandboxError, match=r"speaks protocol 2, this agentkeel speaks .*rebuild"):
        parse(Exchange(old.encode() + b"\n", b""), os.urandom(32))
    key = os.urandom(32)
    with pytest.raises(SandboxError, match=r"speaks protocol 99.*rebuild"):
        parse(signed(key, reply_body(v=99)), key)


def test_images_built_for_another_protocol_are_refused_with_rebuild_advice() -> None:
    assert protocol_problem("agentkeel/plugin-pycode:0.1.0", {"io.agentkeel.protocol": str(RUNNER_PROTOCOL)}) is None
    assert protocol_problem("my/custom:1", {}) is None  # unlabelled: judged by its replies
    stale = protocol_problem("agentkeel/plugin-pycode:0.1.0", {"io.agentkeel.protocol": "2"})
    assert stale is not None and "protocol 2" in stale and "agentkeel sandbox build pycode" in stale
    sandbox = protocol_problem("agentkeel/sandbox-python:latest", {"io.agentkeel.protocol": "2"})
    assert sandbox is not None and "rebuild it with `agentkeel sandbox build`" in sandbox


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (b"[" * 100_000 + b"]" * 100_000, "nested more than"),
        (b"[" * 200 + b"]" * 200, "nested more than"),
        (b'{"score":NaN}', "value.score: NaN is not a JSON number"),
        (b'{"score":-Infinity}', "value.score: -Infinity is not a JSON number"),
        (b'"\\ud800"', "lone surrogate"),
    ],
    ids=["100000-deep", "200-deep", "nan", "infinity", "surrogate"],
)
def test_an_authenticated_reply_the_host_does_not_accept_is_a_clean_tool_error(value: bytes, expected: str) -> None:
    key = os.urandom(32)
    body = reply_body(value="VALUE").replace(b'"VALUE"', value)
    with pytest.raises(ToolError, match=expected) as info:
        parse(signed(key, body), key)
    assert info.value.retryable is False and "tool 't'" in str(info.value)


def test_an_oversized_reply_is_refused_before_it_is_parsed() -> None:
    key = os.urandom(32)
    small = Limits(result_limit=1000, output_limit=100)
    body = reply_body(value="x" * (protocol.max_reply_bytes(small) + 10))
    with pytest.raises(ToolError, match="more than the limit"):
        protocol.parse_reply(signed(key, body), "tool 't'", key, small)


# --- the runner's side ----------------------------------------------------------------


@pytest.fixture(scope="module")
def runner_context(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from agentkeel.sandbox.docker.build import sandbox_context

    return sandbox_context(tmp_path_factory.mktemp("sandbox-python"))


@pytest.fixture
def runner(runner_context: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location("agentkeel_runner_protocol_test", runner_context / "runner.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_runners_reply_verifies_on_the_host(runner: ModuleType, monkeypatch: pytest.MonkeyPatch) -> None:
    request = json.loads(protocol.tool_request("m:f", {}, False, 5.0, LIMITS).line)
    key = runner._take_key(request)
    assert key is not None and "key" not in request  # what the worker gets has no key
    out = io.BytesIO()
    monkeypatch.setattr(sys, "stdout", io.TextIOWrapper(out))
    runner._emit({"v": runner.PROTOCOL, "ok": True, "value": {"x": 1.5}, "stdout": "", "stderr": ""}, key)
    reply = parse(Exchange(out.getvalue(), b""), key)
    assert reply["value"] == {"x": 1.5}
    assert runner._take_key({"key": "zz" * 32}) is None and runner._take_key({"key": "ab"}) is None
    assert runner._take_key({}) is None


def test_the_runner_forwards_a_nan_for_the_host_to_refuse(runner: ModuleType, monkeypatch: pytest.MonkeyPatch) -> None:
    key = os.urandom(32)
    out = io.BytesIO()
    monkeypatch.setattr(sys, "stdout", io.TextIOWrapper(out))
    runner._emit({"v": runner.PROTOCOL, "ok": True, "value": {"score": float("nan")}}, key)
    with pytest.raises(ToolError, match=r"value\.score: NaN is not a JSON number"):
        parse(Exchange(out.getvalue(), b""), key)


def test_the_runner_refuses_to_serve_unless_it_is_pid1(runner_context: Path) -> None:
    """Outside a container (not PID 1) the runner starts no worker and says why."""
    done = subprocess.run([sys.executable, "-I", "-B", str(runner_context / "runner.py")], input=b"",
                          capture_output=True, timeout=60, check=False)
    assert done.returncode == 70
    assert b"refusing to serve" in done.stderr and b"not the container's PID 1" in done.stderr
    assert b"agentkeel-runner-ready" not in done.stderr and done.stdout == b""


def test_a_failing_prctl_is_fatal(runner: ModuleType, monkeypatch: pytest.MonkeyPatch) -> None:
    import ctypes

    class FakeLibc:
        def prctl(self, *args: int) -> int:
            return -1

    monkeypatch.setattr(ctypes, "CDLL", lambda *a, **k: FakeLibc())
    with pytest.raises(runner.Unsafe, match="PR_SET_DUMPABLE"):
        runner._set_non_dumpable()

    def no_libc(*args: Any, **kwargs: Any) -> Any:
        raise OSError("no libc here")

    monkeypatch.setattr(ctypes, "CDLL", no_libc)
    with pytest.raises(runner.Unsafe, match="no libc here"):
        runner._set_non_dumpable()


def test_the_reaper_reaps_orphans_but_leaves_the_workers_status_to_popen(runner: ModuleType) -> None:
    worker = subprocess.Popen([sys.executable, "-c", "raise SystemExit(7)"])
    orphan = os.posix_spawn("/bin/sh", ["sh", "-c", "exit 3"], dict(os.environ))

    def zombie(pid: int) -> bool:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"

    deadline = time.monotonic() + 30
    while not (zombie(worker.pid) and zombie(orphan)) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert zombie(worker.pid) and zombie(orphan)
    runner._reap_orphans()  # the worker is not known yet: nothing is reaped
    assert zombie(orphan)
    runner._WORKER[:] = [worker]
    try:
        runner._reap_orphans()
        with pytest.raises(ChildProcessError):
            os.waitpid(orphan, os.WNOHANG)  # reaped
        assert worker.wait(timeout=10) == 7  # the worker's exit status is still Popen's
    finally:
        runner._WORKER[:] = []
