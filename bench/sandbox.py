"""Per-call latency of the docker sandbox: warm pool vs cold start vs raw ``docker exec``.

    python bench/sandbox.py [-n 30] [--image agentkeel/sandbox-python:latest]

All in one run against the local engine, same image, same trivial tool
(``json.dumps`` of a small list, a standard-library function, so the generic
sandbox image can import it):

- warm:  ``DockerBackend.run`` with a warm pool (size 1); before each call the
         pool is refilled and settled, so each call finds a ready container.
- cold:  ``DockerBackend.run`` with no pool: create, attach, start, request,
         result (what ``docker run -i`` does).
- exec:  the floor: ``exec_create`` + ``exec_start`` of ``/bin/true`` in an
         already running container (the least a per-call container round trip
         through the Docker API can cost).

Prints p50/p90 in milliseconds and the ratios the issue targets
(warm p50 <= 1.3x exec p50; warm at least 3x faster than cold).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from collections.abc import Awaitable, Callable

from agentkeel.sandbox.docker import DockerBackend, DockerSettings
from agentkeel.sandbox.docker.client import connect
from agentkeel.sandbox.docker.images import SANDBOX_IMAGE
from agentkeel.sandbox.protocol import ToolCall
from agentkeel.types import ToolSpec


def percentile(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    index = min(round(q * (len(ordered) - 1)), len(ordered) - 1)
    return ordered[index]


async def timed(n: int, before: Callable[[], Awaitable[None]], call: Callable[[], Awaitable[object]]) -> list[float]:
    samples = []
    for _ in range(n):
        await before()
        start = time.perf_counter()
        await call()
        samples.append(time.perf_counter() - start)
    return samples


async def bench(n: int, image: str) -> dict[str, list[float]]:
    spec = ToolSpec(name="dumps", description="json.dumps", fn=json.dumps, args_schema={"type": "object"},
                    isolation="docker", image=image)
    call = ToolCall(spec, {"obj": [1, 2, 3]}, 10.0)

    warm = DockerBackend(DockerSettings(pool_size=1))
    cold = DockerBackend(DockerSettings(pool_size=0))
    try:
        assert await warm.prewarm(image), "the warm pool did not fill"

        async def settle() -> None:
            await asyncio.to_thread(warm.pool.wait_ready, image, 30)
            await asyncio.to_thread(warm.pool.wait_idle, 30)
            await asyncio.sleep(0.2)

        async def quiet() -> None:
            await asyncio.sleep(0.2)

        await warm.run(call)
        await cold.run(call)
        results = {
            "warm pool": await timed(n, settle, lambda: warm.run(call)),
            "cold (run-style)": await timed(n, quiet, lambda: cold.run(call)),
            "docker exec (floor)": await asyncio.to_thread(exec_floor, n, image),
        }
    finally:
        await warm.aclose()
        await cold.aclose()
    return results


def exec_floor(n: int, image: str) -> list[float]:
    api = connect()
    cid = api.create_container(image, entrypoint=["sleep", "600"], host_config=api.create_host_config(
        network_mode="none", read_only=True, cap_drop=["ALL"], init=True))["Id"]
    api.start(cid)
    samples = []
    try:
        for _ in range(n + 1):
            time.sleep(0.2)
            start = time.perf_counter()
            exec_id = api.exec_create(cid, ["/bin/true"], stdout=True, stderr=True)["Id"]
            api.exec_start(exec_id)
            samples.append(time.perf_counter() - start)
    finally:
        api.remove_container(cid, force=True)
        api.close()
    return samples[1:]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-n", type=int, default=30, help="calls per mode")
    parser.add_argument("--image", default=SANDBOX_IMAGE)
    args = parser.parse_args()
    results = asyncio.run(bench(args.n, args.image))
    floor = percentile(results["docker exec (floor)"], 0.5)
    print(f"docker sandbox per-call latency, {args.n} calls each, image {args.image}")
    print(f"{'mode':<22}{'p50 ms':>10}{'p90 ms':>10}{'p50 / exec':>12}")
    for mode, samples in results.items():
        p50, p90 = percentile(samples, 0.5), percentile(samples, 0.9)
        print(f"{mode:<22}{p50 * 1000:>10.1f}{p90 * 1000:>10.1f}{p50 / floor:>12.2f}")
    warm = percentile(results["warm pool"], 0.5)
    cold = percentile(results["cold (run-style)"], 0.5)
    print(f"warm p50 = {warm / floor:.2f}x exec floor (target <= 1.3x); cold/warm = {cold / warm:.1f}x (target >= 3x)")


if __name__ == "__main__":
    main()
