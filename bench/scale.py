"""Horizontal scale: 1, 2, 3 ``agentkeel serve`` replicas on one PostgreSQL and one Redis.

One PostgreSQL and one Redis (``agentkeel.testing.services``: real servers in
temporary directories on free loopback ports; PostgreSQL with fsync off) and up to
three replicas of ``python -m agentkeel serve``, each a child process with its own
``AGENTKEEL_HOME`` and the same config: principal ``bench`` (read, refunds),
``[server] max_inflight = 32, max_queue = 1024``, ``[store] url`` (the journal, the
ledger, the API keys in PostgreSQL) and ``[shared] redis_url``. One API key for
``bench`` is created in the PostgreSQL key store; every replica accepts it.

    python bench/scale.py [--replicas 1,2,3] [--concurrency 16] [--seconds 5] [--warmup 1] [--json]

Per replica count N: C workers (``--concurrency``), each with its own keep-alive
``httpx.AsyncClient``, spread round-robin over the first N replicas (worker i ->
replica i mod N), send ``POST /v1/runs/wait`` with the offline demo's two-step run
(``refund order 1002 if it has shipped``: lookup, then the refund skipped by its
condition; nothing changes, so every request does the same work) back to back.
After a warm-up comes a window of ``--seconds``; a request counts if it starts and
finishes inside it. Latency percentiles are over the runs that ``succeeded``;
errors are the rest. CPU% (100 = one core) during the window, from /proc/<pid>/stat
of each process tree: all replicas running (those beyond N idle), PostgreSQL (the
postmaster and the backends it forks), Redis, the load generator (this process), and
"other": the rest of the machine's busy time (/proc/stat), i.e. whatever else runs on
it; the verdict (CPU-bound or not) is made on the whole machine's busy share.
Replicas are started as they are needed and kept for the next levels.

Then the per-step overhead of the PostgreSQL journal against the SQLite one, in
this process after the replicas are stopped (as bench/overhead.py: scripted planner,
no-op tools, K = 2, 20, 100 steps; median run / K, and the marginal step
(T(K) - T(2)) / (K - 2)): the default config (SQLite journal and ledger in a
temporary home) against ``[store] url`` on a fresh database of the same PostgreSQL.

Clean shutdown, also on Ctrl-C / SIGTERM: SIGTERM to the replicas, PostgreSQL and
Redis stopped, temporary directories removed. Only 127.0.0.1 is used.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
from agentkeel import AgentRequest
from agentkeel.testing import ScriptedPlanner, make_system
from agentkeel.testing.services import PostgresServer, RedisServer
from overhead import NoopTools, wire  # bench/ is on sys.path when this script runs
from server import Server, percentile

MESSAGE = "refund order 1002 if it has shipped"
HOST = "127.0.0.1"
CLK_TCK = os.sysconf("SC_CLK_TCK")
CPUS = os.cpu_count() or 1

CONFIG = """\
[principals.bench]
permissions = ["read", "refunds"]

[server]
max_inflight = 32
max_queue = 1024

[store]
url = "{store_url}"

