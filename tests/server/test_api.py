"""The HTTP API through a real uvicorn server on a loopback port, with httpx: authentication,
ownership, runs (wait, background, stream, reconnect), cancel, approvals, sessions, tools,
costs, errors as problem documents, health and metrics."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from typing import Any

import httpx
from agentkeel.permissions.keys_sqlite import SQLiteKeyStore

from tests.server.conftest import REPO, LiveServer

PROBLEM = "application/problem+json"


def _events(response: httpx.Response, stop_after: int | None = None) -> list[tuple[int, str, dict[str, Any]]]:
    """(id, kind, body) of the numbered events of an SSE response (up to ``stop_after`` events)."""
    out: list[tuple[int, str, dict[str, Any]]] = []
    event_id, kind = 0, ""
    for line in response.iter_lines():
        if line.startswith("id: "):
            event_id = int(line[4:])
        elif line.startswith("event: "):
            kind = line[7:]
        elif line.startswith("data: "):
            out.append((event_id, kind, json.loads(line[6:])))
            if stop_after is not None and len(out) >= stop_after:
                break
    return out


def _audit(server: LiveServer) -> list[dict[str, Any]]:
    path = server.home / "audit.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


# --- authentication ----------------------------------------------------------------


def test_missing_wrong_revoked_and_expired_keys_get_401_and_are_audited(server: LiveServer) -> None:
    store = SQLiteKeyStore(server.home)
    revoked, record = store.create("alice", name="to revoke")
    store.revoke(record.key_id)
    expiring, _ = store.create("alice", name="short", expires_at=time.time() + 0.5)
    store.close()
    time.sleep(0.6)
    wrong = server.keys["alice"][:-4] + ("AAAA" if not server.keys["alice"].endswith("AAAA") else "BBBB")
    cases = {
        "no API key": {},
        "malformed key": {"Authorization": "Bearer nonsense"},
        "unknown key": {"Authorization": f"Bearer {wrong}"},
        "revoked": {"Authorization": f"Bearer {revoked}"},
        "expired": {"Authorization": f"Bearer {expiring}"},
        "basic": {"Authorization": "Basic YWxpY2U6cHc="},
    }
    with httpx.Client(base_url=server.url) as client:
        for why, headers in cases.items():
            response = client.get("/v1/runs", headers=headers)
            assert response.status_code == 401, (why, response.text)
            assert response.headers["content-type"] == PROBLEM
            assert response.headers["www-authenticate"] == "Bearer"
            assert response.json()["status"] == 401
    reasons = [r["reason"] for r in _audit(server) if r["action"] == "authenticate"]
    for expected in ("no API key", "malformed key", "unknown key", "revoked", "expired"):
        assert any(expected in r for r in reasons), (expected, reasons)
    logged = json.dumps(_audit(server))
    assert server.keys["alice"] not in logged and wrong.split("_", 2)[2][:12] not in logged  # no secret logged
    assert f"key {wrong.split('_')[1]}" in logged  # the key id is named


def test_the_body_cannot_name_another_user(server: LiveServer) -> None:
    with server.client("carol") as client:
        response = client.post("/v1/runs/wait", json={"message": "where is order 1003", "user_id": "root"})
        assert response.status_code == 422
        assert response.json()["errors"][0]["field"] == "/user_id"
        ok = client.post("/v1/runs/wait", json={"message": "where is order 1003"}).json()
        assert ok["status"] == "succeeded"
        with server.client("root") as admin:
            runs = admin.get("/v1/runs", params={"user": "carol"}).json()
        assert any(r["run_id"] == ok["run_id"] and r["user_id"] == "carol" for r in runs)


def test_another_principals_run_is_404_like_an_unknown_one(server: LiveServer) -> None:
    with server.client("alice") as alice, server.client("carol") as carol, server.client("root") as root:
        run_id = alice.post("/v1/runs/wait", json={"message": "where is order 1003"}).json()["run_id"]
        for method, path in (("GET", f"/v1/runs/{run_id}"), ("GET", f"/v1/runs/{run_id}/stream"),
                             ("POST", f"/v1/runs/{run_id}/cancel"), ("POST", f"/v1/runs/{run_id}/resume"),
                             ("POST", f"/v1/runs/{run_id}/rollback")):
            foreign = carol.request(method, path)
            unknown = carol.request(method, path.replace(run_id, "0123456789abcdef"))
            assert foreign.status_code == unknown.status_code == 404, (path, foreign.text)
            assert foreign.json()["detail"].replace(run_id, "X") == unknown.json()["detail"].replace(
                "0123456789abcdef", "X")
        assert run_id not in {r["run_id"] for r in carol.get("/v1/runs").json()}
        assert run_id in {r["run_id"] for r in alice.get("/v1/runs").json()}
        assert root.get(f"/v1/runs/{run_id}").json()["status"] == "succeeded"  # admin sees all
        assert carol.get("/v1/runs", params={"user": "alice"}).status_code == 403


def test_a_key_with_its_own_rate_limit(server: LiveServer) -> None:
    secret = server.key("carol", rate_limit=1.0)
    with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {secret}"}) as client:
        codes = [client.get("/v1/tools").status_code for _ in range(3)]
        assert codes[0] == 200 and 429 in codes
        limited = next(r for r in (client.get("/v1/tools") for _ in range(3)) if r.status_code == 429)
        assert int(limited.headers["retry-after"]) >= 1
        time.sleep(1.1)
        assert client.get("/v1/tools").status_code == 200


# --- runs ------------------------------------------------------------------------


def test_wait_background_and_get(server: LiveServer) -> None:
    with server.client("alice") as client:
        waited = client.post("/v1/runs/wait", json={"message": "where is order 1003", "session_id": "api"})
        assert waited.status_code == 200
        body = waited.json()
        assert body["status"] == "succeeded" and "1003" in body["answer"]
        assert [s["tool_name"] for s in body["steps"]] == ["lookup_order"]
        accepted = client.post("/v1/runs", json={"message": "is widget-1 in stock"})
        assert accepted.status_code == 202
        run_id = accepted.json()["run_id"]
        deadline = time.monotonic() + 20
        while (got := client.get(f"/v1/runs/{run_id}")).status_code == 404 or got.json()["status"] == "running":
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert got.json()["status"] == "succeeded" and "widget-1" in got.json()["answer"]


def test_stream_order_and_reconnect_with_last_event_id(server: LiveServer) -> None:
    with server.client("alice") as client:
        run_id = client.post("/v1/runs", json={"message": "slow 3 x 0.3"}).json()["run_id"]
        with client.stream("GET", f"/v1/runs/{run_id}/stream") as first:
            assert first.headers["content-type"].startswith("text/event-stream")
            head = _events(first, stop_after=4)  # then the connection drops
        last = head[-1][0]
        with client.stream("GET", f"/v1/runs/{run_id}/stream", headers={"Last-Event-ID": str(last)}) as again:
            tail = _events(again)
        with client.stream("GET", f"/v1/runs/{run_id}/stream") as replay:
            whole = _events(replay)
    ids = [e[0] for e in head + tail]
    assert ids == list(range(1, len(ids) + 1))  # nothing missed, nothing twice
    assert [(e[0], e[1]) for e in head + tail] == [(e[0], e[1]) for e in whole]
    kinds = [e[1] for e in whole]
    assert kinds[:2] == ["run_started", "plan_ready"]
    assert kinds.count("step_started") == kinds.count("step_finished") == 3
    assert kinds.index("answer") < kinds.index("run_finished") == len(kinds) - 1
    starts = [e[2]["data"]["step_id"] for e in whole if e[1] == "step_started"]
    finishes = [e[2]["data"]["step"]["step_id"] for e in whole if e[1] == "step_finished"]
    assert starts == finishes == [1, 2, 3]
    assert whole[-1][2]["data"]["response"]["status"] == "succeeded"


def test_post_stream_serves_and_streams(server: LiveServer) -> None:
    with server.client("alice") as client, client.stream(
            "POST", "/v1/runs/stream", json={"message": "where is order 1003"}) as response:
        events = _events(response)
    assert events[0][1] == "run_started" and events[-1][1] == "run_finished"
    assert "1003" in events[-1][2]["data"]["response"]["answer"]


def test_cancel_mid_run_compensates_completed_steps(server: LiveServer) -> None:
    with server.client("alice") as client:
        run_id = client.post("/v1/runs", json={"message": "slow 4 x 0.4"}).json()["run_id"]
        with client.stream("GET", f"/v1/runs/{run_id}/stream") as stream:
            for _, kind, body in _gen(stream):
                if kind == "step_finished" and body["data"]["step"]["step_id"] == 1:
                    break
        cancelled = client.post(f"/v1/runs/{run_id}/cancel", json={"reason": "changed my mind"})
        assert cancelled.status_code == 200, cancelled.text
        body = cancelled.json()
        assert body["status"] == "cancelled"
        statuses = {s["step_id"]: s["status"] for s in body["steps"]}
        assert statuses[1] == "compensated"
        assert all(statuses[i] in ("compensated", "skipped") for i in (2, 3, 4))
        done = [m.split(" ", 1)[1] for m in server.marks() if m.startswith("do ") and run_id in m]
        undone = [m.split(" ", 1)[1] for m in server.marks() if m.startswith("undo ") and run_id in m]
        assert done and sorted(done) == sorted(undone)  # every step that took effect was undone
        assert f"{run_id}:4" not in done
        assert client.get(f"/v1/runs/{run_id}").json()["status"] == "cancelled"
        again = client.post(f"/v1/runs/{run_id}/cancel")
        assert again.status_code == 409 and again.headers["content-type"] == PROBLEM
    assert any(r["action"] == "cancel" and r["run_id"] == run_id and r["principal"] == "alice"
               for r in _audit(server))


def _gen(stream: httpx.Response) -> Any:
    event_id, kind = 0, ""
    for line in stream.iter_lines():
        if line.startswith("id: "):
            event_id = int(line[4:])
        elif line.startswith("event: "):
            kind = line[7:]
        elif line.startswith("data: "):
            yield event_id, kind, json.loads(line[6:])


def test_rollback_and_resume_endpoints(server: LiveServer) -> None:
    with server.client("alice") as client:
        body = client.post("/v1/runs/wait", json={"message": "slow 2 x 0"}).json()
        run_id = body["run_id"]
        assert body["status"] == "succeeded"
        resumed = client.post(f"/v1/runs/{run_id}/resume")
        assert resumed.status_code == 200 and resumed.json()["status"] == "succeeded"  # finished: as it is
        rolled = client.post(f"/v1/runs/{run_id}/rollback").json()
        assert rolled["status"] == "rolled_back"
        assert sorted(m for m in server.marks() if run_id in m) == sorted(
            [f"do {run_id}:1", f"do {run_id}:2", f"undo {run_id}:1", f"undo {run_id}:2"])
        resolve = client.post(f"/v1/runs/{run_id}/resolve", json={"steps": {"1": "done"}})
        assert resolve.status_code == 409  # not in doubt
        bad = client.post(f"/v1/runs/{run_id}/resolve", json={"steps": {"x": "done"}})
        assert bad.status_code == 422


# --- approvals ---------------------------------------------------------------------


def test_approval_flow_over_http(server: LiveServer) -> None:
    with server.client("alice") as alice, server.client("bob") as bob, server.client("carol") as carol:
        waiting = alice.post("/v1/runs/wait", json={"message": "refund order 1003 if it has shipped"}).json()
        assert waiting["status"] == "waiting"
        run_id = waiting["run_id"]
        mine = [a for a in alice.get("/v1/approvals").json() if a["run_id"] == run_id]
        assert len(mine) == 1 and mine[0]["tool_name"] == "issue_refund" and mine[0]["status"] == "pending"
        assert run_id not in {a["run_id"] for a in carol.get("/v1/approvals").json()}
        assert run_id in {a["run_id"] for a in bob.get("/v1/approvals").json()}
        step = mine[0]["step_id"]
        assert carol.post(f"/v1/approvals/{run_id}/{step}", json={"decision": "approve"}).status_code == 404
        self_approval = alice.post(f"/v1/approvals/{run_id}/{step}", json={"decision": "approve"})
        assert self_approval.status_code == 403 and "approve" in self_approval.json()["detail"]
        assert bob.post(f"/v1/approvals/{run_id}/{step}", json={"decision": "maybe"}).status_code == 422
        decided = bob.post(f"/v1/approvals/{run_id}/{step}",
                           json={"decision": "approve", "reason": "checked", "resume": True})
        assert decided.status_code == 200, decided.text
        body = decided.json()
        assert body["status"] == "approved" and body["decided_by"] == "bob"
        assert body["run"]["status"] == "succeeded"
        twice = bob.post(f"/v1/approvals/{run_id}/{step}", json={"decision": "deny"})
        assert twice.status_code == 409


# --- sessions, tools, costs ----------------------------------------------------------


def test_sessions_turns_and_forget(server: LiveServer) -> None:
    with server.client("alice") as alice, server.client("carol") as carol:
        alice.post("/v1/runs/wait", json={"message": "where is order 1003", "session_id": "s-forget"})
        turns = alice.get("/v1/sessions/s-forget/turns").json()
        assert [t["role"] for t in turns] == ["user", "assistant"]
        assert turns[0]["content"] == "where is order 1003"
        assert carol.get("/v1/sessions/s-forget/turns").json() == []  # carol's own, empty session
        assert carol.get("/v1/sessions/s-forget/turns", params={"user": "alice"}).status_code == 403
        gone = alice.delete("/v1/sessions/s-forget").json()
        assert gone["turns"] == 2
        assert alice.get("/v1/sessions/s-forget/turns").json() == []
    assert any(r["action"] == "memory_forget" and "s-forget" in r["reason"] for r in _audit(server))


def test_tools_are_the_callers_own(server: LiveServer) -> None:
    with server.client("alice") as alice, server.client("carol") as carol:
        alice_tools = {t["name"]: t for t in alice.get("/v1/tools").json()}
        carol_tools = {t["name"] for t in carol.get("/v1/tools").json()}
    assert "issue_refund" in alice_tools and "issue_refund" not in carol_tools
    assert alice_tools["issue_refund"]["rollback"] == "cancel_refund"
    assert alice_tools["lookup_order"]["idempotent"] is True


def test_costs_are_the_callers_own_unless_admin(server: LiveServer) -> None:
    with server.client("carol") as carol, server.client("root") as root:
        carol.post("/v1/runs/wait", json={"message": "where is order 1003"})
        mine = carol.get("/v1/costs", params={"by": "user"}).json()
        assert [r["key"] for r in mine] == ["carol"]
        everyone = {r["key"] for r in root.get("/v1/costs", params={"by": "user"}).json()}
        assert {"carol", "alice"} <= everyone
        assert carol.get("/v1/costs", params={"by": "user", "user": "alice"}).status_code == 403
        assert carol.get("/v1/costs", params={"by": "colour"}).status_code == 422
        since = carol.get("/v1/costs", params={"since": "yesterday"})
        assert since.status_code == 422 and since.json()["errors"][0]["field"] == "query.since"
        tomorrow = carol.get("/v1/costs", params={"by": "tool", "since": str(time.time() + 86400)}).json()
        assert tomorrow == []


# --- bad input -----------------------------------------------------------------------


def test_bad_input_is_a_problem_document_never_a_500(server: LiveServer) -> None:
    with server.client("carol") as client:
        cases = [
            (b"{not json", 400), (b"[]", 422), (b'{"message": ""}', 422), (b'{"message": "   "}', 422),
            (b'{"message": 5}', 422), (b'{"message": "x", "budget_usd": -1}', 422),
            (b'{"message": "x", "budget_usd": 1e999}', 422), (b'{"message": "\\ud800"}', 422),
            (b'\xff\xfe', 400), (b'{"message": "x", "session_id": ""}', 422), (b"", 422),
        ]
        for body, code in cases:
            response = client.post("/v1/runs/wait", content=body, headers={"content-type": "application/json"})
            assert response.status_code == code, (body, response.status_code, response.text)
            assert response.headers["content-type"] == PROBLEM
            assert response.json()["status"] == code
        big = client.post("/v1/runs/wait", content=b'{"message": "' + b"a" * 70_000 + b'"}',
                          headers={"content-type": "application/json"})
        assert big.status_code == 413 and "max_body_bytes" in big.json()["detail"]
        chunked = client.post("/v1/runs/wait", content=iter([b'{"message": "', b"a" * 70_000, b'"}']),
                              headers={"content-type": "application/json"})
        assert chunked.status_code == 413
        assert client.get("/v1/nowhere").status_code == 404
        assert client.get("/v1/nowhere").headers["content-type"] == PROBLEM
        assert client.delete("/v1/runs").status_code == 405
        assert client.get("/v1/runs", params={"limit": "many"}).status_code == 422
        assert client.get("/v1/runs/" + "x" * 300).status_code in (404, 422)


# --- operations ---------------------------------------------------------------------------


def test_health_readiness_and_metrics(server: LiveServer) -> None:
    assert httpx.get(f"{server.url}/healthz").json() == {"status": "ok"}
    ready = httpx.get(f"{server.url}/readyz").json()
    assert ready["status"] == "ready" and set(ready["checks"]) == {"journal", "ledger", "keys"}
    assert httpx.get(f"{server.url}/metrics").status_code == 401
    with server.client("alice") as alice, server.client("root") as root:
        alice.post("/v1/runs/wait", json={"message": "where is order 1003"})
        assert alice.get("/metrics").status_code == 403
        text = root.get("/metrics").text
    from agentkeel.server.metrics import metric_value

    assert (metric_value(text, "agentkeel_runs_total", status="succeeded") or 0) >= 1
    assert (metric_value(text, "agentkeel_step_duration_seconds_count", tool="lookup_order",
                         status="succeeded") or 0) >= 1
    assert metric_value(text, "agentkeel_queue_depth") == 0
    assert (metric_value(text, "agentkeel_cost_usd_total", kind="tool", model="", tier="") or 0) > 0
    assert "agentkeel_breaker_state" in text
    assert (metric_value(text, "agentkeel_auth_failures_total", reason="no API key") or 0) >= 1


def test_openapi_lists_every_route(server: LiveServer) -> None:
    spec = httpx.get(f"{server.url}/openapi.json").json()
    paths = set(spec["paths"])
    for path in ("/v1/runs", "/v1/runs/wait", "/v1/runs/stream", "/v1/runs/{run_id}", "/v1/runs/{run_id}/stream",
                 "/v1/runs/{run_id}/cancel", "/v1/runs/{run_id}/resume", "/v1/runs/{run_id}/rollback",
                 "/v1/runs/{run_id}/resolve", "/v1/sessions/{session_id}/turns", "/v1/sessions/{session_id}",
                 "/v1/approvals", "/v1/approvals/{run_id}/{step_id}", "/v1/tools", "/v1/costs", "/healthz",
                 "/readyz", "/metrics", "/dashboard", "/v1/dashboard"):
        assert path in paths, path
    assert spec["components"]["securitySchemes"]["HTTPBearer"]["scheme"] == "bearer"


# --- the CLI as a client ------------------------------------------------------------------


def test_agentkeel_run_with_server(server: LiveServer) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AGENTKEEL_")}
    env |= {"AGENTKEEL_API_KEY": server.keys["alice"], "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-m", "agentkeel", "run", "slow 2 x 0.05", "--server", server.url],
                          capture_output=True, text=True, env=env, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[0] == "Did 2 slow steps."
    assert "step 2 slow_mark: succeeded" in proc.stderr
    as_json = subprocess.run([sys.executable, "-m", "agentkeel", "run", "where is order 1003", "--server",
                              server.url, "--json"], capture_output=True, text=True, env=env, timeout=60)
    assert json.loads(as_json.stdout)["status"] == "succeeded"
    env.pop("AGENTKEEL_API_KEY")
    no_key = subprocess.run([sys.executable, "-m", "agentkeel", "run", "x", "--server", server.url],
                            capture_output=True, text=True, env=env, timeout=60)
    assert no_key.returncode == 2 and "AGENTKEEL_API_KEY" in no_key.stderr
    env["AGENTKEEL_API_KEY"] = "ak_wrong"
    refused = subprocess.run([sys.executable, "-m", "agentkeel", "run", "x", "--server", server.url],
                             capture_output=True, text=True, env=env, timeout=60)
    assert refused.returncode == 2 and "401" in refused.stderr
