"""Three replicas on one PostgreSQL and one Redis: 300 concurrent requests from 5 users, each
with a daily budget that affords only a few of them. The spend settled per user, counted in
PostgreSQL, never exceeds the budget, and the refusals say which limit ran out."""

from __future__ import annotations

import asyncio
import collections
from pathlib import Path

import httpx
import psycopg

from tests.server.conftest import start_server

USERS = ("alice", "bob", "carol", "dave", "root")
DAILY = 0.02  # lookup_order costs 0.002: ten lookups a day each
BUDGETS = f"\n[budget]\nper_user_daily_usd = {DAILY}\n"


async def _fire(urls: list[str], keys: dict[str, str], n: int) -> list[tuple[str, int, dict[str, object]]]:
    limits = httpx.Limits(max_connections=400, max_keepalive_connections=400)
    async with httpx.AsyncClient(timeout=120.0, limits=limits) as client:
        async def one(i: int) -> tuple[str, int, dict[str, object]]:
            user = USERS[i % len(USERS)]
            url = urls[i % len(urls)]
            response = await client.post(f"{url}/v1/runs/wait", json={"message": "where is order 1003"},
                                         headers={"Authorization": f"Bearer {keys[user]}"})
            return user, response.status_code, response.json()

        return await asyncio.gather(*(one(i) for i in range(n)))


def test_300_requests_on_3_replicas_never_overspend_a_users_budget(tmp_path: Path, pg_url: str,
                                                                    redis_url: str) -> None:
    replicas = [start_server(tmp_path / name, store_url=pg_url, redis_url=redis_url, max_inflight=16,
                             max_queue=300, extra=BUDGETS) for name in ("a", "b", "c")]
    keys = replicas[0].keys
    try:
        results = asyncio.run(_fire([r.url for r in replicas], keys, 300))
    finally:
        for replica in replicas:
            replica.stop()
    assert all(code == 200 for _, code, _ in results), collections.Counter(code for _, code, _ in results)
    by_user: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
    for user, _, body in results:
        by_user[user][str(body["status"])] += 1
    with psycopg.connect(pg_url) as conn:
        spent = dict(conn.execute("SELECT user_id, sum(cost_usd) FROM ledger GROUP BY user_id").fetchall())
        reservations = conn.execute("SELECT count(*) FROM budget_reservations").fetchone()
    for user in USERS:
        assert spent.get(user, 0.0) <= DAILY + 1e-9, (user, spent)
        assert by_user[user]["succeeded"] == round(spent.get(user, 0.0) / 0.002)  # every success was paid for
        assert by_user[user]["succeeded"] >= 5  # the budget was used, not refused wholesale
        assert by_user[user]["budget_exhausted"] + by_user[user]["succeeded"] == 60
    assert reservations is not None and reservations[0] == 0  # every reservation settled or released
    refusal = next(body for _, _, body in results if body["status"] == "budget_exhausted")
    assert "per_user_daily_usd" in str(refusal["message"])


def test_redis_restarted_under_load_overspends_nothing_and_loses_no_run(tmp_path: Path, pg_url: str) -> None:
    from agentkeel.testing.services import RedisServer

    with RedisServer() as redis:
        replicas = [start_server(tmp_path / name, store_url=pg_url, redis_url=redis.url, max_inflight=8,
                                 max_queue=300, extra=f"\n[budget]\nper_user_daily_usd = {2 * DAILY}\n")
                    for name in ("a", "b", "c")]
        keys = replicas[0].keys
        try:
            async def load() -> list[tuple[str, int, dict[str, object]]]:
                urls = [r.url for r in replicas]
                before = await _fire(urls, keys, 50)
                redis.kill()  # Redis goes away between two waves of load...
                with httpx.Client() as client:
                    ready = client.get(f"{replicas[0].url}/readyz")
                during = await _fire(urls, keys, 50)
                redis.start()  # ...and comes back, empty, on the same port
                after = await _fire(urls, keys, 70)  # 14 each: more than the 10 the budget has left
                return [*before, *during, *after, ("probe", ready.status_code, ready.json())]

            results = asyncio.run(load())
        finally:
            for replica in replicas:
                replica.stop()
    probe = results.pop()
    assert probe[1] == 503 and "redis" in probe[2]["checks"]  # type: ignore[operator]
    assert all(code in (200, 429) for _, code, _ in results), collections.Counter(c for _, c, _ in results)
    answered = [body for _, code, body in results if code == 200]
    with psycopg.connect(pg_url) as conn:
        spent = dict(conn.execute("SELECT user_id, sum(cost_usd) FROM ledger GROUP BY user_id").fetchall())
        statuses = dict(conn.execute("SELECT run_id, status FROM runs").fetchall())
    for user in USERS:
        assert spent.get(user, 0.0) <= 2 * DAILY + 1e-9, (user, spent)
    for body in answered:  # every answered run is in the journal, finished
        assert statuses[str(body["run_id"])] == body["status"]
        assert body["status"] in ("succeeded", "failed", "budget_exhausted"), body["status"]
    statuses_in_order = [str(b["status"]) for b in answered]
    during = answered[50:100]
    assert all(b["status"] == "failed" and "cannot be reached" in str(b["message"]) for b in during), during[:2]
    assert statuses_in_order[:50].count("succeeded") == 50  # before: served
    assert statuses_in_order[100:].count("succeeded") == 50  # after: served again, up to the budget
    assert statuses_in_order[100:].count("budget_exhausted") == 20
