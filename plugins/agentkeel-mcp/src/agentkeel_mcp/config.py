"""The ``[mcp]`` section of ``agentkeel.toml``: its JSON Schema and the parsed servers.

The core only checks that ``mcp`` is a table; everything below it is validated
here, and every problem is a ``ConfigError`` naming its key path
(``mcp.servers.NAME.KEY``). Environment variables named by ``headers`` and
``env_from`` are read here too, so a missing one is refused before any server
starts.
"""

from __future__ import annotations

import os
import re
import shlex
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import attrs
import jsonschema
from agentkeel.errors import ConfigError

DEFAULT_TIMEOUT_S = 30.0
"""A tool's timeout when neither the tool nor its server sets ``timeout``."""
DEFAULT_STARTUP_TIMEOUT_S = 20.0
DEFAULT_MAX_RESTARTS = 5
DEFAULT_RESTART_WINDOW_S = 60.0
DEFAULT_RESTART_BACKOFF_S = 0.5
DEFAULT_MEMORY_MB = 512
DEFAULT_PIDS_LIMIT = 64

NAME_PATTERN = r"^[A-Za-z0-9_][A-Za-z0-9_-]*$"
_ENV_NAME = r"^[A-Za-z_][A-Za-z0-9_]*$"
_BARE_KEY = re.compile(r"^[A-Za-z0-9_-]+$")

_STRINGS = {"type": "array", "items": {"type": "string", "minLength": 1}}
_ENV_VARS = {"type": "object", "additionalProperties": {"type": "string", "pattern": _ENV_NAME}}

OVERRIDE_PROPERTIES: dict[str, Any] = {
    "permissions": _STRINGS,
    "timeout": {"type": "number", "exclusiveMinimum": 0},
    "idempotent": {"type": "boolean"},
    "rollback": {"type": "string", "minLength": 1},
    "fallback": {"type": "string", "minLength": 1},
    "rate_limit": {"type": "number", "exclusiveMinimum": 0},
    "requires_approval": {"type": "boolean"},
    "cost_usd": {"type": "number", "minimum": 0},
}
"""Keys a server section and a ``tools.TOOL`` section both take (a tool's own value wins)."""

STDIO_KEYS = frozenset({"command", "args", "env", "env_from", "cwd", "isolation", "image", "network",
                        "memory_mb", "pids_limit", "volumes"})
HTTP_KEYS = frozenset({"url", "headers"})
DOCKER_KEYS = frozenset({"image", "network", "memory_mb", "pids_limit", "volumes"})

SERVER_SCHEMA: dict[str, Any] = {
    "type": "object",
    "additionalProperties": False,
    "properties": {
        "command": {"type": "string", "minLength": 1},
        "args": {"type": "array", "items": {"type": "string"}},
        "env": {"type": "object", "additionalProperties": {"type": "string"}},
        "env_from": _ENV_VARS,
        "cwd": {"type": "string", "minLength": 1},
        "url": {"type": "string", "pattern": r"^https?://[^\s]+$"},
        "headers": _ENV_VARS,
        "prefix": {"type": "string", "pattern": r"^$|^[A-Za-z0-9_][A-Za-z0-9_.-]*$"},
        "include": _STRINGS,
        "exclude": _STRINGS,
        "startup_timeout_s": {"type": "number", "exclusiveMinimum": 0},
        "max_restarts": {"type": "integer", "minimum": 0},
        "restart_window_s": {"type": "number", "exclusiveMinimum": 0},
        "restart_backoff_s": {"type": "number", "minimum": 0},
        "isolation": {"enum": ["process", "docker"]},
        "image": {"type": "string", "minLength": 1},
        "network": {"type": "boolean"},
        "memory_mb": {"type": "integer", "minimum": 16},
        "pids_limit": {"type": "integer", "minimum": 8},
        "volumes": {"type": "object", "additionalProperties": {"type": "string", "pattern": "^/"}},
        "tools": {
            "type": "object",
            "additionalProperties": {
                "type": "object",
                "additionalProperties": False,
                "properties": OVERRIDE_PROPERTIES,
            },
        },
        **OVERRIDE_PROPERTIES,
    },
}

MCP_SCHEMA: dict[str, Any] = {
    "type": "object",
    "additionalProperties": False,
    "properties": {
        "servers": {
            "type": "object",
            "propertyNames": {"pattern": NAME_PATTERN},
            "additionalProperties": SERVER_SCHEMA,
        },
    },
}

_VALIDATOR = jsonschema.Draft202012Validator(MCP_SCHEMA)


@attrs.frozen
class Overrides:
    """What the operator says about a tool (or every tool of a server); None: not set."""

    permissions: tuple[str, ...] | None = None
    timeout: float | None = None
    idempotent: bool | None = None
    rollback: str | None = None
    fallback: str | None = None
    rate_limit: float | None = None
    requires_approval: bool | None = None
    cost_usd: float | None = None

    @classmethod
    def parse(cls, raw: Mapping[str, Any]) -> Overrides:
        def number(key: str) -> float | None:
            return float(raw[key]) if key in raw else None

        return cls(
            permissions=tuple(raw["permissions"]) if "permissions" in raw else None,
            timeout=number("timeout"),
            idempotent=raw.get("idempotent"),
            rollback=raw.get("rollback"),
            fallback=raw.get("fallback"),
            rate_limit=number("rate_limit"),
            requires_approval=raw.get("requires_approval"),
            cost_usd=number("cost_usd"),
        )


