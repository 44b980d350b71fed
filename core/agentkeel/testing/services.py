"""Real PostgreSQL and Redis servers for tests, started in a temporary directory on a free
loopback port and stopped afterwards (Debian's ``postgresql`` and ``redis-server`` packages).

``PostgresServer``: ``initdb`` (trust authentication, loopback only, fsync off: test data)
then ``pg_ctl start``; ``url`` is a ``postgresql://`` URL of a fresh database,
``new_database()`` makes another. PostgreSQL refuses to run as root, so as root the
server runs as the ``postgres`` system user (``runuser``), in a directory it owns.

``RedisServer``: ``redis-server --port N --bind 127.0.0.1 --save ''`` (nothing written to
disk); ``restart()`` stops it and starts it again on the same port (its data is gone,
as after a crash of a cache), for tests of what survives that.

``missing()`` says why a server cannot be started here (the binary is not installed),
so a test can skip with that reason, or fail under ``CI=true``.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
import uuid
from pathlib import Path
from types import TracebackType
from typing import Self

LOOPBACK = "127.0.0.1"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((LOOPBACK, 0))
        return int(s.getsockname()[1])


def _wait_port(port: int, timeout: float, what: str, log: Path | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.settimeout(0.2)
            if s.connect_ex((LOOPBACK, port)) == 0:
                return
        time.sleep(0.05)
    tail = log.read_text(errors="replace")[-2000:] if log is not None and log.exists() else ""
    raise RuntimeError(f"{what} did not listen on {LOOPBACK}:{port} within {timeout:.0f}s\n{tail}")


def postgres_bindir() -> Path | None:
    """The directory of ``initdb`` and ``pg_ctl`` (Debian keeps them out of PATH)."""
    versions = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"),
                      key=lambda p: int(Path(p).parts[-3]) if Path(p).parts[-3].isdigit() else 0)
    if versions:
        return Path(versions[-1]).parent
    found = shutil.which("initdb")
    return Path(found).parent if found else None


class PostgresServer:
    """A PostgreSQL server of a test's own (see the module docs)."""

    def __init__(self, *, port: int | None = None) -> None:
        self.port = port or free_port()
        self.bindir = postgres_bindir()
        self.root = Path(tempfile.mkdtemp(prefix="agentkeel-pg-"))
        self.data = self.root / "data"
        self.log = self.root / "server.log"
        self.user = "postgres" if os.geteuid() == 0 else pwd.getpwuid(os.geteuid()).pw_name
        self.database = "agentkeel"
        self._started = False

    @staticmethod
    def missing() -> str | None:
        if postgres_bindir() is None:
            return "PostgreSQL is not installed (apt-get install postgresql)"
        return None

    def _as_owner(self, *argv: str) -> list[str]:
        if os.geteuid() == 0:
            return ["runuser", "-u", "postgres", "--", *argv]
        return list(argv)

    def _run(self, *argv: str) -> None:
        proc = subprocess.run(self._as_owner(*argv), capture_output=True, text=True, timeout=120)
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(argv[:2])} failed ({proc.returncode}): {proc.stderr[-2000:]}")

    def start(self) -> Self:
        problem = self.missing()
        if problem:
            raise RuntimeError(problem)
        assert self.bindir is not None
        if os.geteuid() == 0:
            self.root.chmod(0o755)
            shutil.chown(self.root, "postgres", "postgres")
        self._run(str(self.bindir / "initdb"), "-D", str(self.data), "-U", self.user, "--auth=trust",
                  "--encoding=UTF8", "--locale=C.UTF-8", "--no-sync")
        options = (f"-c listen_addresses={LOOPBACK} -c port={self.port} -c unix_socket_directories={self.root} "
                   "-c fsync=off -c synchronous_commit=off -c full_page_writes=off -c max_connections=200 "
                   "-c shared_buffers=64MB")
        self._run(str(self.bindir / "pg_ctl"), "-D", str(self.data), "-l", str(self.log), "-o", options,
                  "-w", "-t", "60", "start")
        self._started = True
        _wait_port(self.port, 30, "PostgreSQL", self.log)
        self._createdb(self.database)
        return self

    def _createdb(self, name: str) -> None:
        import psycopg

        with psycopg.connect(self.url_for("postgres"), autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')

    def url_for(self, database: str) -> str:
        return f"postgresql://{self.user}@{LOOPBACK}:{self.port}/{database}"

    @property
    def url(self) -> str:
        return self.url_for(self.database)

    def new_database(self) -> str:
        """A fresh, empty database on this server; its URL."""
        name = f"t_{uuid.uuid4().hex[:12]}"
        self._createdb(name)
        return self.url_for(name)

    def stop(self) -> None:
        if self._started and self.bindir is not None:
            subprocess.run(self._as_owner(str(self.bindir / "pg_ctl"), "-D", str(self.data), "-m", "immediate",
                                          "-w", "stop"), capture_output=True, timeout=60)
            self._started = False
        shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()


class RedisServer:
    """A Redis server of a test's own (see the module docs)."""

    def __init__(self, *, port: int | None = None) -> None:
        self.port = port or free_port()
        self.root = Path(tempfile.mkdtemp(prefix="agentkeel-redis-"))
        self.log = self.root / "server.log"
        self.process: subprocess.Popen[bytes] | None = None

    @staticmethod
    def missing() -> str | None:
        if shutil.which("redis-server") is None:
            return "Redis is not installed (apt-get install redis-server)"
        return None

    @property
    def url(self) -> str:
        return f"redis://{LOOPBACK}:{self.port}/0"

    def start(self) -> Self:
        problem = self.missing()
        if problem:
            raise RuntimeError(problem)
        with self.log.open("ab") as out:
            self.process = subprocess.Popen(
                ["redis-server", "--port", str(self.port), "--bind", LOOPBACK, "--save", "", "--appendonly", "no",
                 "--dir", str(self.root), "--protected-mode", "yes"],
                stdout=out, stderr=subprocess.STDOUT)
        _wait_port(self.port, 20, "Redis", self.log)
        return self

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)
        self.process = None

    def restart(self) -> None:
        self.kill()
        self.start()

    def stop(self) -> None:
        self.kill()
        shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()
