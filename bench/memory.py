"""Memory: context assembly latency and retrieval quality as the store grows.

For N stored memories (1k, 10k, 100k) of one user, and the same spread over
1,000 users, it times ``assemble`` (profile, retrieval, summary, recent turns
within the token budget) for a question, p50 and p99 over many questions, on
the SQLite store (FTS5, BM25). Retrieval quality is recall@5 on generated facts
("Ann's locker code is 4417") asked with paraphrased questions ("which code
opens my locker?"): the share of questions whose fact is among the top 5.

    python bench/memory.py [--sizes 1000,10000,100000] [--questions 200]
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

from agentkeel.memory.assemble import MemorySettings, assemble
from agentkeel.memory.sqlite_store import SQLiteMemoryStore
from agentkeel.types import AgentRequest

# (fact template, paraphrased question): the question shares only some words with the fact
TOPICS = [
    ("my locker code is {v}", "which code opens my locker?"),
    ("my dentist appointment is on {v}", "when do I see the dentist?"),
    ("the wifi password at the cabin is {v}", "what is the cabin's wifi password?"),
    ("my sister's birthday falls on {v}", "when is my sister's birthday?"),
    ("I parked the car on level {v}", "where did I leave the car parked?"),
    ("our project deadline was moved to {v}", "what is the new deadline of the project?"),
    ("the invoice number for the plumber is {v}", "which invoice number did the plumber send?"),
    ("my frequent flyer number is {v}", "what is my flyer number?"),
]
FILLER = ("order", "refund", "shipping", "weather", "lunch", "meeting", "report", "train", "music", "garden",
          "budget", "email", "printer", "holiday", "coffee", "invoice", "ticket", "delivery")


def filler(rng: random.Random) -> str:
    return " ".join(rng.choice(FILLER) for _ in range(12))


def fill(store: SQLiteMemoryStore, n: int, users: int, rng: random.Random) -> list[tuple[str, str, str]]:
    """``n`` records over ``users`` users; returns (user, question, expected value) probes."""
    probes: list[tuple[str, str, str]] = []
    per_user_topics: dict[str, int] = {}
    for i in range(n):
        user = f"u{i % users}"
        k = per_user_topics.get(user, 0)
        if k < len(TOPICS) and rng.random() < 0.02 + 8 * users / n:
            fact, question = TOPICS[k]
            value = f"{rng.randrange(10**6):06d}"
            text = "user: " + fact.format(v=value)
            per_user_topics[user] = k + 1
            probes.append((user, question, value))
        else:
            text = f"user: {filler(rng)}\nassistant: {filler(rng)}"
        store.save_exchange(user, f"s{i % 7}", f"run-{i}", text, "ok", record=text, ts=1_700_000_000 + i)
    return probes


def bench(n: int, users: int, questions: int) -> None:
    rng = random.Random(n * 7 + users)
    with tempfile.TemporaryDirectory() as tmp:
        store = SQLiteMemoryStore(Path(tmp))
        started = time.perf_counter()
        probes = fill(store, n, users, rng)
        load_s = time.perf_counter() - started
        settings = MemorySettings(context_tokens=2000)
        times: list[float] = []
        found = 0
        asked = [probes[i % len(probes)] for i in range(questions)] if probes else []
        for user, question, value in asked:
            request = AgentRequest(message=question, user_id=user, session_id="bench")
            t0 = time.perf_counter()
            context = assemble(store, request, settings)
            times.append(time.perf_counter() - t0)
            top = store.search(user, question, limit=5)
            found += any(value in h.record.text for h in top)
            assert all(h.record.user_id == user for h in top)
            del context
        store.close()
    if not times:
        print(f"{n:>7} records, {users:>5} users: no probes")
        return
    times.sort()
    p50 = statistics.median(times) * 1e3
    p99 = times[min(len(times) - 1, int(len(times) * 0.99))] * 1e3
    print(f"{n:>7} records, {users:>5} users: assembly p50 {p50:6.2f} ms  p99 {p99:6.2f} ms  "
          f"recall@5 lexical {found / len(asked):.2f} ({len({p[:2] for p in probes})} facts asked "
          f"{len(asked)} times; filled in {load_s:.1f} s)")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1000,10000,100000")
    parser.add_argument("--questions", type=int, default=200)
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",") if s]
    print(f"python {sys.version.split()[0]}; SQLite store with FTS5; context_tokens 2000")
    for n in sizes:
        bench(n, 1, args.questions)
        bench(n, 1000, args.questions)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