@attrs.frozen
class ServerConfig:
    """One ``[mcp.servers.NAME]``, validated, with its environment variables resolved."""

    name: str
    transport: Literal["stdio", "http"]
    command: str | None = None
    args: tuple[str, ...] = ()
    env: Mapping[str, str] = attrs.field(factory=dict, repr=False)
    cwd: str | None = None
    url: str | None = None
    headers: Mapping[str, str] = attrs.field(factory=dict, repr=False)
    """Header name -> value (read from the environment: secret, never shown)."""
    prefix: str = ""
    include: frozenset[str] | None = None
    exclude: frozenset[str] = frozenset()
    overrides: Overrides = Overrides()
    tools: Mapping[str, Overrides] = attrs.field(factory=dict)
    startup_timeout_s: float = DEFAULT_STARTUP_TIMEOUT_S
    max_restarts: int = DEFAULT_MAX_RESTARTS
    restart_window_s: float = DEFAULT_RESTART_WINDOW_S
    restart_backoff_s: float = DEFAULT_RESTART_BACKOFF_S
    isolation: Literal["process", "docker"] = "process"
    image: str | None = None
    network: bool = False
    memory_mb: int = DEFAULT_MEMORY_MB
    pids_limit: int = DEFAULT_PIDS_LIMIT
    volumes: Mapping[str, str] = attrs.field(factory=dict)
    """Docker: host path -> container path, mounted read-only."""

    @property
    def section(self) -> str:
        """``[mcp.servers.NAME]``, as the operator wrote it."""
        return f"[mcp.servers.{toml_key(self.name)}]"

    def tool_section(self, tool: str) -> str:
        return f"[mcp.servers.{toml_key(self.name)}.tools.{toml_key(tool)}]"

    @property
    def command_line(self) -> str:
        return shlex.join([self.command or "", *self.args])

    @property
    def source(self) -> str:
        """Where the tools come from, for ``ToolSpec.source`` and messages (never a secret)."""
        if self.transport == "http":
            return f"mcp streamable-http server {self.name!r}: {_without_userinfo(self.url or '')}"
        if self.isolation == "docker":
            return f"mcp stdio server {self.name!r} in docker image {self.image}: {self.command_line}"
        return f"mcp stdio server {self.name!r}: {self.command_line}"

    @property
    def label(self) -> str:
        """How messages name the server: ``mcp server 'files' (python server.py)``."""
        target = _without_userinfo(self.url or "") if self.transport == "http" else self.command_line
        return f"mcp server {self.name!r} ({target})"

    def key(self) -> tuple[Any, ...]:
        """What makes two configurations the same running server (secrets included, in memory only)."""
        return (self.name, self.transport, self.command, self.args, tuple(sorted(self.env.items())), self.cwd,
                self.url, tuple(sorted(self.headers.items())), self.isolation, self.image, self.network,
                self.memory_mb, self.pids_limit, tuple(sorted(self.volumes.items())), self.startup_timeout_s,
                self.max_restarts, self.restart_window_s, self.restart_backoff_s)

    def tool_name(self, remote: str) -> str:
        """The agentkeel name of the server's tool ``remote``: ``prefix.remote`` (bare with ``prefix = ""``)."""
        return f"{self.prefix}.{remote}" if self.prefix else remote


def toml_key(key: str) -> str:
    return key if _BARE_KEY.match(key) else '"' + key.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _without_userinfo(url: str) -> str:
    return re.sub(r"^(https?://)[^/@]*@", r"\1", url)


def _where(path: Sequence[Any]) -> str:
    return ".".join(["mcp", *(str(p) for p in path)])


def _message(error: jsonschema.ValidationError) -> str:
    where = _where(error.absolute_path)
    if error.validator == "additionalProperties" and isinstance(error.instance, Mapping):
        allowed = set(error.schema.get("properties") or {})
        unknown = sorted(k for k in error.instance if k not in allowed)
        if unknown:
            names = ", ".join(f"{where}.{k}" for k in unknown)
            return f"{names}: unknown key; {where} takes {', '.join(sorted(allowed))}"
    if error.validator == "propertyNames" or "propertyNames" in error.absolute_schema_path:
        return f"{where}: {error.instance!r} is not a valid server name (letters, digits, '_' and '-')"
    if error.validator == "pattern" and error.absolute_path and error.absolute_path[-1] == "url":
        return f"{where}: {error.instance!r} is not an http:// or https:// URL"
    return f"{where}: {error.message}"


