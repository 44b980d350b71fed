"""OpenTelemetry for agentkeel: a span per run and per phase of it, GenAI semantic
conventions for model calls and tool executions, and metrics that match the
service's Prometheus ``/metrics``.

Installed, it loads as the ``otel`` plugin and exports what the standard ``OTEL_*``
environment variables configure (``agentkeel_otel.setup``). To trace into
providers of your own, register ``Telemetry(tracer_provider=..., meter_provider=...)``
as a plugin instead (and disable the ``otel`` entry point).
"""

from agentkeel_otel.telemetry import Telemetry

__all__ = ["Telemetry"]
