"""Per-call latency of the subprocess sandbox: a no-op tool, with and without a
spare child started ahead of time.

    python bench/subprocess_sandbox.py [--calls 50]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time

from agentkeel.sandbox.protocol import ToolCall
from agentkeel.sandbox.subprocess.backend import SubprocessBackend, SubprocessSettings
from agentkeel.tools.decorator import spec_of
from bench_tools import noop


async def measure(prestart: int, calls: int, spacing_s: float) -> list[float]:
    spec = spec_of(noop)
    assert spec is not None
    backend = SubprocessBackend(SubprocessSettings(prestart=prestart))
    durations = []
    try:
        for _ in range(calls):
            started = time.perf_counter()
            await backend.run(ToolCall(spec, {}, 10.0))
            durations.append(time.perf_counter() - started)
            if spacing_s:
                await asyncio.sleep(spacing_s)  # lets the spare child start between calls
    finally:
        await backend.aclose()
    return durations


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calls", type=int, default=50)
    args = parser.parse_args()
    print(f"{'mode':<36} {'p50 (ms)':>9} {'p90 (ms)':>9}")
    for label, prestart, spacing in (
        ("cold child per call", 0, 0.0),
        ("spare child, calls 0.3 s apart", 1, 0.3),
        ("spare child, back to back", 1, 0.0),
    ):
        d = sorted(asyncio.run(measure(prestart, args.calls, spacing)))
        print(f"{label:<36} {statistics.median(d) * 1e3:9.1f} {d[int(len(d) * 0.9)] * 1e3:9.1f}")


if __name__ == "__main__":
    main()
