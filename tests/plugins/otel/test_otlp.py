"""OTLP round trips: the ``otel`` entry point configured by the standard ``OTEL_*`` variables
exports over OTLP/HTTP to a receiver on 127.0.0.1 (``receiver.py``), from the CLI and from
the service, whose Prometheus ``/metrics`` shows the same numbers as the OTLP metrics.

(No OpenTelemetry Collector installs from the package registries this project uses, so the
receiver decodes the protocol with ``opentelemetry-proto``'s own message types.)"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("agentkeel_otel")
pytest.importorskip("opentelemetry.proto")

from tests.plugins.otel.receiver import Receiver, attributes, iter_spans

DEMO = "refund order 1001 if it has shipped"


def _otel_env(receiver: Receiver) -> dict[str, str]:
    return {"OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint, "OTEL_SERVICE_NAME": "agentkeel-test",
            "OTEL_METRIC_EXPORT_INTERVAL": "200", "OTEL_BSP_SCHEDULE_DELAY": "50"}


def test_cli_run_exports_its_trace_over_otlp(tmp_path: Path) -> None:
    with Receiver() as receiver:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("AGENTKEEL_", "OPENAI_", "OTEL_"))}
        env |= {"AGENTKEEL_HOME": str(tmp_path / "home")} | _otel_env(receiver)
        done = subprocess.run([sys.executable, "-m", "agentkeel", "run", DEMO, "--user", "demo", "--json"],
                              env=env, capture_output=True, text=True, timeout=120, cwd=tmp_path)
        assert done.returncode == 0, done.stderr
        import json

        run_id = json.loads(done.stdout)["run_id"]
        receiver.wait_for(lambda: any(True for _ in iter_spans(receiver, "invoke_agent agentkeel")))
        spans = receiver.spans()
    resource = spans[0][0]
    assert resource["service.name"] == "agentkeel-test"
    names = sorted(span.name for _, span in spans)
    assert names == sorted([
        "invoke_agent agentkeel", "agentkeel.permissions", "agentkeel.memory", "agentkeel.plan",
        "agentkeel.plan_check", "agentkeel.step", "agentkeel.step", "execute_tool lookup_order",
        "execute_tool issue_refund", "agentkeel.evaluate", "agentkeel.evaluate", "agentkeel.respond"])
    (root,) = [span for _, span in spans if span.name == "invoke_agent agentkeel"]
    assert attributes(root.attributes)["agentkeel.run_id"] == run_id
    assert attributes(root.attributes)["agentkeel.status"] == "succeeded"
    assert {span.trace_id for _, span in spans} == {root.trace_id}
    (refund,) = iter_spans(receiver, "execute_tool issue_refund")
    refund_attrs = attributes(refund.attributes)
    assert refund_attrs["gen_ai.tool.name"] == "issue_refund"
    assert refund_attrs["gen_ai.tool.call.id"] == f"{run_id}:2"
    assert "gen_ai.tool.call.arguments" not in refund_attrs  # contents are off by default


def _prometheus(server: Any) -> str:
    with server.client("root") as client:
        response = client.get("/metrics")
    assert response.status_code == 200, response.text
    return str(response.text)


def test_service_metrics_match_prometheus(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("fastapi")
    from agentkeel.server.metrics import metric_value

    from tests.server.conftest import start_server

    with Receiver() as receiver:
        for key, value in _otel_env(receiver).items():
            monkeypatch.setenv(key, value)
        server = start_server(tmp_path)
        try:
            with server.client("alice") as client:
                for message in (DEMO, "where is order 1002", "refund order 1003 if it has shipped"):
                    answer = client.post("/v1/runs/wait", json={"message": message})
                    assert answer.status_code == 200, answer.text
            with server.client("carol") as client:  # carol may not refund: a denied run
                answer = client.post("/v1/runs/wait", json={"message": DEMO})
                assert answer.json()["status"] == "denied"
            text = _prometheus(server)

            def runs_total() -> float:
                return sum(p.as_int for p in receiver.latest_points("agentkeel.runs"))

            receiver.wait_for(lambda: runs_total() == 4)
        finally:
            server.stop()
        spans = list(iter_spans(receiver, "invoke_agent agentkeel"))
    by_status = {attributes(p.attributes)["status"]: p.as_int for p in receiver.latest_points("agentkeel.runs")}
    for status, count in by_status.items():
        assert metric_value(text, "agentkeel_runs_total", status=status) == count
    assert by_status == {"succeeded": 2, "waiting": 1, "denied": 1}  # 1001 is over 50: it waits
    steps = {(attributes(p.attributes)["tool"], attributes(p.attributes)["status"]): p.count
             for p in receiver.latest_points("agentkeel.step.duration")}
    assert steps
    for (tool, status), count in steps.items():
        assert metric_value(text, "agentkeel_step_duration_seconds_count", tool=tool, status=status) == count
    cost = {attributes(p.attributes)["kind"]: p.as_double for p in receiver.latest_points("agentkeel.cost")}
    assert cost["tool"] == pytest.approx(metric_value(text, "agentkeel_cost_usd_total", kind="tool", model="",
                                                      tier=""))
    assert cost["tool"] == pytest.approx(0.002 * 3)  # [tools.lookup_order] cost_usd, three lookups
    assert len(spans) == 4


def test_an_unknown_exporter_is_a_clear_error(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AGENTKEEL_", "OPENAI_", "OTEL_"))}
    env |= {"AGENTKEEL_HOME": str(tmp_path / "home"), "OTEL_TRACES_EXPORTER": "zipkn"}
    done = subprocess.run([sys.executable, "-m", "agentkeel", "run", DEMO, "--user", "demo"], env=env,
                          capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert done.returncode == 2, done.stderr
    assert "OTEL_TRACES_EXPORTER: unknown exporter 'zipkn'" in done.stderr
    assert "Traceback" not in done.stderr


async def test_capture_content_must_be_a_boolean() -> None:
    from agentkeel import Config
    from agentkeel.errors import ConfigError
    from agentkeel.runtime.system import AgentSystem
    from agentkeel_otel import Telemetry

    config = Config.from_dict({"principals": {"demo": {"permissions": []}}, "journal": {"backend": "memory"},
                               "plugins": {"otel": {"capture_content": "yes"}}})
    system = AgentSystem(config, plugins=[Telemetry()], load_entrypoints=False)
    with pytest.raises(ConfigError, match="plugins.otel.capture_content: must be true or false"):
        await system.start()
    await system.aclose()
