"""Running the real ``agentkeel`` command in a subprocess (with pipes, or with a
terminal for stderr and stdout), and fake plugin distributions."""

from __future__ import annotations

import os
import pty
import select
import sqlite3
import subprocess
import sys
import textwrap
import time
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


def _env(env: dict[str, str] | None, path: Path | None) -> dict[str, str]:
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("OPENAI_")}
    full_env.update(env or {})
    if path is not None:
        full_env["PYTHONPATH"] = os.pathsep.join(p for p in (str(path), full_env.get("PYTHONPATH")) if p)
    return full_env


def agentkeel_on_terminal(
    *args: str,
    cwd: Path,
    env: dict[str, str] | None = None,
    path: Path | None = None,
    tty_stdout: bool = False,
    timeout: float = 60.0,
) -> subprocess.CompletedProcess[str]:
    """``python -m agentkeel ARGS`` with stderr (and with ``tty_stdout`` stdout too) on
    a pseudo-terminal; what the terminals showed comes back with ``\r\n`` as ``\n``."""
    full_env = {"TERM": "xterm", "PYTHONIOENCODING": "utf-8", **_env(env, path)}
    err_master, err_slave = pty.openpty()
    out_master, out_slave = pty.openpty() if tty_stdout else (None, None)
    proc = subprocess.Popen(
        [sys.executable, "-m", "agentkeel", *args], cwd=cwd, env=full_env, stdin=subprocess.DEVNULL,
        stdout=out_slave if out_slave is not None else subprocess.PIPE, stderr=err_slave,
    )
    os.close(err_slave)
    if out_slave is not None:
        os.close(out_slave)
    out_fd = out_master if out_master is not None else proc.stdout.fileno()  # type: ignore[union-attr]
    streams: dict[int, bytearray] = {err_master: bytearray(), out_fd: bytearray()}
    open_fds = set(streams)
    deadline = time.monotonic() + timeout
    try:
        while open_fds and time.monotonic() < deadline:
            ready, _, _ = select.select(list(open_fds), [], [], 0.1)
            for fd in ready:
                try:
                    chunk = os.read(fd, 65536)
                except OSError:  # EIO: the terminal's other end is closed
                    chunk = b""
                if chunk:
                    streams[fd] += chunk
                else:
                    open_fds.discard(fd)
        code = proc.wait(timeout=max(1.0, deadline - time.monotonic()))
    finally:
        if proc.poll() is None:
            proc.kill()
        os.close(err_master)
        if out_master is not None:
            os.close(out_master)
        if proc.stdout is not None:
            proc.stdout.close()

    def text(fd: int) -> str:
        return bytes(streams[fd]).decode("utf-8", "backslashreplace").replace("\r\n", "\n")

    return subprocess.CompletedProcess(proc.args, code, text(out_fd), text(err_master))


def progress_lines(proc: subprocess.CompletedProcess[str]) -> list[str]:
    """stderr without the ``note:`` lines: the progress a run printed (pipes, not a terminal)."""
    return [line for line in proc.stderr.splitlines() if line.strip() and not line.startswith("note: ")]


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
