"""``agentkeel --log-format json serve`` (or ``[logging] format = "json"``): every line the
service writes on stderr is a JSON object, uvicorn's own lines included, and each run's
events are lines with its run id (never the request's text or the tool arguments)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from agentkeel.permissions.keys_sqlite import SQLiteKeyStore
from agentkeel.testing.services import free_port

MESSAGE = "refund order 1001 if it has shipped"
CONFIG = """
[principals.alice]
permissions = ["read", "refunds"]
"""


class Served:
    def __init__(self, tmp: Path, args: list[str], config: str) -> None:
        self.home = tmp / "home"
        self.home.mkdir()
        path = tmp / "agentkeel.toml"
        path.write_text(CONFIG + config)
        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        self.stderr, self.stdout = tmp / "stderr.log", tmp / "stdout.log"
        env = {k: v for k, v in os.environ.items() if not k.startswith(("AGENTKEEL_", "OPENAI_"))}
        env |= {"AGENTKEEL_HOME": str(self.home), "AGENTKEEL_SHOP_DB": str(tmp / "shop.db")}
        command = [sys.executable, "-m", "agentkeel", *args[:args.index("serve") + 1], "--config", str(path),
                   "--host", "127.0.0.1", "--port", str(port), *args[args.index("serve") + 1:]]
        with self.stderr.open("wb") as err, self.stdout.open("wb") as out:
            self.process = subprocess.Popen(command, cwd=tmp, env=env, stdout=out, stderr=err,
                                            stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + 60
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"the server exited with {self.process.returncode}:\n{self.stderr.read_text()}")
            try:
                if httpx.get(f"{self.url}/healthz", timeout=1.0).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"the server did not start:\n{self.stderr.read_text()}")
            time.sleep(0.05)
        store = SQLiteKeyStore(self.home)
        try:
            self.key, _ = store.create("alice", name="json logs")
        finally:
            store.close()

    def run(self) -> dict[str, Any]:
        with httpx.Client(base_url=self.url, headers={"Authorization": f"Bearer {self.key}"}, timeout=30) as client:
            response = client.post("/v1/runs/wait", json={"message": MESSAGE})
        assert response.status_code == 200, response.text
        body: dict[str, Any] = response.json()
        return body

    def stop(self) -> list[dict[str, Any]]:
        """SIGTERM, then every stderr line as the JSON object it must be."""
        self.process.send_signal(signal.SIGTERM)
        assert self.process.wait(60) in (0, -signal.SIGTERM)  # uvicorn re-raises the signal it caught
        assert self.stdout.read_text() == ""
        lines = self.stderr.read_text().splitlines()
        assert lines, "the server logged nothing"
        records = [json.loads(line) for line in lines]  # fails on any line that is not JSON
        assert all(isinstance(r, dict) for r in records), lines
        return records

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)


@pytest.fixture
def serving(tmp_path: Path) -> Iterator[list[Served]]:
    started: list[Served] = []
    yield started
    for served in started:
        served.kill()


def check_uvicorn_and_shutdown(records: list[dict[str, Any]]) -> None:
    uvicorn = [r["message"] for r in records if r["logger"].startswith("uvicorn")]
    assert "Application startup complete." in uvicorn
    assert any(m.startswith("Uvicorn running on http://127.0.0.1:") for m in uvicorn)
    assert any(m.startswith("Finished server process") for m in uvicorn)
    assert any(r["logger"] == "agentkeel.server" and r["message"].startswith("shutting down") for r in records)
    assert all(set(r) >= {"ts", "level", "logger", "message"} for r in records)


def test_the_service_logs_json_lines_with_the_run_events(tmp_path: Path, serving: list[Served]) -> None:
    served = Served(tmp_path, ["--log-format", "json", "serve"], "")
    serving.append(served)
    body = served.run()
    assert body["status"] == "succeeded"
    records = served.stop()
    check_uvicorn_and_shutdown(records)
    found = [r for r in records if r["logger"] == "agentkeel.events"]
    assert [e["event"] for e in found] == ["run_started", "plan_ready", "step_started", "step_finished",
                                           "step_started", "step_finished", "answer", "run_finished"]
    assert all(e["run_id"] == body["run_id"] for e in found)
    assert [(e["step_id"], e["tool"], e["status"]) for e in found if e["event"] == "step_finished"] == [
        (1, "lookup_order", "succeeded"), (2, "issue_refund", "succeeded")]
    for record in records:
        text = json.dumps({k: v for k, v in record.items() if k not in ("ts", "run_id", "trace_id", "span_id")})
        assert "1001" not in text and "refund order" not in text and "49.99" not in text, record


def test_the_config_chooses_json_and_serve_log_level_still_counts(tmp_path: Path, serving: list[Served]) -> None:
    # [logging] says json and error; serve's own --log-level info wins over the level.
    served = Served(tmp_path, ["serve", "--log-level", "info"], '\n[logging]\nformat = "json"\nlevel = "error"\n')
    serving.append(served)
    body = served.run()
    records = served.stop()
    check_uvicorn_and_shutdown(records)
    assert any(r.get("event") == "run_finished" and r["run_id"] == body["run_id"] for r in records)


def test_serve_log_level_leaves_out_the_info_lines(tmp_path: Path, serving: list[Served]) -> None:
    served = Served(tmp_path, ["--log-format", "json", "serve", "--log-level", "warning"], "")
    serving.append(served)
    served.run()
    served.process.send_signal(signal.SIGTERM)
    assert served.process.wait(60) in (0, -signal.SIGTERM)
    lines = served.stderr.read_text().splitlines()
    assert all(json.loads(line)["level"] in ("WARNING", "ERROR", "CRITICAL") for line in lines), lines
