"""Docker sandbox settings: hardened defaults, tighten-only per-tool limits (no Docker needed)."""

from __future__ import annotations

import pytest
from agentkeel.errors import ConfigError
from agentkeel.sandbox.docker.settings import DockerSettings, host_config_kwargs, parse_size


def test_parse_size() -> None:
    assert parse_size("256m", "memory") == 256 * 1024**2
    assert parse_size("1g", "memory") == 1024**3
    assert parse_size("64MiB", "memory") == 64 * 1024**2
    assert parse_size(4096, "memory") == 4096
    with pytest.raises(ConfigError, match=r"sandbox\.docker\.memory"):
        parse_size("lots", "memory")


def test_defaults_are_hardened() -> None:
    settings = DockerSettings.from_config({})
    kwargs = host_config_kwargs(settings, settings.limits)
    assert kwargs["network_mode"] == "none"
    assert kwargs["read_only"] is True
    assert kwargs["cap_drop"] == ["ALL"]
    assert kwargs["security_opt"] == ["no-new-privileges:true"]
    assert kwargs["init"] is False  # explicitly: the runner must be PID 1, even if the daemon defaults to --init
    assert kwargs["mem_limit"] == kwargs["memswap_limit"] == settings.limits.memory
    assert kwargs["pids_limit"] == settings.limits.pids_limit
    assert all("noexec" in options and "size=" in options for options in kwargs["tmpfs"].values())
    assert settings.uid != 0


def test_a_tool_may_tighten_limits() -> None:
    settings = DockerSettings.from_config({"memory": "512m", "tools": {"run_python": {"memory": "128m", "cpus": 0.5}}})
    tight = settings.limits_for("run_python")
    assert tight.memory == 128 * 1024**2 and tight.cpus == 0.5
    assert tight.pids_limit == settings.limits.pids_limit
    assert settings.limits_for("other").memory == 512 * 1024**2


@pytest.mark.parametrize("key, value", [("memory", "1g"), ("cpus", 4), ("pids_limit", 10_000), ("output_limit", "10m")])
def test_a_tool_cannot_loosen_limits(key: str, value: object) -> None:
    with pytest.raises(ConfigError, match=f"tools.run_python.{key}.*only tighten"):
        DockerSettings.from_config({"tools": {"run_python": {key: value}}})


def test_security_switches_are_not_configurable() -> None:
    with pytest.raises(ConfigError, match="unknown keys"):
        DockerSettings.from_config({"network_mode": "bridge"})
    with pytest.raises(ConfigError, match="unknown keys"):
        DockerSettings.from_config({"tools": {"run_python": {"read_only": False}}})
    with pytest.raises(ConfigError, match="non-root"):
        DockerSettings.from_config({"user": 0})


def test_pool_sizes() -> None:
    settings = DockerSettings.from_config({"pool_size": 3, "pools": {"img:1": 0}})
    assert settings.pool_size_for("img:1") == 0
    assert settings.pool_size_for("other") == 3
    with pytest.raises(ConfigError, match="pool_size"):
        DockerSettings.from_config({"pool_size": -1})
