"""Running the real ``agentkeel`` command in a subprocess, and fake plugin distributions."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

Arg = str | bytes


def agentkeel(
    *args: Arg,
    cwd: Path,
    env: dict[str, str] | None = None,
    input: str | bytes | None = None,
    path: Path | None = None,
) -> subprocess.CompletedProcess[str]:
    """``python -m agentkeel ARGS`` with no OpenAI settings; ``path`` goes first on PYTHONPATH.

    Arguments may be bytes, to pass what a shell would pass for text that is not UTF-8.
    """
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("OPENAI_")}
    full_env.update(env or {})
    if path is not None:
        full_env["PYTHONPATH"] = os.pathsep.join(p for p in (str(path), full_env.get("PYTHONPATH")) if p)
    data = input.encode() if isinstance(input, str) else input
    proc = subprocess.run(
        [sys.executable, "-m", "agentkeel", *args],
        cwd=cwd, env=full_env, capture_output=True, input=data, timeout=60,
        stdin=subprocess.DEVNULL if data is None else None,
    )
    return subprocess.CompletedProcess(
        proc.args, proc.returncode,
        proc.stdout.decode("utf-8", "backslashreplace"), proc.stderr.decode("utf-8", "backslashreplace"),
    )


def errors(proc: subprocess.CompletedProcess[str]) -> list[str]:
    """stderr without the ``note:`` lines and Python warnings: what the command reported."""
    return [
        line for line in proc.stderr.splitlines()
        if line.strip() and not line.startswith("note: ") and "Warning" not in line and not line.startswith("  ")
    ]


def refunds(shop_db: str) -> list[tuple[Any, ...]]:
    if not Path(shop_db).exists():
        return []  # no tool touched the shop
    with sqlite3.connect(shop_db) as db:
        return db.execute("SELECT order_id, amount, status FROM refunds").fetchall()


def fake_plugin(site: Path, name: str, source: str) -> Path:
    """A plugin distribution ``NAME-plugin`` in ``site`` whose ``agentkeel`` entry point
    ``NAME`` is module ``NAME_mod`` with ``source``; put ``site`` on PYTHONPATH to install it."""
    site.mkdir(parents=True, exist_ok=True)
    info = site / f"{name}_plugin-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}-plugin\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(f"[agentkeel]\n{name} = {name}_mod\n")
    (site / f"{name}_mod.py").write_text(textwrap.dedent(source))
    return site
