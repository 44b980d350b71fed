"""The HTTP service under load: throughput and latency of ``POST /v1/runs/wait`` by concurrency.

A real ``agentkeel serve`` (uvicorn, the whole ASGI app, API-key authentication,
the run manager) is started as a child process on a free loopback port, with its
own temporary ``AGENTKEEL_HOME`` and a config of one principal ``bench`` (read,
refunds), ``[server] max_inflight = 64, max_queue = 1024`` (so no level here is
queued or refused by admission) and the default ``[journal]`` (durable SQLite).
An API key for ``bench`` is created directly in the home's SQLite key store.

    python bench/server.py [--levels 1,2,4,8,16,32,64] [--seconds 5] [--warmup 1] [--json]

The request is the offline demo's two-step run, ``{"message": "refund order 1002
if it has shipped"}``: step 1 ``lookup_order`` runs, step 2 ``issue_refund`` is
skipped by its condition because order 1002 is pending. Nothing changes in the
shop, so every request does the same work: deterministic and repeatable. The
first response is checked (status ``succeeded``, 2 steps) before any timing.

Per concurrency level N: N workers, each with its own ``httpx.AsyncClient``
(keep-alive; pool limits sized for N, never the constraint: a worker has one
request in flight at a time, so it uses one connection), send the request back
to back. After a warm-up (``--warmup`` seconds: connections opened, caches hot)
comes a window of ``--seconds``; a request counts if it completes inside the
window (started and finished there), so req/s = requests / window. Latency is
the client-side wall time of one request; the percentiles are over the 200s
that answered ``succeeded``; errors are the rest (non-200, a transport error,
or a run that did not succeed). The CPU columns are the share of one core used
by the load generator (this process) and by the server during the window
(from /proc; "-" elsewhere): the client is one Python event loop, and on a
small machine client and server share the cores, so the high levels measure
the pair, not the server alone.

Then the direct baseline: ``AgentSystem(Config.load(cfg))`` in this process,
``await system.run(AgentRequest(...))`` for the same warm-up and window,
sequentially and with 8 at once (``asyncio.gather`` of 8 workers). It runs after
the server is stopped, on a fresh home of its own: the server's journal is an
SQLite file with one writer at a time, and sharing it (or the CPU) with a live
server would measure contention, not the framework. The HTTP overhead is
(HTTP p50 at 1 client) - (direct sequential p50), in ms and as a ratio.

At the end the server is stopped with SIGTERM and its exit status reported.
Ctrl-C stops the measurement and the server cleanly. Only 127.0.0.1 is used.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import httpx

MESSAGE = "refund order 1002 if it has shipped"
HOST = "127.0.0.1"

CONFIG = """
[principals.bench]
permissions = ["read", "refunds"]

[journal]

