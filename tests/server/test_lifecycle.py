"""Operating the service: the queue bound (429 with Retry-After), SIGTERM during a run (the
run pauses at its next step, the server exits, nothing is lost) and resuming it on a new
server, and what a stopped server leaves in the journal."""

from __future__ import annotations

import json
import signal
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any

import httpx

from tests.server.conftest import LiveServer, start_server


def _wait_for(predicate: Any, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def _run_row(home: Path, run_id: str) -> tuple[str, str]:
    with sqlite3.connect(home / "agentkeel.db") as conn:
        row = conn.execute("SELECT status, owner FROM runs WHERE run_id = ?", (run_id,)).fetchone()
    assert row is not None
    return row[0], row[1]


def test_a_full_queue_answers_429_with_retry_after(tmp_path: Path) -> None:
    server = start_server(tmp_path, max_inflight=1, max_queue=1)
    try:
        with server.client("alice") as client:
            first = client.post("/v1/runs", json={"message": "slow 1 x 1.5"})
            second = client.post("/v1/runs", json={"message": "slow 1 x 0.1"})
            assert first.status_code == second.status_code == 202
            assert second.json()["status"] == "queued"
            third = client.post("/v1/runs/wait", json={"message": "slow 1 x 0.1"})
            assert third.status_code == 429, third.text
            assert third.headers["content-type"] == "application/problem+json"
            assert int(third.headers["retry-after"]) >= 1
            assert "max_inflight = 1" in third.json()["detail"]
            with server.client("root") as root:
                from agentkeel.server.metrics import metric_value

                text = root.get("/metrics").text
                assert metric_value(text, "agentkeel_queue_depth") == 1
                assert metric_value(text, "agentkeel_runs_inflight") == 1
                assert metric_value(text, "agentkeel_overload_refusals_total") == 1
            second_id = second.json()["run_id"]
            _wait_for(lambda: client.get(f"/v1/runs/{second_id}").status_code == 200
                      and client.get(f"/v1/runs/{second_id}").json()["status"] == "succeeded")
            # room again: accepted
            assert client.post("/v1/runs/wait", json={"message": "slow 1 x 0"}).json()["status"] == "succeeded"
    finally:
        server.stop()


def test_sigterm_during_a_run_pauses_it_and_a_new_server_resumes_it(tmp_path: Path) -> None:
    server = start_server(tmp_path)
    waited: dict[str, Any] = {}
    with server.client("alice") as client:
        run_id = client.post("/v1/runs", json={"message": "slow 3 x 1"}).json()["run_id"]
        queued_behind = None

        def wait_client() -> None:  # a /wait call in flight when the signal comes
            with server.client("carol") as carol:
                waited["response"] = carol.post("/v1/runs/wait", json={"message": "slow 4 x 1"})

        thread = threading.Thread(target=wait_client)
        thread.start()
        _wait_for(lambda: any(m == f"do {run_id}:1" for m in server.marks()), timeout=30)
        started = time.monotonic()
        code = server.stop(signal.SIGTERM, timeout=60)
        took = time.monotonic() - started
        thread.join(30)
        del queued_behind
    assert code in (0, -signal.SIGTERM), server.output()
    assert took < 10, f"shutdown took {took:.1f}s"  # the step in flight finished; no new step started
    response = waited["response"]
    assert response.status_code == 200, response.text
    paused = response.json()
    assert paused["status"] == "running"  # paused at a step boundary, resumable
    assert "shutting down" in paused["message"]
    assert _run_row(server.home, run_id) == ("running", "")  # lease released
    assert _run_row(server.home, paused["run_id"]) == ("running", "")
    done_before = [m for m in server.marks() if run_id in m]
    assert f"do {run_id}:3" not in done_before

    again = start_server(tmp_path)  # the same home: the journal and keys survive
    try:
        with again.client("alice") as client:
            resumed = client.post(f"/v1/runs/{run_id}/resume")
            assert resumed.status_code == 200, resumed.text
            assert resumed.json()["status"] == "succeeded"
        with again.client("carol") as carol:
            assert carol.post(f"/v1/runs/{paused['run_id']}/resume").json()["status"] == "succeeded"
        marks = [m for m in again.marks() if run_id in m]
        assert sorted(marks) == [f"do {run_id}:{i}" for i in (1, 2, 3)]  # each step took effect once
    finally:
        again.stop()


def test_sigterm_refuses_new_runs_while_draining(tmp_path: Path) -> None:
    server = start_server(tmp_path, grace=5)
    with server.client("alice") as client:
        run_id = client.post("/v1/runs", json={"message": "slow 2 x 1.5"}).json()["run_id"]
        _wait_for(lambda: _has_intent(server, run_id))
        server.process.send_signal(signal.SIGTERM)
        time.sleep(0.3)
        try:
            late = client.post("/v1/runs", json={"message": "slow 1 x 0"})
        except httpx.TransportError:
            late = None  # the listening socket is already closed: refused all the same
        if late is not None:
            assert late.status_code == 503 and "retry-after" in late.headers
    server.process.wait(30)
    status, owner = _run_row(server.home, run_id)
    assert status == "running" and owner == ""


def _has_intent(server: LiveServer, run_id: str) -> bool:
    try:
        with sqlite3.connect(server.home / "agentkeel.db") as conn:
            return conn.execute("SELECT 1 FROM steps WHERE run_id = ? AND phase = 'intent'",
                                (run_id,)).fetchone() is not None
    except sqlite3.Error:
        return False


def test_stream_of_a_run_paused_by_shutdown_ends_with_its_state(tmp_path: Path) -> None:
    server = start_server(tmp_path)
    events: list[str] = []
    with server.client("alice") as client:
        run_id = client.post("/v1/runs", json={"message": "slow 3 x 0.8"}).json()["run_id"]

        def follow() -> None:
            with server.client("alice") as follower, follower.stream("GET", f"/v1/runs/{run_id}/stream") as s:
                for line in s.iter_lines():
                    if line.startswith("data: "):
                        events.append(json.loads(line[6:])["kind"])

        thread = threading.Thread(target=follow)
        thread.start()
        _wait_for(lambda: "step_started" in events)
        server.stop(signal.SIGTERM)
        thread.join(30)
    assert events[-1] == "run_finished"
