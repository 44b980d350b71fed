"""Fixtures of the service tests: a real ``agentkeel serve`` (uvicorn) in a child process on a
free loopback port, with its own ``AGENTKEEL_HOME``, principals and API keys.

Principals: ``alice`` (read, refunds; refunds over 50 wait for approval), ``bob``
(read, approve), ``carol`` (read), ``root`` (admin, approve, read). Keys are created
in the server's SQLite key store from the test process (the same file the server reads).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import attrs
import httpx
import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from agentkeel.permissions.keys_sqlite import SQLiteKeyStore

REPO = Path(__file__).resolve().parents[2]

CONFIG = """
[principals.alice]
permissions = ["read", "refunds"]
approval.issue_refund = {{ amount = {{ exclusiveMinimum = 50 }} }}

[principals.bob]
permissions = ["read", "approve"]

[principals.carol]
permissions = ["read"]

[principals.dave]
permissions = ["read"]

[principals.root]
permissions = ["admin", "approve", "read", "refunds", "email"]

[tools.lookup_order]
cost_usd = 0.002

[journal]
lease_ttl_s = {lease_ttl}

[server]
max_inflight = {max_inflight}
max_queue = {max_queue}
max_body_bytes = 65536
shutdown_grace_s = {grace}
cancel_wait_s = 20
heartbeat_s = 1
sweep_interval_s = {sweep}
"""


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@attrs.define
class LiveServer:
    """A running server: its URL, home, keys by principal, and the child process."""

    url: str
    home: Path
    config: Path
    process: subprocess.Popen[bytes]
    log: Path
    slow_log: Path
    keys: dict[str, str] = attrs.field(factory=dict)
    store_url: str = ""

    def key(self, principal: str, **kwargs: Any) -> str:
        store: Any = SQLiteKeyStore(self.home)
        if self.store_url:
            from agentkeel.permissions.keys_pg import PostgresKeyStore

            store.close()
            store = PostgresKeyStore(self.store_url)
        try:
            secret, _ = store.create(principal, **kwargs)
        finally:
            store.close()
        return secret

    def client(self, principal: str | None = None, **kwargs: Any) -> httpx.Client:
        headers = {"Authorization": f"Bearer {self.keys[principal]}"} if principal else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=30.0, **kwargs)

    def marks(self) -> list[str]:
        return self.slow_log.read_text().splitlines() if self.slow_log.exists() else []

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60.0) -> int:
        if self.process.poll() is None:
            self.process.send_signal(sig)
        return self.process.wait(timeout)

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""


def start_server(tmp: Path, *, home: Path | None = None, max_inflight: int = 4, max_queue: int = 8, grace: float = 10.0,
                 extra: str = "", env_extra: dict[str, str] | None = None, lease_ttl: float = 5.0,
                 sweep: float = 0.0, store_url: str = "", redis_url: str = "") -> LiveServer:
    home = home or tmp / "home"
    home.mkdir(parents=True, exist_ok=True)
    tmp.mkdir(parents=True, exist_ok=True)
    config = tmp / "agentkeel.toml"
    config.write_text(textwrap.dedent(CONFIG.format(max_inflight=max_inflight, max_queue=max_queue,
                                                    grace=grace, lease_ttl=lease_ttl, sweep=sweep))
                      + (f'\n[store]\nurl = "{store_url}"\n' if store_url else "")
                      + (f'\n[shared]\nredis_url = "{redis_url}"\n' if redis_url else "") + extra)
    port = free_port()
    log = tmp / "server.log"
    slow_log = home / "slow.log"  # shared by servers on one home
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AGENTKEEL_", "OPENAI_"))}
    env |= {"AGENTKEEL_HOME": str(home), "SLOW_LOG": str(slow_log), "PYTHONPATH": str(REPO)} | (env_extra or {})
    with log.open("wb") as out:
        process = subprocess.Popen([sys.executable, "-m", "tests.server.launch", str(config), str(port)],
                                   cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)
    server = LiveServer(f"http://127.0.0.1:{port}", home, config, process, log, slow_log, store_url=store_url)
    deadline = time.monotonic() + 60
    while True:
        if process.poll() is not None:
            raise RuntimeError(f"the server exited with {process.returncode}:\n{server.output()}")
        try:
            if httpx.get(f"{server.url}/healthz", timeout=1.0).status_code == 200:
                break
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            process.kill()
            raise RuntimeError(f"the server did not start:\n{server.output()}")
        time.sleep(0.05)
    for principal in ("alice", "bob", "carol", "dave", "root"):
        server.keys[principal] = server.key(principal, name=f"test key of {principal}")
    if store_url:
        from agentkeel import pg

        pg.close_all()  # the test process's pool: a later test's server gets a database of its own
    return server


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    """One server shared by a module's tests."""
    live = start_server(tmp_path_factory.mktemp("server"))
    try:
        yield live
    finally:
        if live.process.poll() is None:
            live.stop()


@pytest.fixture
def fresh_server(tmp_path: Path) -> Iterator[LiveServer]:
    """A server of the test's own (to stop, overload or kill)."""
    live = start_server(tmp_path)
    try:
        yield live
    finally:
        if live.process.poll() is None:
            live.process.kill()
            live.process.wait(10)