[server]
max_inflight = 64
max_queue = 1024
"""


# --- figures ---------------------------------------------------------------------------


def percentile(values: list[float], p: float) -> float:
    """The ``p``-th percentile (0-100) of ``values``, linearly interpolated; NaN if empty."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = (len(ordered) - 1) * p / 100
    low = int(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def summary(latencies: list[float], errors: int, window: float) -> dict[str, Any]:
    return {
        "requests": len(latencies), "errors": errors, "req_per_s": len(latencies) / window,
        "p50_ms": percentile(latencies, 50) * 1e3, "p90_ms": percentile(latencies, 90) * 1e3,
        "p99_ms": percentile(latencies, 99) * 1e3,
    }


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU seconds of process ``pid`` (Linux /proc), or None."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


async def windowed(onces: list[Callable[[], Awaitable[bool]]], warmup: float,
                   seconds: float) -> tuple[list[float], int, float]:
    """Run one loop per callable of ``onces`` (each call one request; True: a success),
    all at once, through a warm-up and a measured window.

    Returns the latencies of the successes completed in the window, the number of
    failures completed in it, and the window's length."""
    loop = asyncio.get_running_loop()
    start = loop.time() + warmup
    end = start + seconds
    latencies: list[float] = []
    errors = 0

    async def worker(once: Callable[[], Awaitable[bool]]) -> None:
        nonlocal errors
        while True:
            began = loop.time()
            if began >= end:
                return
            ok = await once()
            done = loop.time()
            if began >= start and done <= end:
                if ok:
                    latencies.append(done - began)
                else:
                    errors += 1

    await asyncio.gather(*(worker(once) for once in onces))
    return latencies, errors, seconds


# --- the server ------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


class Server:
    """``agentkeel serve`` in a child process (its own session: Ctrl-C reaches only us)."""

    def __init__(self, root: Path, config: Path) -> None:
        self.home = root / "home"
        self.home.mkdir()
        self.log = root / "server.log"
        self.port = free_port()
        self.url = f"http://{HOST}:{self.port}"
        env = {k: v for k, v in os.environ.items() if not k.startswith(("AGENTKEEL_", "OPENAI_"))}
        env["AGENTKEEL_HOME"] = str(self.home)
        with self.log.open("wb") as out:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "agentkeel", "serve", "--host", HOST, "--port", str(self.port),
                 "--config", str(config), "--log-level", "warning"],
                cwd=root, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)

    def output(self, lines: int = 40) -> str:
        text = self.log.read_text(errors="replace") if self.log.exists() else ""
        return "\n".join(text.splitlines()[-lines:])

    def wait_healthy(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            if self.process.poll() is not None:
                raise SystemExit(f"the server exited with {self.process.returncode}:\n{self.output()}")
            try:
                if httpx.get(f"{self.url}/healthz", timeout=1.0, trust_env=False).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise SystemExit(f"the server did not answer /healthz in {timeout:.0f} s:\n{self.output()}")
            time.sleep(0.05)

    def create_key(self, principal: str) -> str:
        from agentkeel.permissions.keys_sqlite import SQLiteKeyStore

        store = SQLiteKeyStore(self.home)
        try:
            secret, _ = store.create(principal, name="bench/server.py")
        finally:
            store.close()
        return secret

    def stop(self, timeout: float = 60.0) -> tuple[int, float, bool]:
        """SIGTERM, then wait (SIGKILL after ``timeout``): the exit status, the seconds it took,
        and whether it had to be killed."""
        began = time.perf_counter()
        killed = False
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            code = self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            code = self.process.wait()
            killed = True
        return code, time.perf_counter() - began, killed


@contextlib.contextmanager
def running(root: Path, config: Path, result: dict[str, Any]) -> Iterator[Server]:
    server = Server(root, config)
    try:
        yield server
    finally:
        code, took, killed = server.stop()
        # uvicorn re-raises the signal it caught once its graceful shutdown is done, so a clean
        # stop exits with -SIGTERM (0 on an older uvicorn).
        clean = not killed and code in (0, -signal.SIGTERM)
        result["server_exit"] = {"code": code, "seconds": took, "clean": clean, "killed": killed}
        how = ("killed after the SIGTERM timeout" if killed else
               "graceful shutdown, then the signal re-raised by uvicorn" if code == -signal.SIGTERM else
               "graceful shutdown" if code == 0 else "not a clean exit")
        print(f"server stopped by SIGTERM: exit status {code} ({how}) after {took:.2f} s", flush=True)
        if not clean:
            print(server.output())


def verify(body: dict[str, Any]) -> None:
    steps = body.get("steps") or []
    if body.get("status") != "succeeded" or len(steps) != 2:
        raise SystemExit(f"unexpected first response (want succeeded with 2 steps): {json.dumps(body)[:2000]}")
    print(f"first response: {body['status']}, steps "
          + ", ".join(f"{s.get('tool_name')} {s.get('status')}" for s in steps) + f"; {body.get('answer', '')!r}")


async def http_level(url: str, key: str, n: int, warmup: float, seconds: float, pid: int) -> dict[str, Any]:
    limits = httpx.Limits(max_connections=n, max_keepalive_connections=n)
    headers = {"Authorization": f"Bearer {key}"}
    payload = {"message": MESSAGE}
    clients = [httpx.AsyncClient(base_url=url, headers=headers, limits=limits, timeout=60.0, trust_env=False)
               for _ in range(n)]
    first_error: list[str] = []

    async def once(client: httpx.AsyncClient) -> bool:
        try:
            response = await client.post("/v1/runs/wait", json=payload)
        except httpx.HTTPError as exc:
            first_error.append(f"{type(exc).__name__}: {exc}")
            return False
        if response.status_code == 200 and response.json().get("status") == "succeeded":
            return True
        first_error.append(f"HTTP {response.status_code}: {response.text[:300]}")
        return False

    loop = asyncio.get_running_loop()
    cpu: dict[str, float | None] = {}

    async def sample_cpu() -> None:
        await asyncio.sleep(warmup)
        cpu["client0"], cpu["server0"], cpu["t0"] = time.process_time(), cpu_seconds(pid), loop.time()
        await asyncio.sleep(seconds)
        cpu["client1"], cpu["server1"], cpu["t1"] = time.process_time(), cpu_seconds(pid), loop.time()

    try:
        sampler = asyncio.ensure_future(sample_cpu())
        onces = [functools.partial(once, client) for client in clients]
        latencies, errors, window = await windowed(onces, warmup, seconds)
        await sampler
    finally:
        await asyncio.gather(*(c.aclose() for c in clients))
    result = summary(latencies, errors, window) | {"clients": n}
    span = (cpu.get("t1") or 0) - (cpu.get("t0") or 0)
    result["client_cpu_pct"] = ((cpu["client1"] or 0) - (cpu["client0"] or 0)) / span * 100 if span > 0 else None
    s0, s1 = cpu.get("server0"), cpu.get("server1")
    result["server_cpu_pct"] = (s1 - s0) / span * 100 if s0 is not None and s1 is not None and span > 0 else None
    if first_error:
        result["first_error"] = first_error[0]
    return result


async def measure_http(server: Server, levels: list[int], warmup: float, seconds: float) -> list[dict[str, Any]]:
    key = server.create_key("bench")
    async with httpx.AsyncClient(base_url=server.url, headers={"Authorization": f"Bearer {key}"},
                                 timeout=60.0, trust_env=False) as client:
        response = await client.post("/v1/runs/wait", json={"message": MESSAGE})
        if response.status_code != 200:
            raise SystemExit(f"the first request answered {response.status_code}: {response.text[:2000]}")
        verify(response.json())
    print(f"HTTP: POST /v1/runs/wait, {warmup:g} s warm-up then {seconds:g} s measured per level")
    print(f"{'clients':>7} {'requests':>9} {'req/s':>8} {'p50 ms':>8} {'p90 ms':>8} {'p99 ms':>8} {'errors':>7}"
          f" {'client CPU%':>11} {'server CPU%':>11}")
    rows = []
    for n in levels:
        row = await http_level(server.url, key, n, warmup, seconds, server.process.pid)
        rows.append(row)
        client_cpu = f"{row['client_cpu_pct']:11.0f}" if row["client_cpu_pct"] is not None else f"{'-':>11}"
        server_cpu = f"{row['server_cpu_pct']:11.0f}" if row["server_cpu_pct"] is not None else f"{'-':>11}"
        print(f"{n:>7} {row['requests']:>9} {row['req_per_s']:8.1f} {row['p50_ms']:8.2f} {row['p90_ms']:8.2f}"
              f" {row['p99_ms']:8.2f} {row['errors']:>7} {client_cpu} {server_cpu}", flush=True)
        if "first_error" in row:
            print(f"{'':>7} first error: {row['first_error']}")
    return rows


# --- the direct baseline -----------------------------------------------------------------


async def measure_direct(config: Path, warmup: float, seconds: float) -> dict[str, dict[str, Any]]:
    from agentkeel import AgentRequest
    from agentkeel.config import Config
    from agentkeel.runtime.system import AgentSystem

    system = AgentSystem(Config.load(config))
    results: dict[str, dict[str, Any]] = {}

    async def once() -> bool:
        response = await system.run(AgentRequest(message=MESSAGE, user_id="bench"))
        return response.ok and response.status.value == "succeeded" and len(response.steps) == 2

    async with system:
        if not await once():
            raise SystemExit("the direct baseline's first run did not succeed with 2 steps")
        for label, workers in (("sequential", 1), ("gather x8", 8)):
            latencies, errors, window = await windowed([once] * workers, warmup, seconds)
            results[label] = summary(latencies, errors, window) | {"concurrency": workers}
    return results


# --- main --------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--levels", default="1,2,4,8,16,32,64", help="concurrent clients per level")
    parser.add_argument("--seconds", type=float, default=5.0, help="measured seconds per level")
    parser.add_argument("--warmup", type=float, default=1.0, help="warm-up seconds before each level")
    parser.add_argument("--json", action="store_true", help="also print the results as JSON")
    args = parser.parse_args()
    levels = [int(n) for n in args.levels.split(",") if n.strip()]
    if not levels or min(levels) < 1 or args.seconds <= 0 or args.warmup < 0:
        parser.error("--levels must be positive integers, --seconds > 0, --warmup >= 0")

    def on_term(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)
    result: dict[str, Any] = {"python": sys.version.split()[0], "httpx": httpx.__version__,
                              "cpus": os.cpu_count(), "message": MESSAGE, "seconds": args.seconds,
                              "warmup": args.warmup}
    print(f"python {result['python']}, httpx {result['httpx']}, {result['cpus']} CPUs; "
          "client and server share them")
    try:
        with tempfile.TemporaryDirectory(prefix="agentkeel-bench-server-") as tmp:
            root = Path(tmp)
            config = root / "agentkeel.toml"
            config.write_text(textwrap.dedent(CONFIG))
            (root / "server").mkdir()
            with running(root / "server", config, result) as server:
                server.wait_healthy()
                result["http"] = asyncio.run(measure_http(server, levels, args.warmup, args.seconds))
            (root / "direct" / "home").mkdir(parents=True)
            os.environ["AGENTKEEL_HOME"] = str(root / "direct" / "home")
            print("direct: in-process AgentSystem.run, after the server stopped, on a fresh home of its own")
            result["direct"] = asyncio.run(measure_direct(config, args.warmup, args.seconds))
    except KeyboardInterrupt:
        print("interrupted: the server was stopped", file=sys.stderr)
        raise SystemExit(130) from None

    print(f"{'direct':>10} {'requests':>9} {'req/s':>8} {'p50 ms':>8} {'p99 ms':>8} {'errors':>7}")
    for label, row in result["direct"].items():
        print(f"{label:>10} {row['requests']:>9} {row['req_per_s']:8.1f} {row['p50_ms']:8.3f}"
              f" {row['p99_ms']:8.3f} {row['errors']:>7}")
    one = next((row for row in result["http"] if row["clients"] == 1), None)
    direct = result["direct"]["sequential"]
    if one is None:
        print("HTTP overhead: needs level 1 in --levels")
    else:
        overhead = one["p50_ms"] - direct["p50_ms"]
        ratio = one["p50_ms"] / direct["p50_ms"]
        result["http_overhead"] = {"ms": overhead, "ratio": ratio}
        print(f"HTTP overhead at 1 client: p50 {one['p50_ms']:.3f} ms - direct p50 {direct['p50_ms']:.3f} ms"
              f" = {overhead:.3f} ms per request ({ratio:.2f}x the direct run)")
    if args.json:
        print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
