"""Offline wheel collection and the stdlib wheel installer (no Docker needed)."""

from __future__ import annotations

import importlib.metadata
import subprocess
import sys
import zipfile
from pathlib import Path

from agentkeel.sandbox.docker.images import images_dir
from agentkeel.sandbox.docker.wheels import (
    dependency_closure,
    fits_target,
    host_target,
    marker_env,
    repack,
)


def test_repacked_wheel_installs_with_the_stdlib_installer(tmp_path: Path) -> None:
    dist = importlib.metadata.distribution("pluggy")
    wheel = repack(dist, tmp_path)
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
    assert "pluggy/__init__.py" in names
    assert len(names) == len(set(names))  # a file listed twice in RECORD is written once
    assert any(n.endswith(".dist-info/RECORD") for n in names)
    assert not any(n.endswith(".pyc") for n in names)
    target = tmp_path / "site"
    installer = images_dir() / "python" / "install_wheels.py"
    subprocess.run([sys.executable, "-I", str(installer), str(tmp_path), str(target)], check=True,
                   capture_output=True)
    out = subprocess.run(
        [sys.executable, "-I", "-c",
         f"import sys; sys.path.insert(0, {str(target)!r}); import pluggy; print(pluggy.__file__)"],
        check=True, capture_output=True, text=True,
    ).stdout
    assert out.startswith(str(target))


def test_dependency_closure_follows_requirements_not_extras() -> None:
    names = {d.metadata["Name"].lower() for d in dependency_closure("agentkeel", marker_env(host_target()))}
    assert {"agentkeel", "pluggy", "attrs", "jsonschema", "referencing", "rpds-py"} <= names
    assert "pytest" not in names  # only in the "test" extra


def test_binary_wheels_fit_only_a_matching_python() -> None:
    rpds = importlib.metadata.distribution("rpds-py")
    pure = importlib.metadata.distribution("pluggy")
    same = host_target()
    other = dict(same, cache_tag="cpython-312", python_version="3.12")
    assert fits_target(pure, other)
    assert fits_target(rpds, same)
    assert not fits_target(rpds, other)
