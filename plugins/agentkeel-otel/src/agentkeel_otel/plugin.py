"""The ``otel`` entry point: one ``Telemetry`` per process, configured from ``OTEL_*``
(``agentkeel_otel.setup``) when the first system uses it."""

from __future__ import annotations

from collections.abc import Awaitable, Generator
from typing import Any

from agentkeel.markers import hookimpl
from agentkeel.types import Event

from agentkeel_otel.setup import configure_from_environment, flush
from agentkeel_otel.telemetry import Telemetry

_telemetry: Telemetry | None = None
_providers: tuple[Any, Any] = (None, None)


def telemetry() -> Telemetry:
    """The process's ``Telemetry``, made on first use."""
    global _telemetry, _providers
    if _telemetry is None:
        _providers = configure_from_environment()
        _telemetry = Telemetry(*_providers)
    return _telemetry


@hookimpl
def agentkeel_startup(config: Any) -> None:
    telemetry().agentkeel_startup(config)


@hookimpl
def agentkeel_shutdown() -> None:
    if _telemetry is not None:
        _telemetry.agentkeel_shutdown()
        flush(*_providers)


@hookimpl
def agentkeel_event(event: Event) -> None:
    telemetry().agentkeel_event(event)


@hookimpl(wrapper=True)
def agentkeel_call_tool(call: Any, sandbox: Any, run: Any) -> Generator[None, Any, Awaitable[Any]]:
    inner: Awaitable[Any] = yield
    return telemetry()._traced_call(inner, call, sandbox)
