"""Configuration: ``agentkeel.toml``, validated with JSON Schema.

Found, in order: the path given (``--config``), ``$AGENTKEEL_CONFIG``,
``./agentkeel.toml``; otherwise the embedded defaults (``default_config.toml``),
which define a ``demo`` principal so the demo runs offline out of the box.
"""

from __future__ import annotations

import math
import os
import tomllib
from collections.abc import Mapping
from importlib import resources
from pathlib import Path
from typing import Any

import attrs
import jsonschema
import platformdirs

from agentkeel.errors import ConfigError
from agentkeel.patterns import check_schema
from agentkeel.types import Principal

CONFIG_FILENAME = "agentkeel.toml"

DEFAULT_MAX_STEPS = 50
"""``[planner] max_steps``: the most steps a plan may have, whichever planner produced it."""
DEFAULT_MAX_ROUNDS = 5
"""``[planner] max_rounds``: the most plan revisions of rounds (the first plan included) in one run."""
DEFAULT_MAX_REPLANS = 1
"""``[recovery] max_replans``: how many times one run may replan after a failed step."""
DEFAULT_MAX_PARALLEL = 16
"""``[executor] max_parallel``: the most steps of one run that run at the same time."""
DEFAULT_APPROVAL_TTL_S = 86400.0
"""``[approvals] ttl_s``: how long an approval stays pending before it expires as a denial."""

SCOPE_FIELDS = ("per_session_usd", "per_user_daily_usd", "per_principal_monthly_usd")
"""``[budget]`` limits beyond the per-request default (a principal may set its own under ``budget``)."""
DEFAULT_RESERVATION_TTL_S = 600.0
"""``[budget] reservation_ttl_s``: how long an unsettled reservation holds money (a crashed process's expire)."""

_NUMBER = {"type": "number"}
_POSITIVE = {"type": "number", "exclusiveMinimum": 0}
_STRINGS = {"type": "array", "items": {"type": "string"}}

