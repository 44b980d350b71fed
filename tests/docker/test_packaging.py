"""agentkeel's sdist and wheel ship the sandbox images (Dockerfiles, runner, wheel installer,
base-image script), so a pip-installed agentkeel can build them (no Docker needed here).

The wheel is built the way ``python -m build`` does it: an sdist first, then the
wheel from the unpacked sdist. The build uses the installed build backend when
it can make wheels, and pip's isolated build otherwise.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
IMAGE_FILES = ["python/Dockerfile", "python/runner.py", "python/install_wheels.py", "plugin/Dockerfile",
               "build-base-image.sh", "README.md"]


def _build_sdist(dest: Path) -> Path:
    """``build_meta.build_sdist`` of the checkout, with the installed setuptools or, when this
    environment has none, one pip puts in a folder for the purpose."""
    env = dict(os.environ)
    if importlib.util.find_spec("setuptools") is None:
        backend = dest / "build-backend"
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--target", str(backend), "setuptools>=68"],
                       check=True, capture_output=True, timeout=600)
        env["PYTHONPATH"] = str(backend)
    code = "import sys; from setuptools import build_meta; print(build_meta.build_sdist(sys.argv[1]))"
    proc = subprocess.run([sys.executable, "-c", code, str(dest)], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return dest / proc.stdout.strip().splitlines()[-1]


def _build_wheel(project: Path, dest: Path) -> Path:
    errors = []
    for extra in (["--no-build-isolation"], []):
        cmd = [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", *extra, "-w", str(dest), str(project)]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, check=False)
        wheels = sorted(dest.glob("agentkeel-*.whl"))
        if proc.returncode == 0 and wheels:
            return wheels[0]
        errors.append(f"$ {' '.join(cmd[2:])}\n{proc.stderr[-2000:]}")
    raise AssertionError("cannot build agentkeel's wheel:\n" + "\n".join(errors))


@pytest.fixture(scope="module")
def sdist(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _build_sdist(tmp_path_factory.mktemp("sdist"))


@pytest.fixture(scope="module")
def wheel(sdist: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    unpacked = tmp_path_factory.mktemp("unpacked")
    with tarfile.open(sdist) as tar:
        tar.extractall(unpacked, filter="data")
    (project,) = unpacked.iterdir()
    return _build_wheel(project, tmp_path_factory.mktemp("wheel"))


def test_the_sdist_carries_the_sandbox_images(sdist: Path) -> None:
    with tarfile.open(sdist) as tar:
        names = {name.split("/", 1)[1] for name in tar.getnames() if "/" in name}
    missing = [f for f in IMAGE_FILES if f"sandbox_images/{f}" not in names]
    assert not missing, f"sandbox_images files missing from the sdist: {missing}"


def test_the_wheel_ships_the_sandbox_images_and_every_module(wheel: Path) -> None:
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
    missing = [f for f in IMAGE_FILES if f"agentkeel/sandbox_images/{f}" not in names]
    assert not missing, f"sandbox_images files missing from the wheel: {missing}"
    assert "agentkeel/sandbox/envelope.py" in names
    modules = sorted(str(p.relative_to(ROOT / "core")) for p in (ROOT / "core" / "agentkeel").rglob("*.py")
                     if "__pycache__" not in p.parts)
    absent = [m for m in modules if m not in names]
    assert not absent, (
        f"modules missing from the wheel: {absent}; is a package folder missing its __init__.py?"
    )


def test_an_installed_wheel_finds_its_sandbox_images(wheel: Path, tmp_path: Path) -> None:
    site = tmp_path / "site"
    with zipfile.ZipFile(wheel) as zf:
        zf.extractall(site)
    context = tmp_path / "context"
    code = (
        "import json, sys; sys.path.insert(0, sys.argv[1]); import agentkeel\n"
        "from agentkeel.sandbox.docker.images import images_dir\n"
        "from agentkeel.sandbox.docker.build import sandbox_context\n"
        "print(json.dumps({'package': agentkeel.__file__, 'images': str(images_dir()),\n"
        "                  'context': sorted(p.name for p in sandbox_context(__import__('pathlib').Path(sys.argv[2]))"
        ".iterdir())}))"
    )
    proc = subprocess.run([sys.executable, "-c", code, str(site), str(context)], cwd=tmp_path, capture_output=True,
                          text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    found = json.loads(proc.stdout)
    assert found["package"].startswith(str(site))
    assert found["images"] == str(site / "agentkeel" / "sandbox_images")
    assert {"Dockerfile", "runner.py", "envelope.py", "install_wheels.py"} <= set(found["context"])
