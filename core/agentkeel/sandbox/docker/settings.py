"""Hardened container settings for the docker sandbox, read from ``[sandbox.docker]``.

Security switches are fixed and not configurable: non-root user, no network,
read-only root filesystem, all capabilities dropped, ``no-new-privileges``, an
empty environment, and *no* init process: the runner itself is PID 1, so that
nothing else in the container holds its stdout (the reply channel the host
trusts) and, being non-dumpable, nothing can reach it through ``/proc/1`` or
ptrace, stop it or kill it (``sandbox_images/python/runner.py``). Resource limits have safe defaults that the
operator may set in ``[sandbox.docker]``; a tool may only *tighten* them in
``[sandbox.docker.tools.NAME]`` (a looser per-tool value is a ``ConfigError``, so
nothing is loosened silently).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import attrs

from agentkeel.errors import ConfigError

SANDBOX_UID = 10001
WORKDIR = "/work"
# sandbox_images/python/runner.py PROTOCOL and the image label io.agentkeel.protocol;
# 2: replies carry agentkeel.sandbox.envelope; 3: per-call key in the request, replies "<HMAC> <JSON>".
RUNNER_PROTOCOL = 3

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmg]?)i?b?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "k": 1024, "m": 1024**2, "g": 1024**3}

# Limits a tool may tighten; each is "smaller is tighter".
TIGHTENABLE = ("memory", "cpus", "pids_limit", "tmpfs_size", "output_limit", "result_limit")


def parse_size(value: Any, field: str) -> int:
    """Bytes from an int or a string such as ``"256m"`` / ``"1g"``; ConfigError names ``field``."""
    if isinstance(value, bool):
        raise ConfigError(f"sandbox.docker.{field}: expected a size such as '256m', got {value!r}")
    if isinstance(value, int) and value > 0:
        return value
    match = _SIZE.match(str(value)) if isinstance(value, str) else None
    if not match:
        raise ConfigError(f"sandbox.docker.{field}: expected a size such as '256m', got {value!r}")
    size = int(float(match.group(1)) * _UNITS[match.group(2).lower()])
    if size <= 0:
        raise ConfigError(f"sandbox.docker.{field}: must be positive, got {value!r}")
    return size


def _positive(value: Any, field: str, kind: type) -> Any:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
        raise ConfigError(f"sandbox.docker.{field}: expected a positive number, got {value!r}")
    return kind(value)


@attrs.frozen
class Limits:
    """Resource limits of one container. Smaller is tighter for every field."""

    memory: int = 256 * 1024**2
    cpus: float = 1.0
    pids_limit: int = 128
    tmpfs_size: int = 64 * 1024**2
    output_limit: int = 64 * 1024
    result_limit: int = 1024 * 1024

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any], base: Limits | None = None, where: str = "") -> Limits:
        values: dict[str, Any] = {}
        for key, raw in data.items():
            field = f"{where}{key}"
            if key in ("memory", "tmpfs_size", "output_limit", "result_limit"):
                values[key] = parse_size(raw, field)
            elif key == "cpus":
                values[key] = _positive(raw, field, float)
            elif key == "pids_limit":
                values[key] = _positive(raw, field, int)
        return attrs.evolve(base or cls(), **values)

    def tightened(self, overrides: Mapping[str, Any], tool: str) -> Limits:
        """These limits with ``overrides`` applied; ConfigError if any override loosens one."""
        unknown = sorted(set(overrides) - set(TIGHTENABLE))
        if unknown:
            raise ConfigError(
                f"sandbox.docker.tools.{tool}: unknown keys {unknown}; a tool may set {list(TIGHTENABLE)}"
            )
        new = Limits.from_mapping(overrides, self, where=f"tools.{tool}.")
        for key in overrides:
            if getattr(new, key) > getattr(self, key):
                raise ConfigError(
                    f"sandbox.docker.tools.{tool}.{key}: {overrides[key]!r} is looser than the sandbox default "
                    f"({getattr(self, key)!r}); a tool may only tighten limits. Raise [sandbox.docker].{key} "
                    f"instead if every tool should get more."
                )
        return new


_KNOWN_KEYS = {
    "pool_size", "pools", "prewarm", "grace_s", "base_url", "user", "runtime", "log_max_size", "tools",
    "sandbox_image", "base_image", *TIGHTENABLE,
}


@attrs.frozen
class DockerSettings:
    """Everything the docker backend needs from configuration."""

    limits: Limits = Limits()
    tool_limits: Mapping[str, Limits] = attrs.field(factory=dict)
    pool_size: int = 2
    pools: Mapping[str, int] = attrs.field(factory=dict)
    prewarm: tuple[str, ...] = ()
    grace_s: float = 3.0
    base_url: str | None = None
    uid: int = SANDBOX_UID
    runtime: str | None = None
    log_max_size: str = "1m"
    sandbox_image: str | None = None
    base_image: str | None = None

    @classmethod
    def from_config(cls, section: Mapping[str, Any]) -> DockerSettings:
        """Validate ``[sandbox.docker]``; raises ConfigError naming the bad field."""
        unknown = sorted(set(section) - _KNOWN_KEYS)
        if unknown:
            raise ConfigError(f"sandbox.docker: unknown keys {unknown}; known: {sorted(_KNOWN_KEYS)}")
        limits = Limits.from_mapping(section)
        tools = section.get("tools", {})
        if not isinstance(tools, Mapping):
            raise ConfigError("sandbox.docker.tools: expected a table of tool name -> limits")
        tool_limits = {name: limits.tightened(values, name) for name, values in tools.items()}
        uid = section.get("user", SANDBOX_UID)
        if isinstance(uid, bool) or not isinstance(uid, int) or uid <= 0:
            raise ConfigError(f"sandbox.docker.user: expected a non-root numeric uid (> 0), got {uid!r}")
        pool_size = section.get("pool_size", 2)
        if isinstance(pool_size, bool) or not isinstance(pool_size, int) or pool_size < 0:
            raise ConfigError(f"sandbox.docker.pool_size: expected an integer >= 0, got {pool_size!r}")
        pools = section.get("pools", {})
        if not isinstance(pools, Mapping) or not all(
            isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in pools.values()
        ):
            raise ConfigError("sandbox.docker.pools: expected a table of image -> pool size (integer >= 0)")
        prewarm = section.get("prewarm", [])
        if not isinstance(prewarm, list) or not all(isinstance(i, str) for i in prewarm):
            raise ConfigError("sandbox.docker.prewarm: expected a list of image names")
        return cls(
            limits=limits,
            tool_limits=tool_limits,
            pool_size=pool_size,
            pools=dict(pools),
            prewarm=tuple(prewarm),
            grace_s=_positive(section.get("grace_s", 3.0), "grace_s", float),
            base_url=section.get("base_url"),
            uid=uid,
            runtime=section.get("runtime"),
            log_max_size=str(section.get("log_max_size", "1m")),
            sandbox_image=section.get("sandbox_image"),
            base_image=section.get("base_image"),
        )

    def limits_for(self, tool: str) -> Limits:
        return self.tool_limits.get(tool, self.limits)

    def pool_size_for(self, image: str) -> int:
        return int(self.pools.get(image, self.pool_size))


def host_config_kwargs(settings: DockerSettings, limits: Limits) -> dict[str, Any]:
    """Arguments for ``APIClient.create_host_config``: the hardened defaults."""
    size = limits.tmpfs_size
    user_tmpfs = f"rw,noexec,nosuid,nodev,size={size},uid={settings.uid},gid={settings.uid},mode=0700"
    kwargs: dict[str, Any] = {
        "network_mode": "none",
        "read_only": True,
        "cap_drop": ["ALL"],
        "security_opt": ["no-new-privileges:true"],
        "pids_limit": limits.pids_limit,
        "mem_limit": limits.memory,
        "memswap_limit": limits.memory,
        "nano_cpus": int(limits.cpus * 1e9),
        # Explicitly off (a daemon may default to --init): the runner must be PID 1.
        "init": False,
        "ipc_mode": "private",
        "tmpfs": {"/tmp": f"rw,noexec,nosuid,nodev,size={size},mode=1777", WORKDIR: user_tmpfs},
        "ulimits": [{"Name": "core", "Soft": 0, "Hard": 0}, {"Name": "nofile", "Soft": 256, "Hard": 256}],
        "log_config": {"Type": "json-file", "Config": {"max-size": settings.log_max_size, "max-file": "1"}},
    }
    if settings.runtime:
        kwargs["runtime"] = settings.runtime
    return kwargs