CONFIG_SCHEMA: dict[str, Any] = {
    "type": "object",
    "additionalProperties": False,
    "properties": {
        "home": {"type": "string"},
        "principals": {
            "type": "object",
            "additionalProperties": {
                "type": "object",
                "additionalProperties": False,
                "required": ["permissions"],
                "properties": {
                    "permissions": _STRINGS,
                    "tools": _STRINGS,
                    "constraints": {
                        "type": "object",
                        "additionalProperties": {"type": "object"},
                    },
                    "approval": {
                        "type": "object",
                        "additionalProperties": {"oneOf": [{"const": True}, {"type": "object"}]},
                    },
                    "budget": {
                        "type": "object",
                        "additionalProperties": False,
                        "properties": {scope: {"type": "number", "minimum": 0} for scope in SCOPE_FIELDS},
                    },
                },
            },
        },
        "models": {
            "type": "object",
            "additionalProperties": False,
            "properties": {
                "base_url": {"type": "string"},
                "timeout_s": _POSITIVE,
                "tiers": {
                    "type": "array",
                    "items": {
                        "type": "object",
                        "additionalProperties": False,
                        "required": ["name", "model"],
                        "properties": {
                            "name": {"type": "string", "minLength": 1},
                            "model": {"type": "string", "minLength": 1},
                            "max_tokens": {"type": "integer", "minimum": 1},
                            "temperature": _NUMBER,
                            "timeout_s": _POSITIVE,
                        },
                    },
                },
            },
        },
        "planner": {
            "type": "object",
            "additionalProperties": False,
            "properties": {
                "max_steps": {"type": "integer", "minimum": 1},
                "max_rounds": {"type": "integer", "minimum": 1, "maximum": 100},
            },
        },
        "executor": {
            "type": "object",
            "additionalProperties": False,
            "properties": {
                "max_parallel": {"type": "integer", "minimum": 1, "maximum": 256},
                "order_effects": {"type": "boolean"},
            },
        },
        "recovery": {
            "type": "object",
            "additionalProperties": False,
            "properties": {"max_replans": {"type": "integer", "minimum": 0, "maximum": 20}},
        },
        "judge": {
            "type": "object",
            "additionalProperties": False,
            "properties": {
                "rubric": {"type": "string"},
                "tools": _STRINGS,
                "min_score": {"type": "number", "minimum": 0, "maximum": 1},
                "tier": {"type": "string", "minLength": 1},
                "max_tokens": {"type": "integer", "minimum": 16},
                "answers": {"type": "boolean"},
            },
        },
        "approvals": {
            "type": "object",
            "additionalProperties": False,
            "properties": {"ttl_s": _POSITIVE, "allow_self": {"type": "boolean"}},
        },
        "shared": {
            "type": "object",
            "additionalProperties": False,
            "properties": {"redis_url": {"type": "string", "pattern": "^rediss?://"},
                           "fail_mode": {"enum": ["refuse", "allow"]}},
        },
        "store": {
            "type": "object",
            "additionalProperties": False,
            "properties": {"url": {"type": "string", "minLength": 1}, "url_env": {"type": "string", "minLength": 1}},
        },
        "server": {
            "type": "object",
            "additionalProperties": False,
            "properties": {
                "host": {"type": "string", "minLength": 1},
                "port": {"type": "integer", "minimum": 0, "maximum": 65535},
                "max_inflight": {"type": "integer", "minimum": 1, "maximum": 10_000},
                "max_queue": {"type": "integer", "minimum": 0, "maximum": 1_000_000},
                "max_body_bytes": {"type": "integer", "minimum": 1024, "maximum": 1 << 30},
                "shutdown_grace_s": {"type": "number", "minimum": 0},
                "cancel_wait_s": {"type": "number", "minimum": 0},
                "heartbeat_s": _POSITIVE,
                "sweep_interval_s": {"type": "number", "minimum": 0},
                "public_metrics": {"type": "boolean"},
            },
        },
        "memory": {
            "type": "object",
            "additionalProperties": False,
            "properties": {
                "backend": {"enum": ["sqlite", "memory"]},
                "context_tokens": {"type": "integer", "minimum": 0, "maximum": 1_000_000},
                "recent_turns": {"type": "integer", "minimum": 0, "maximum": 10_000},
                "profile_share": {"type": "number", "minimum": 0, "maximum": 1},
                "memories_share": {"type": "number", "minimum": 0, "maximum": 1},
                "summary_share": {"type": "number", "minimum": 0, "maximum": 1},
                "max_records": {"type": "integer", "minimum": 0, "maximum": 100},
                "min_score": {"type": "number", "minimum": 0},
                "write": {"type": "array", "items": {"enum": ["answers", "facts"]}, "uniqueItems": True},
                "max_record_bytes": {"type": "integer", "minimum": 64, "maximum": 1_048_576},
                "ttl_days": {"type": "number", "minimum": 0},
                "embedding_model": {"type": "string", "minLength": 1, "maxLength": 200, "pattern": "\\S"},
                "min_similarity": {"type": "number", "minimum": -1, "maximum": 1},
                "embed_backfill": {"type": "integer", "minimum": 0, "maximum": 1000},
                "summary": {"enum": ["extractive", "llm"]},
                "summary_tier": {"type": "string", "minLength": 1},
            },
        },
        "responder": {
            "type": "object",
            "additionalProperties": False,
            "properties": {
                "mode": {"enum": ["auto", "llm", "template"]},
                "tier": {"type": "string", "minLength": 1},
                "max_tokens": {"type": "integer", "minimum": 1},
                "max_data_bytes": {"type": "integer", "minimum": 256},
            },
        },
        "budget": {
            "type": "object",
            "additionalProperties": False,
            "properties": {
                "default_usd": {"type": "number", "minimum": 0},
                **{scope: {"type": "number", "minimum": 0} for scope in SCOPE_FIELDS},
                "timezone": {"type": "string", "minLength": 1},
                "reservation_ttl_s": _POSITIVE,
            },
        },
        "tools": {
            "type": "object",
            "additionalProperties": {
                "type": "object",
                "additionalProperties": False,
                "properties": {
                    "timeout": _POSITIVE,
                    "rate_limit": _POSITIVE,
                    "isolation": {"type": "string", "minLength": 1},
                    "cost_usd": {"type": "number", "minimum": 0},
                    "max_concurrency": {"type": "integer", "minimum": 1, "maximum": 100_000},
                },
            },
        },
        "prices": {
            "type": "object",
            "additionalProperties": {
                "type": "object",
                "additionalProperties": False,
                "required": ["input_per_mtok", "output_per_mtok"],
                "properties": {
                    "input_per_mtok": {"type": "number", "minimum": 0},
                    "cached_input_per_mtok": {"type": "number", "minimum": 0},
                    "output_per_mtok": {"type": "number", "minimum": 0},
                },
            },
        },
        "breaker": {
            "type": "object",
            "additionalProperties": False,
            "properties": {
                "failure_threshold": {"type": "integer", "minimum": 1},
                "reset_after_s": _POSITIVE,
            },
        },
        "retry": {
            "type": "object",
            "additionalProperties": False,
            "properties": {
                "max_attempts": {"type": "integer", "minimum": 1},
                "base_delay_s": {"type": "number", "minimum": 0},
                "max_delay_s": {"type": "number", "minimum": 0},
            },
        },
        "sandbox": {"type": "object"},
        "journal": {
            "type": "object",
            "additionalProperties": False,
            "properties": {
                "backend": {"enum": ["sqlite", "memory"]},
                "lease_ttl_s": _POSITIVE,
                "synchronous": {"enum": ["normal", "full"]},
            },
        },
        "plugins": {"type": "object", "additionalProperties": {"type": "object"}},
        "mcp": {"type": "object"},
        "logging": {
            "type": "object",
            "additionalProperties": False,
            "properties": {
                "format": {"enum": ["text", "json"]},
                "level": {"enum": ["debug", "info", "warning", "error"]},
            },
        },
    },
}

