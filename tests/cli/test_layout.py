"""The CLI package: each module imports on its own, the entry points work, and
``agentkeel --help`` loads neither the docker modules nor the Docker SDK."""

from __future__ import annotations

import importlib.metadata
import json
import subprocess
import sys
from pathlib import Path

import pytest
from agentkeel.cli import cli, main
from click.testing import CliRunner

from tests.cli.helpers import agentkeel

CLI_MODULES = (
    "agentkeel.cli",
    "agentkeel.cli.common",
    "agentkeel.cli.progress",
    "agentkeel.cli.run",
    "agentkeel.cli.chat",
    "agentkeel.cli.inspect",
    "agentkeel.cli.runs",
    "agentkeel.cli.approvals",
    "agentkeel.cli.costs",
    "agentkeel.cli.audit",
    "agentkeel.cli.sandbox",
    "agentkeel.cli.memory",
    "agentkeel.cli.serve",
    "agentkeel.cli.remote",
    "agentkeel.cli.keys",
)
COMMANDS = {"run", "chat", "tools", "plugins", "runs", "show", "resume", "rollback", "approvals", "approve", "deny",
            "costs", "audit", "sandbox", "memory", "serve", "keys"}


@pytest.mark.parametrize("module", CLI_MODULES)
def test_each_cli_module_imports_in_a_fresh_interpreter(module: str) -> None:
    proc = subprocess.run(
        [sys.executable, "-W", "error", "-c", f"import {module}"], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stderr


def test_help_imports_no_docker_module(workdir: Path) -> None:
    code = (
        "import json, sys\n"
        "from agentkeel.cli import main\n"
        "try:\n"
        "    main(['--help'])\n"
        "except SystemExit as exc:\n"
        "    assert exc.code == 0, exc.code\n"
        "loaded = [m for m in sys.modules if m == 'docker' or m.startswith(('docker.', 'agentkeel.sandbox.docker'))]\n"
        "print(json.dumps(loaded))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=workdir, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout.splitlines()[-1]) == []


def test_python_m_agentkeel_lists_every_command(workdir: Path) -> None:
    proc = agentkeel("--help", cwd=workdir)
    assert proc.returncode == 0, proc.stderr
    listed = {line.split()[0] for line in proc.stdout.split("Commands:")[1].splitlines() if line.strip()}
    assert listed == COMMANDS
    assert agentkeel("--version", cwd=workdir).returncode == 0


def test_console_script_is_main(workdir: Path) -> None:
    (ep,) = [ep for ep in importlib.metadata.entry_points(group="console_scripts") if ep.name == "agentkeel"]
    assert ep.value == "agentkeel.cli:main"
    assert ep.load() is main
    script = Path(sys.executable).parent / "agentkeel"
    if script.exists():  # the venv's script runs the same command
        proc = subprocess.run([str(script), "sandbox", "--help"], cwd=workdir, capture_output=True, text=True,
                              timeout=60)
        assert proc.returncode == 0, proc.stderr
        assert "doctor" in proc.stdout and "build" in proc.stdout


def test_group_attaches_every_command() -> None:
    assert set(cli.commands) == COMMANDS
    result = CliRunner().invoke(cli, ["audit", "--help"])
    assert result.exit_code == 0 and "verify" in result.output
