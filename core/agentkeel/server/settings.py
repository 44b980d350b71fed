"""``[server]``: how the service runs (read once, when the app is built)."""

from __future__ import annotations

import attrs

from agentkeel.config import Config


@attrs.frozen
class ServerSettings:
    host: str = "127.0.0.1"
    """Loopback unless told otherwise: exposing the service is a deliberate act."""
    port: int = 8000
    max_inflight: int = 8
    """Runs executing at once on this replica; more wait in the queue."""
    max_queue: int = 64
    """Runs admitted and waiting for a slot; beyond it a run is refused with 429."""
    max_body_bytes: int = 1 << 20
    """A request body over this is refused with 413 before it is read further."""
    shutdown_grace_s: float = 30.0
    """On SIGTERM: how long running steps may take to finish before they are interrupted."""
    cancel_wait_s: float = 30.0
    """How long ``POST /v1/runs/{id}/cancel`` waits for the run to stop before answering 202."""
    heartbeat_s: float = 15.0
    """A stream with no event for this long gets a comment line, so proxies keep it open."""
    sweep_interval_s: float = 10.0
    """How often this replica looks for runs nobody holds, to finish them (0: never)."""
    public_metrics: bool = False
    """``/metrics`` without an API key (default: an admin key is needed)."""

    @classmethod
    def from_config(cls, config: Config) -> ServerSettings:
        section = dict(config.section("server"))
        return cls(**{f.name: section[f.name] for f in attrs.fields(cls) if f.name in section})