_VALIDATOR = jsonschema.Draft202012Validator(CONFIG_SCHEMA)


@attrs.frozen
class ModelTier:
    """One ``[[models.tiers]]`` entry. ``timeout_s`` (None: ``[models] timeout_s``) bounds each
    call to this tier, the client's retries and ``Retry-After`` waits included."""

    name: str
    model: str
    max_tokens: int = 1024
    temperature: float = 0.0
    timeout_s: float | None = None


@attrs.frozen
class Config:
    """The validated configuration. ``raw`` keeps the parsed document for plugins."""

    raw: Mapping[str, Any]
    source: str
    home: Path
    principals: Mapping[str, Principal]
    tiers: tuple[ModelTier, ...]
    default_budget_usd: float
    tool_overrides: Mapping[str, Mapping[str, Any]]
    prices: Mapping[str, Mapping[str, float]]
    base_url: str | None = None
    llm_timeout_s: float = 60.0
    failure_threshold: int = 5
    reset_after_s: float = 30.0
    max_attempts: int = 3
    base_delay_s: float = 0.2
    max_delay_s: float = 5.0
    max_steps: int = DEFAULT_MAX_STEPS
    max_rounds: int = DEFAULT_MAX_ROUNDS
    max_replans: int = DEFAULT_MAX_REPLANS
    approval_ttl_s: float = DEFAULT_APPROVAL_TTL_S
    allow_self_approval: bool = False
    scope_limits: Mapping[str, float] = attrs.field(factory=dict)
    """``[budget]`` per_session_usd / per_user_daily_usd / per_principal_monthly_usd that are set."""
    principal_limits: Mapping[str, Mapping[str, float]] = attrs.field(factory=dict)
    """``[principals.NAME.budget]``: a principal's own limits, replacing the ``[budget]`` ones."""
    timezone: str = "UTC"
    """``[budget] timezone``: where a day and a month begin and end (an IANA name)."""
    reservation_ttl_s: float = DEFAULT_RESERVATION_TTL_S
    max_parallel: int = DEFAULT_MAX_PARALLEL
    """``[executor] max_parallel``: independent steps of one run that may run at the same time."""
    order_effects: bool = True
    """``[executor] order_effects``: a step whose tool is not idempotent waits for every earlier
    step, and later steps wait for it (so no effect happens after an earlier step failed)."""

    def limits_for(self, principal: str) -> dict[str, float]:
        """The scope limits that apply to ``principal``: its own where it set them, else ``[budget]``'s."""
        return {**self.scope_limits, **self.principal_limits.get(principal, {})}

    def tier_timeout_s(self, tier: ModelTier) -> float:
        """The deadline of one call to ``tier``: its own ``timeout_s``, else ``[models] timeout_s``."""
        return tier.timeout_s if tier.timeout_s is not None else self.llm_timeout_s

    @property
    def is_embedded_default(self) -> bool:
        return self.source == "<embedded defaults>"

    def section(self, *path: str) -> Mapping[str, Any]:
        """A free-form section such as ``section("sandbox", "docker")`` ({} when absent)."""
        node: Any = self.raw
        for key in path:
            node = node.get(key, {}) if isinstance(node, Mapping) else {}
        return node if isinstance(node, Mapping) else {}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], source: str = "<dict>") -> Config:
        errors = sorted(_VALIDATOR.iter_errors(data), key=lambda e: list(e.absolute_path))
        lines = [f"{_where(e.absolute_path)}: {e.message}" for e in errors]
        lines += [f"{where}: must be a finite number, got {value!r}" for where, value in _non_finite(data)]
        if lines:
            raise ConfigError(f"invalid configuration in {source}:\n  " + "\n  ".join(lines))
        principals = {
            name: Principal(
                name=name,
                permissions=frozenset(p["permissions"]),
                tools=frozenset(p["tools"]) if "tools" in p else None,
                constraints=dict(p.get("constraints", {})),
                approvals={tool: (None if rule is True else {"type": "object", "properties": rule})
                           for tool, rule in p.get("approval", {}).items()},
            )
            for name, p in data.get("principals", {}).items()
        }
        for name, p in data.get("principals", {}).items():
            rules = [("constraints", t, props) for t, props in p.get("constraints", {}).items()]
            rules += [("approval", t, props) for t, props in p.get("approval", {}).items() if props is not True]
            for what, tool_name, props in rules:
                try:
                    check_schema({"type": "object", "properties": props})  # patterns are ECMA-262
                except jsonschema.SchemaError as exc:
                    raise ConfigError(
                        f"invalid configuration in {source}: principals.{name}.{what}.{tool_name}: {exc.message}"
                    ) from exc
        models = data.get("models", {})
        tier_names = [t["name"] for t in models.get("tiers", [])]
        if len(set(tier_names)) != len(tier_names):
            raise ConfigError(f"invalid configuration in {source}: models.tiers: tier names must be unique")
        breaker = data.get("breaker", {})
        retry = data.get("retry", {})
        return cls(
            raw=data,
            source=source,
            home=_home(data),
            principals=principals,
            tiers=tuple(_tier(t) for t in models.get("tiers", [])),
            default_budget_usd=float(data.get("budget", {}).get("default_usd", 1.0)),
            tool_overrides=data.get("tools", {}),
            prices=data.get("prices", {}),
            base_url=models.get("base_url"),
            llm_timeout_s=float(models.get("timeout_s", 60.0)),
            failure_threshold=breaker.get("failure_threshold", 5),
            reset_after_s=float(breaker.get("reset_after_s", 30.0)),
            max_attempts=retry.get("max_attempts", 3),
            base_delay_s=float(retry.get("base_delay_s", 0.2)),
            max_delay_s=float(retry.get("max_delay_s", 5.0)),
            max_steps=int(data.get("planner", {}).get("max_steps", DEFAULT_MAX_STEPS)),
            max_rounds=int(data.get("planner", {}).get("max_rounds", DEFAULT_MAX_ROUNDS)),
            max_replans=int(data.get("recovery", {}).get("max_replans", DEFAULT_MAX_REPLANS)),
            approval_ttl_s=float(data.get("approvals", {}).get("ttl_s", DEFAULT_APPROVAL_TTL_S)),
            allow_self_approval=bool(data.get("approvals", {}).get("allow_self", False)),
            scope_limits={k: float(v) for k, v in data.get("budget", {}).items() if k in SCOPE_FIELDS},
            principal_limits={name: {k: float(v) for k, v in p.get("budget", {}).items()}
                              for name, p in data.get("principals", {}).items() if p.get("budget")},
            timezone=_timezone(data.get("budget", {}).get("timezone", "UTC"), source),
            reservation_ttl_s=float(data.get("budget", {}).get("reservation_ttl_s", DEFAULT_RESERVATION_TTL_S)),
            max_parallel=int(data.get("executor", {}).get("max_parallel", DEFAULT_MAX_PARALLEL)),
            order_effects=bool(data.get("executor", {}).get("order_effects", True)),
        )

    @classmethod
    def load(cls, path: str | os.PathLike[str] | None = None) -> Config:
        """Load the configuration from ``path`` or the usual places (see module docs)."""
        candidate = path or os.environ.get("AGENTKEEL_CONFIG")
        if candidate:
            file = Path(candidate)
            if not file.is_file():
                raise ConfigError(f"configuration file {file} does not exist")
        elif Path(CONFIG_FILENAME).is_file():
            file = Path(CONFIG_FILENAME)
        else:
            text = resources.files("agentkeel").joinpath("default_config.toml").read_text()
            return cls.from_dict(tomllib.loads(text), "<embedded defaults>")
        try:
            data = tomllib.loads(file.read_text())
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{file} is not valid TOML: {exc}") from exc
        return cls.from_dict(data, str(file))