[shared]
redis_url = "{redis_url}"
"""


# --- figures ---------------------------------------------------------------------------


def _proc_table() -> dict[int, tuple[int, float]]:
    """pid -> (parent pid, user + system CPU seconds) of every process (Linux /proc)."""
    table: dict[int, tuple[int, float]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
            table[int(entry)] = (int(fields[1]), (int(fields[11]) + int(fields[12])) / CLK_TCK)
        except (OSError, ValueError, IndexError):
            continue
    return table


def tree_cpu(roots: list[int]) -> dict[int, float]:
    """CPU seconds of each process in the trees under ``roots`` (the roots included)."""
    table = _proc_table()
    children: dict[int, list[int]] = {}
    for pid, (ppid, _) in table.items():
        children.setdefault(ppid, []).append(pid)
    found: dict[int, float] = {}
    stack = [pid for pid in roots if pid in table]
    while stack:
        pid = stack.pop()
        if pid in found:
            continue
        found[pid] = table[pid][1]
        stack.extend(children.get(pid, []))
    return found


def cpu_delta(before: dict[int, float], after: dict[int, float]) -> float:
    """CPU seconds used between two ``tree_cpu`` samples (a process born in between counts whole;
    one that exited in between is lost: backends and workers here live for the whole run)."""
    return sum(seconds - before.get(pid, 0.0) for pid, seconds in after.items())


def machine_cpu() -> tuple[float, float]:
    """(busy, total) CPU seconds of the whole machine since boot, from /proc/stat (idle and iowait
    are not busy)."""
    fields = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    total = sum(fields[:8])  # guest time is already counted in user
    return (total - fields[3] - fields[4]) / CLK_TCK, total / CLK_TCK


def postmaster_pid(pg: PostgresServer) -> int | None:
    try:
        return int((pg.data / "postmaster.pid").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


# --- the replicas ----------------------------------------------------------------------


class Replica(Server):
    """``agentkeel serve`` in a child process (bench/server.py's ``Server``), in a folder of its own."""

    def __init__(self, root: Path, config: Path) -> None:
        root.mkdir(parents=True)
        super().__init__(root, config)

    def stop(self, timeout: float = 60.0) -> tuple[int, bool]:  # type: ignore[override]
        """SIGTERM, then wait (SIGKILL after ``timeout``): the exit status, and whether it was killed."""
        code, _took, killed = super().stop(timeout)
        return code, killed


def verify(body: dict[str, Any]) -> None:
    steps = body.get("steps") or []
    if body.get("status") != "succeeded" or len(steps) != 2:
        raise SystemExit(f"unexpected first response (want succeeded with 2 steps): {json.dumps(body)[:2000]}")


# --- the load --------------------------------------------------------------------------


async def level(replicas: list[Replica], all_pids: list[int], pg_pid: int, redis_pid: int, key: str,
                concurrency: int, warmup: float, seconds: float) -> dict[str, Any]:
    headers = {"Authorization": f"Bearer {key}"}
    payload = {"message": MESSAGE}
    limits = httpx.Limits(max_connections=1, max_keepalive_connections=1)
    clients = [httpx.AsyncClient(base_url=replicas[i % len(replicas)].url, headers=headers, limits=limits,
                                 timeout=60.0, trust_env=False) for i in range(concurrency)]
    loop = asyncio.get_running_loop()
    start = loop.time() + warmup
    end = start + seconds
    latencies: list[float] = []
    errors = 0
    first_error: list[str] = []
    samples: dict[str, Any] = {}

    def sample() -> dict[str, Any]:
        return {"t": loop.time(), "client": time.process_time(), "machine": machine_cpu(),
                "replicas": tree_cpu(all_pids), "postgres": tree_cpu([pg_pid]), "redis": tree_cpu([redis_pid])}

    async def sampler() -> None:
        await asyncio.sleep(max(0.0, start - loop.time()))
        samples["0"] = sample()
        await asyncio.sleep(max(0.0, end - loop.time()))
        samples["1"] = sample()

    async def worker(client: httpx.AsyncClient) -> None:
        nonlocal errors
        while True:
            began = loop.time()
            if began >= end:
                return
            ok = False
            try:
                response = await client.post("/v1/runs/wait", json=payload)
                ok = response.status_code == 200 and response.json().get("status") == "succeeded"
                if not ok:
                    first_error.append(f"HTTP {response.status_code}: {response.text[:300]}")
            except httpx.HTTPError as exc:
                first_error.append(f"{type(exc).__name__}: {exc}")
            done = loop.time()
            if began >= start and done <= end:
                if ok:
                    latencies.append(done - began)
                else:
                    errors += 1

    try:
        task = asyncio.ensure_future(sampler())
        await asyncio.gather(*(worker(c) for c in clients))
        await task
    finally:
        await asyncio.gather(*(c.aclose() for c in clients))
    s0, s1 = samples["0"], samples["1"]
    span = s1["t"] - s0["t"]
    row: dict[str, Any] = {
        "replicas": len(replicas), "concurrency": concurrency, "requests": len(latencies),
        "req_per_s": len(latencies) / seconds, "p50_ms": percentile(latencies, 50) * 1e3,
        "p99_ms": percentile(latencies, 99) * 1e3, "errors": errors,
        "cpu_pct": {
            "replicas": cpu_delta(s0["replicas"], s1["replicas"]) / span * 100,
            "postgres": cpu_delta(s0["postgres"], s1["postgres"]) / span * 100,
            "redis": cpu_delta(s0["redis"], s1["redis"]) / span * 100,
            "client": (s1["client"] - s0["client"]) / span * 100,
        },
        "postgres_processes": len(s1["postgres"]),
        "machine_busy_pct": (s1["machine"][0] - s0["machine"][0]) / (s1["machine"][1] - s0["machine"][1]) * 100,
    }
    row["other_cpu_pct"] = max(0.0, row["machine_busy_pct"] * CPUS - sum(row["cpu_pct"].values()))
    if first_error:
        row["first_error"] = first_error[0]
    return row


def bound(rows: list[dict[str, Any]], cpus: int) -> str:
    """What the CPU figures say limits throughput, per replica count and overall."""
    capacity = cpus * 100
    lines = []
    for row in rows:
        cpu = row["cpu_pct"]
        total = sum(cpu.values())
        per_request = total / 100 / row["req_per_s"] * 1e3 if row["req_per_s"] else float("nan")
        per_replica = cpu["replicas"] / row["replicas"]
        shares = ", ".join(f"{name} {value / total * 100:.0f}%" for name, value in cpu.items()) if total else "-"
        busy = row["machine_busy_pct"]
        if busy < 85:
            verdict = (f"not CPU-bound: the machine is {busy:.0f}% busy (this benchmark "
                       f"{total / capacity * 100:.0f}%); each replica uses "
                       f"{per_replica:.0f}% of one core (one Python event loop, waiting on its PostgreSQL "
                       "round trips), so the replica count is the limit")
        else:
            verdict = (f"CPU-bound: the {cpus} cores are {busy:.0f}% busy (this benchmark "
                       f"{total / capacity * 100:.0f}%, other processes {row['other_cpu_pct'] / capacity * 100:.0f}%)"
                       f", {per_replica:.0f}% of a core per replica")
        lines.append(f"  {row['replicas']} replica(s): {verdict}; {per_request:.1f} ms CPU per request "
                     f"(shares: {shares})")
    best = max(rows, key=lambda r: r["req_per_s"])
    saturated = [r for r in rows if r["machine_busy_pct"] >= 85]
    if saturated:
        pg_share = max(r["cpu_pct"]["postgres"] / sum(r["cpu_pct"].values()) for r in saturated) * 100
        lines.append(
            f"  => the peak is {best['req_per_s']:.0f} req/s with {best['replicas']} replica(s); from "
            f"{min(r['replicas'] for r in saturated)} replicas on, the bound is the {cpus} cores themselves, "
            f"spent mostly in the Python replicas (PostgreSQL at most {pg_share:.0f}% of the CPU, Redis ~1%): "
            "more replicas only split the same CPU and add contention, so the shared stores are not the limit "
            "here; more cores (or cheaper requests in the replica) would be.")
    else:
        lines.append(f"  => the peak is {best['req_per_s']:.0f} req/s with {best['replicas']} replica(s); the "
                     "machine was never CPU-saturated: more replicas (or clients) would raise it.")
    return "\n".join(lines)


async def measure_scale(root: Path, config: Path, pg: PostgresServer, redis: RedisServer, counts: list[int],
                        concurrency: int, warmup: float, seconds: float,
                        replicas: list[Replica]) -> list[dict[str, Any]]:
    from agentkeel import pg as agentkeel_pg
    from agentkeel.permissions.keys_pg import PostgresKeyStore

    store = PostgresKeyStore(pg.url)
    try:
        key, _ = store.create("bench", name="bench/scale.py")
    finally:
        store.close()
    agentkeel_pg.close_all()
    pg_pid = postmaster_pid(pg)
    assert pg_pid is not None and redis.process is not None
    print(f"POST /v1/runs/wait, {concurrency} clients round-robin over the replicas, {warmup:g} s warm-up "
          f"then {seconds:g} s measured; CPU% = 100 per core")
    print(f"{'replicas':>8} {'requests':>9} {'req/s':>8} {'p50 ms':>8} {'p99 ms':>8} {'errors':>7}"
          f" {'replicas CPU%':>13} {'postgres CPU%':>13} {'redis CPU%':>10} {'client CPU%':>11} {'other CPU%':>10}")
    rows = []
    for n in counts:
        while len(replicas) < n:
            replica = Replica(root / f"replica{len(replicas) + 1}", config)
            replicas.append(replica)
            replica.wait_healthy()
            async with httpx.AsyncClient(base_url=replica.url, headers={"Authorization": f"Bearer {key}"},
                                         timeout=60.0, trust_env=False) as client:
                response = await client.post("/v1/runs/wait", json={"message": MESSAGE})
                if response.status_code != 200:
                    raise SystemExit(f"the first request answered {response.status_code}: {response.text[:2000]}")
                verify(response.json())
        row = await level(replicas[:n], [r.process.pid for r in replicas], pg_pid, redis.process.pid, key,
                          concurrency, warmup, seconds)
        rows.append(row)
        cpu = row["cpu_pct"]
        print(f"{n:>8} {row['requests']:>9} {row['req_per_s']:8.1f} {row['p50_ms']:8.2f} {row['p99_ms']:8.2f}"
              f" {row['errors']:>7} {cpu['replicas']:13.0f} {cpu['postgres']:13.0f} {cpu['redis']:10.0f}"
              f" {cpu['client']:11.0f} {row['other_cpu_pct']:10.0f}", flush=True)
        if "first_error" in row:
            print(f"{'':>8} first error: {row['first_error']}")
    return rows


# --- per-step overhead: PostgreSQL journal vs SQLite -------------------------------------


async def step_runs(k: int, runs: int, warmup: int, extra: dict[str, Any]) -> list[float]:
    system = make_system(NoopTools(), ScriptedPlanner(wire(k)), principals={"bench": ["bench"]},
                         config={"planner": {"max_steps": max(k, 1)}, **extra})
    times = []
    async with system:
        for n in range(warmup + runs):
            request = AgentRequest(message="bench", user_id="bench")
            began = time.perf_counter()
            response = await system.run(request)
            elapsed = time.perf_counter() - began
            if not response.ok:
                raise SystemExit(f"benchmark run failed: {response.message}")
            if n >= warmup:
                times.append(elapsed)
    return times


def measure_steps(pg: PostgresServer, ks: list[int], runs: int, warmup: int) -> dict[str, list[dict[str, Any]]]:
    from agentkeel import pg as agentkeel_pg

    results: dict[str, list[dict[str, Any]]] = {}
    print(f"per-step overhead, in process: scripted planner, no-op tools; {runs} runs per K (fewer above K=20)"
          f" after {warmup} warm-up runs")
    print(f"{'journal':>10} {'K steps':>8} {'median run (ms)':>16} {'per step (us)':>14} {'marginal step (us)':>19}")
    for label in ("sqlite", "postgresql"):
        with tempfile.TemporaryDirectory(prefix="agentkeel-bench-scale-home-") as home:
            os.environ["AGENTKEEL_HOME"] = home
            extra: dict[str, Any] = {"store": {"url": pg.new_database()}} if label == "postgresql" else {}
            medians: dict[int, float] = {}
            rows = []
            for k in ks:
                n = max(10, runs * 20 // k) if k > 20 else runs
                medians[k] = statistics.median(asyncio.run(step_runs(k, n, warmup, extra)))
                base = ks[0]
                marginal = (medians[k] - medians[base]) / (k - base) * 1e6 if k != base else None
                rows.append({"k": k, "median_run_ms": medians[k] * 1e3, "per_step_us": medians[k] / k * 1e6,
                             "marginal_step_us": marginal})
                shown = f"{marginal:19.1f}" if marginal is not None else f"{'-':>19}"
                print(f"{label:>10} {k:>8} {medians[k] * 1e3:16.3f} {medians[k] / k * 1e6:14.1f} {shown}",
                      flush=True)
            results[label] = rows
            agentkeel_pg.close_all()
    for k_row_sqlite, k_row_pg in zip(results["sqlite"], results["postgresql"], strict=True):
        if k_row_sqlite["marginal_step_us"] is not None:
            print(f"{'':>10} K={k_row_pg['k']}: PostgreSQL marginal step - SQLite = "
                  f"{k_row_pg['marginal_step_us'] - k_row_sqlite['marginal_step_us']:.1f} us "
                  f"({k_row_pg['marginal_step_us'] / k_row_sqlite['marginal_step_us']:.2f}x)")
    return results


# --- main --------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--replicas", default="1,2,3", help="replica counts to measure")
    parser.add_argument("--concurrency", type=int, default=16, help="concurrent clients")
    parser.add_argument("--seconds", type=float, default=5.0, help="measured seconds per replica count")
    parser.add_argument("--warmup", type=float, default=1.0, help="warm-up seconds before each window")
    parser.add_argument("--steps", default="2,20,100", help="K of the per-step overhead")
    parser.add_argument("--runs", type=int, default=100, help="runs per K of the per-step overhead")
    parser.add_argument("--json", action="store_true", help="also print the results as JSON")
    args = parser.parse_args()
    counts = [int(n) for n in args.replicas.split(",") if n.strip()]
    ks = [int(k) for k in args.steps.split(",") if k.strip()]
    if not counts or min(counts) < 1 or args.concurrency < 1 or args.seconds <= 0 or args.warmup < 0:
        parser.error("--replicas must be positive integers, --concurrency >= 1, --seconds > 0, --warmup >= 0")
    if len(ks) < 2 or min(ks) < 1:
        parser.error("--steps needs at least two positive K")
    for missing in (PostgresServer.missing(), RedisServer.missing()):
        if missing:
            raise SystemExit(missing)

    def on_term(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)
    cpus = os.cpu_count() or 1
    result: dict[str, Any] = {"python": sys.version.split()[0], "cpus": cpus, "message": MESSAGE,
                              "concurrency": args.concurrency, "seconds": args.seconds, "warmup": args.warmup}
    print(f"python {result['python']}, {cpus} CPUs shared by the replicas, PostgreSQL, Redis and the load generator")
    replicas: list[Replica] = []
    try:
        with contextlib.ExitStack() as stack:
            root = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="agentkeel-bench-scale-")))
            pg = PostgresServer()
            stack.callback(pg.stop)
            pg.start()
            redis = RedisServer()
            stack.callback(redis.stop)
            redis.start()
            config = root / "agentkeel.toml"
            config.write_text(CONFIG.format(store_url=pg.url, redis_url=redis.url))

            def stop_replicas() -> None:
                exits = [r.stop() for r in replicas]
                if exits:
                    result["replica_exits"] = [{"code": code, "killed": killed} for code, killed in exits]
                    print("replicas stopped by SIGTERM: exit status "
                          + ", ".join(f"{code}{' (killed)' if killed else ''}" for code, killed in exits),
                          flush=True)
                replicas.clear()

            stack.callback(stop_replicas)
            result["scale"] = asyncio.run(measure_scale(root, config, pg, redis, counts, args.concurrency,
                                                        args.warmup, args.seconds, replicas))
            print("what bounds throughput (CPU during the window; the replicas column includes idle ones, "
                  "other = the rest of the machine, from /proc/stat):")
            print(bound(result["scale"], cpus))
            stop_replicas()
            result["steps"] = measure_steps(pg, ks, args.runs, 5)
    except KeyboardInterrupt:
        print("interrupted: replicas, PostgreSQL and Redis stopped, temporary directories removed", file=sys.stderr)
        raise SystemExit(130) from None
    if args.json:
        print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