def parse(raw: Mapping[str, Any], *, source: str = "<config>", base_dir: Path | None = None,
          environ: Mapping[str, str] | None = None) -> list[ServerConfig]:
    """Validate ``[mcp]`` and return its servers, in the order they are written.

    ``base_dir`` resolves a relative ``cwd`` (the config file's folder); ``environ``
    (default ``os.environ``) is where ``headers`` and ``env_from`` values are read.
    """
    errors = sorted(_VALIDATOR.iter_errors(raw), key=lambda e: [str(p) for p in e.absolute_path])
    if errors:
        raise ConfigError(f"invalid configuration in {source}:\n  " + "\n  ".join(_message(e) for e in errors))
    env = os.environ if environ is None else environ
    servers = [_server(name, dict(section), source, base_dir, env)
               for name, section in (raw.get("servers") or {}).items()]
    return servers


def _fail(source: str, message: str) -> ConfigError:
    return ConfigError(f"invalid configuration in {source}: {message}")


def _server(name: str, raw: dict[str, Any], source: str, base_dir: Path | None,
            environ: Mapping[str, str]) -> ServerConfig:
    where = f"mcp.servers.{name}"
    if "command" in raw and "url" in raw:
        raise _fail(source, f"{where}: give either command (a stdio server) or url (a streamable-HTTP server), "
                            "not both")
    if "command" not in raw and "url" not in raw:
        raise _fail(source, f"{where}: needs command (a stdio server to start) or url (a streamable-HTTP server)")
    transport: Literal["stdio", "http"] = "stdio" if "command" in raw else "http"
    wrong = sorted(set(raw) & (HTTP_KEYS if transport == "stdio" else STDIO_KEYS))
    if wrong:
        kind = "streamable-HTTP servers (url = ...)" if transport == "stdio" else "stdio servers (command = ...)"
        raise _fail(source, f"{', '.join(f'{where}.{k}' for k in wrong)}: only for {kind}")
    isolation = raw.get("isolation", "process")
    docker_only = sorted(set(raw) & DOCKER_KEYS)
    if docker_only and isolation != "docker":
        raise _fail(source, f"{', '.join(f'{where}.{k}' for k in docker_only)}: only with isolation = \"docker\"")
    if isolation == "docker" and "image" not in raw:
        raise _fail(source, f"{where}.image: isolation = \"docker\" needs the image that has the server installed")
    for key in ("include", "exclude"):
        if key in raw and len(set(raw[key])) != len(raw[key]):
            raise _fail(source, f"{where}.{key}: names a tool twice")
    if "include" in raw and "exclude" in raw and set(raw["include"]) & set(raw["exclude"]):
        both = sorted(set(raw["include"]) & set(raw["exclude"]))
        raise _fail(source, f"{where}: {', '.join(both)} both included and excluded")
    headers = {header: _env_value(environ, var, f"{where}.headers.{header}", name, source)
               for header, var in raw.get("headers", {}).items()}
    env = dict(raw.get("env", {}))
    for key, var in raw.get("env_from", {}).items():
        if key in env:
            raise _fail(source, f"{where}.env_from.{key}: also set in {where}.env; set it in one of them")
        env[key] = _env_value(environ, var, f"{where}.env_from.{key}", name, source)
    cwd = raw.get("cwd")
    if isolation == "docker":
        if cwd is not None and not cwd.startswith("/"):
            raise _fail(source, f"{where}.cwd: with isolation = \"docker\" it is a path in the container: "
                                "it must be absolute")
    elif cwd is not None and base_dir is not None and not Path(cwd).is_absolute():
        cwd = str(base_dir / cwd)
    volumes: dict[str, str] = {}
    for host, target in raw.get("volumes", {}).items():
        path = Path(host) if Path(host).is_absolute() or base_dir is None else base_dir / host
        volumes[str(path)] = target
    return ServerConfig(
        name=name,
        transport=transport,
        command=raw.get("command"),
        args=tuple(raw.get("args", ())),
        env=env,
        cwd=cwd,
        url=raw.get("url"),
        headers=headers,
        prefix=raw.get("prefix", name),
        include=frozenset(raw["include"]) if "include" in raw else None,
        exclude=frozenset(raw.get("exclude", ())),
        overrides=Overrides.parse(raw),
        tools={tool: Overrides.parse(values) for tool, values in raw.get("tools", {}).items()},
        startup_timeout_s=float(raw.get("startup_timeout_s", DEFAULT_STARTUP_TIMEOUT_S)),
        max_restarts=int(raw.get("max_restarts", DEFAULT_MAX_RESTARTS)),
        restart_window_s=float(raw.get("restart_window_s", DEFAULT_RESTART_WINDOW_S)),
        restart_backoff_s=float(raw.get("restart_backoff_s", DEFAULT_RESTART_BACKOFF_S)),
        isolation=isolation,
        image=raw.get("image"),
        network=bool(raw.get("network", False)),
        memory_mb=int(raw.get("memory_mb", DEFAULT_MEMORY_MB)),
        pids_limit=int(raw.get("pids_limit", DEFAULT_PIDS_LIMIT)),
        volumes=volumes,
    )


def _env_value(environ: Mapping[str, str], var: str, where: str, server: str, source: str) -> str:
    value = environ.get(var)
    if value is None:
        raise _fail(source, f"{where}: mcp server {server!r} reads it from the environment variable {var}, "
                            f"which is not set; export {var} (or remove the key)")
    return value