def _timezone(name: str, source: str) -> str:
    """``name`` when it is a time zone this machine knows; ``ConfigError`` naming it otherwise."""
    import zoneinfo

    try:
        zoneinfo.ZoneInfo(name)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError) as exc:
        raise ConfigError(
            f"invalid configuration in {source}: budget.timezone: {name!r} is not a known time zone "
            "(an IANA name such as 'UTC' or 'Europe/Berlin')"
        ) from exc
    return name


def _tier(data: Mapping[str, Any]) -> ModelTier:
    timeout = data.get("timeout_s")
    return ModelTier(**{**data, "timeout_s": float(timeout) if timeout is not None else None})


def _non_finite(node: Any, path: tuple[str, ...] = ()) -> list[tuple[str, float]]:
    """Every NaN or infinite number in a parsed document (TOML has ``nan`` and ``inf``)."""
    if isinstance(node, float):
        return [] if math.isfinite(node) else [(_where(path), node)]
    if isinstance(node, Mapping):
        return [found for k, v in node.items() for found in _non_finite(v, (*path, str(k)))]
    if isinstance(node, list):
        return [found for i, v in enumerate(node) for found in _non_finite(v, (*path, str(i)))]
    return []


def _where(path: Any) -> str:
    return ".".join(str(p) for p in path) or "(top level)"


def _home(data: Mapping[str, Any]) -> Path:
    env = os.environ.get("AGENTKEEL_HOME")
    if env:
        return Path(env)
    if "home" in data:
        return Path(data["home"]).expanduser()
    return Path(platformdirs.user_data_dir("agentkeel"))
