"""Providers from the standard ``OTEL_*`` environment variables, for the ``otel`` entry point.

- ``OTEL_SDK_DISABLED=true``: nothing is set up (no-op tracer and meter).
- A provider the application set already (``trace.set_tracer_provider``) is used as it is.
- Otherwise an SDK provider is made and set globally when an exporter is asked for:
  ``OTEL_TRACES_EXPORTER`` / ``OTEL_METRICS_EXPORTER`` (``otlp``, ``console``, ``none``;
  comma-separated), or an OTLP endpoint (``OTEL_EXPORTER_OTLP_ENDPOINT``,
  ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT``, ``OTEL_EXPORTER_OTLP_METRICS_ENDPOINT``), which
  means ``otlp``. With neither, nothing is exported and no connection is ever made.
- ``otlp`` speaks ``OTEL_EXPORTER_OTLP_PROTOCOL`` (``http/protobuf``, the default, or
  ``grpc`` with ``pip install "agentkeel-otel[grpc]"``); the exporters read their own
  ``OTEL_EXPORTER_OTLP_*`` settings (endpoint, headers, timeout, compression), the batch
  processor ``OTEL_BSP_*``, the metric reader ``OTEL_METRIC_EXPORT_INTERVAL``, and the
  resource ``OTEL_SERVICE_NAME`` (default ``agentkeel``) and ``OTEL_RESOURCE_ATTRIBUTES``.
"""

from __future__ import annotations

import os
from typing import Any

from agentkeel.errors import ConfigError
from opentelemetry import metrics, trace


def _wanted(signal: str) -> list[str]:
    """The exporters asked for ``signal`` ("traces" or "metrics"): [] when none."""
    names = os.environ.get(f"OTEL_{signal.upper()}_EXPORTER", "").strip()
    if names:
        chosen = [n.strip().lower() for n in names.split(",") if n.strip()]
        return [] if chosen == ["none"] else chosen
    endpoints = ("OTEL_EXPORTER_OTLP_ENDPOINT", f"OTEL_EXPORTER_OTLP_{signal.upper()}_ENDPOINT")
    return ["otlp"] if any(os.environ.get(e, "").strip() for e in endpoints) else []


def _protocol(signal: str) -> str:
    return (os.environ.get(f"OTEL_EXPORTER_OTLP_{signal.upper()}_PROTOCOL")
            or os.environ.get("OTEL_EXPORTER_OTLP_PROTOCOL") or "http/protobuf").strip().lower()


def _resource() -> Any:
    from opentelemetry.sdk.resources import Resource

    attributes = {} if os.environ.get("OTEL_SERVICE_NAME") else {"service.name": "agentkeel"}
    return Resource.create(attributes)


def _span_exporter(name: str) -> Any:
    if name == "console":
        from opentelemetry.sdk.trace.export import ConsoleSpanExporter

        return ConsoleSpanExporter()
    if name != "otlp":
        raise ConfigError(f"OTEL_TRACES_EXPORTER: unknown exporter {name!r} (agentkeel-otel knows otlp, console, none)")
    protocol = _protocol("traces")
    if protocol == "grpc":
        try:
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter as GrpcSpanExporter
        except ImportError as exc:
            raise ConfigError('OTEL_EXPORTER_OTLP_PROTOCOL=grpc needs pip install "agentkeel-otel[grpc]"') from exc
        return GrpcSpanExporter()
    if protocol not in ("http/protobuf", "http"):
        raise ConfigError(f"OTEL_EXPORTER_OTLP_PROTOCOL: {protocol!r} is not supported (http/protobuf or grpc)")
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

    return OTLPSpanExporter()


def _metric_exporter(name: str) -> Any:
    if name == "console":
        from opentelemetry.sdk.metrics.export import ConsoleMetricExporter

        return ConsoleMetricExporter()
    if name != "otlp":
        raise ConfigError(f"OTEL_METRICS_EXPORTER: unknown exporter {name!r} (agentkeel-otel knows otlp, console, "
                          "none)")
    protocol = _protocol("metrics")
    if protocol == "grpc":
        try:
            from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import (
                OTLPMetricExporter as GrpcMetricExporter,
            )
        except ImportError as exc:
            raise ConfigError('OTEL_EXPORTER_OTLP_PROTOCOL=grpc needs pip install "agentkeel-otel[grpc]"') from exc
        return GrpcMetricExporter()
    if protocol not in ("http/protobuf", "http"):
        raise ConfigError(f"OTEL_EXPORTER_OTLP_PROTOCOL: {protocol!r} is not supported (http/protobuf or grpc)")
    from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter

    return OTLPMetricExporter()


def _is_sdk(provider: object) -> bool:
    return type(provider).__module__.startswith("opentelemetry.sdk")


def configure_from_environment() -> tuple[Any, Any]:
    """The tracer and meter providers to use (None: the global ones, no-op unless set)."""
    if os.environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return trace.NoOpTracerProvider(), metrics.NoOpMeterProvider()
    tracer_provider: Any = None
    meter_provider: Any = None
    if not _is_sdk(trace.get_tracer_provider()):
        exporters = _wanted("traces")
        if exporters:
            from opentelemetry.sdk.trace import TracerProvider
            from opentelemetry.sdk.trace.export import BatchSpanProcessor

            tracer_provider = TracerProvider(resource=_resource())
            for name in exporters:
                tracer_provider.add_span_processor(BatchSpanProcessor(_span_exporter(name)))
            trace.set_tracer_provider(tracer_provider)
    if not _is_sdk(metrics.get_meter_provider()):
        exporters = _wanted("metrics")
        if exporters:
            from opentelemetry.sdk.metrics import MeterProvider
            from opentelemetry.sdk.metrics.export import PeriodicExportingMetricReader

            readers = [PeriodicExportingMetricReader(_metric_exporter(name)) for name in exporters]
            meter_provider = MeterProvider(metric_readers=readers, resource=_resource())
            metrics.set_meter_provider(meter_provider)
    return tracer_provider, meter_provider


def flush(tracer_provider: Any, meter_provider: Any) -> None:
    """Export what is buffered (at a system's shutdown; the SDK shuts down at exit)."""
    for provider in (tracer_provider or trace.get_tracer_provider(), meter_provider or metrics.get_meter_provider()):
        force_flush = getattr(provider, "force_flush", None)
        if force_flush is not None:
            force_flush()
