"""Replicas on one PostgreSQL and one Redis (real servers on loopback ports): a run submitted
to one replica is seen, followed (its events streamed, Last-Event-ID included) and cancelled
through another; the key made once works on every replica."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from tests.server.conftest import LiveServer, start_server


def _events(server: LiveServer, principal: str, run_id: str, after: int | None = None) -> list[tuple[int, str]]:
    headers = {"Last-Event-ID": str(after)} if after is not None else {}
    out: list[tuple[int, str]] = []
    with server.client(principal) as client, client.stream("GET", f"/v1/runs/{run_id}/stream",
                                                           headers=headers) as stream:
        assert stream.status_code == 200
        number = 0
        for line in stream.iter_lines():
            if line.startswith("id: "):
                number = int(line[4:])
            elif line.startswith("data: "):
                body: Any = json.loads(line[6:])
                out.append((number, body["kind"]))
    return out


def test_a_run_on_one_replica_is_followed_and_seen_on_another(tmp_path: Path, pg_url: str, redis_url: str) -> None:
    a = start_server(tmp_path / "a", store_url=pg_url, redis_url=redis_url)
    b = start_server(tmp_path / "b", store_url=pg_url, redis_url=redis_url)
    b.keys = a.keys  # one key store: the keys made for a work on b
    try:
        with a.client("alice") as client:
            run_id = client.post("/v1/runs", json={"message": "slow 3 x 0.3"}).json()["run_id"]
        time.sleep(0.2)
        followed = _events(b, "alice", run_id)  # on b, while a runs it
        kinds = [k for _, k in followed]
        assert kinds[0] == "run_started" and kinds[-1] == "run_finished"
        assert kinds.count("step_finished") == 3
        assert [n for n, _ in followed] == list(range(1, len(followed) + 1))
        replay = _events(b, "alice", run_id, after=4)
        assert [n for n, _ in replay] == list(range(5, len(followed) + 1))
        with b.client("alice") as other:
            assert other.get(f"/v1/runs/{run_id}").json()["status"] == "succeeded"
            assert run_id in {r["run_id"] for r in other.get("/v1/runs").json()}
        with b.client("carol") as carol:
            assert carol.get(f"/v1/runs/{run_id}/stream").status_code == 404
    finally:
        a.stop()
        b.stop()
