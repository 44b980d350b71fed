"""Collect the wheels a plugin image needs, on the host, without a container registry.

- agentkeel and the plugin itself: ``pip wheel --no-deps`` from their source
  directory when installed from one (editable or local path), otherwise a wheel
  repacked from the installed files.
- Their runtime dependencies (declared requirements, recursively, markers
  evaluated for the image's Python): repacked from the host's installation when
  the files fit the image (pure Python, or the same CPython ABI, machine and a
  glibc no newer than the image's); otherwise ``pip download --only-binary`` for
  the image's Python and platform; a ``wheelhouse`` directory is searched first.

The image build itself then installs these wheels with no index access.
"""

from __future__ import annotations

import base64
import hashlib
import importlib.metadata
import platform
import re
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from agentkeel.errors import SandboxError
from agentkeel.sandbox.docker.images import source_dir

try:  # packaging ships with pip; agentkeel does not depend on it directly
    from packaging.requirements import Requirement
except ImportError:  # pragma: no cover
    from pip._vendor.packaging.requirements import Requirement  # type: ignore[assignment]


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _dist(name: str) -> importlib.metadata.Distribution:
    try:
        return importlib.metadata.distribution(name)
    except importlib.metadata.PackageNotFoundError as exc:
        raise SandboxError(f"distribution {name!r} is not installed on this host; pip install it first") from exc


def dependency_closure(root: str, target_env: Mapping[str, str]) -> list[importlib.metadata.Distribution]:
    """``root`` and every distribution it requires at run time, for ``target_env`` markers."""
    env = dict(target_env, extra="")
    seen: dict[str, importlib.metadata.Distribution] = {}
    todo = [root]
    while todo:
        name = canonical(todo.pop())
        if name in seen:
            continue
        dist = _dist(name)
        seen[name] = dist
        for text in dist.requires or []:
            req = Requirement(text)
            if req.marker is not None and not req.marker.evaluate(env):
                continue
            todo.append(req.name)
    return list(seen.values())


def _wheel_meta(dist: importlib.metadata.Distribution) -> dict[str, list[str]]:
    meta: dict[str, list[str]] = {}
    for line in (dist.read_text("WHEEL") or "").splitlines():
        key, _, value = line.partition(":")
        meta.setdefault(key.strip(), []).append(value.strip())
    return meta


def _glibc(text: str) -> tuple[int, int]:
    match = re.match(r"(\d+)\.(\d+)", text or "")
    return (int(match.group(1)), int(match.group(2))) if match else (0, 0)


def fits_target(dist: importlib.metadata.Distribution, target: Mapping[str, str]) -> bool:
    """Whether the host's installed files of ``dist`` run on the image's Python."""
    meta = _wheel_meta(dist)
    if meta.get("Root-Is-Purelib", ["false"])[0].lower() == "true":
        return True
    if target.get("cache_tag") != sys.implementation.cache_tag or target.get("machine") != platform.machine():
        return False
    needed = (0, 0)
    for tag in meta.get("Tag", []):
        for match in re.finditer(r"manylinux_(\d+)_(\d+)", tag):
            needed = max(needed, (int(match.group(1)), int(match.group(2))))
        if "manylinux2014" in tag:
            needed = max(needed, (2, 17))
    return target.get("libc") == "glibc" and _glibc(target.get("libc_version", "")) >= needed


def repack(dist: importlib.metadata.Distribution, dest: Path) -> Path:
    """A wheel rebuilt from the installed files of ``dist`` (scripts and bytecode left out)."""
    name = re.sub(r"[-.]+", "_", dist.metadata["Name"])
    version = dist.version
    tags = _wheel_meta(dist).get("Tag") or ["py3-none-any"]
    out = dest / f"{name}-{version}-{tags[0]}.whl"
    # dict.fromkeys: a RECORD may list a file twice (pip adds INSTALLER again); a zip must hold it once
    listed = dict.fromkeys(dist.files or [])
    files = [f for f in listed if not str(f).startswith("..") and "__pycache__" not in str(f)]
    info_dirs = {str(f).split("/", 1)[0] for f in files if str(f).split("/", 1)[0].endswith(".dist-info")}
    if len(info_dirs) != 1:
        raise SandboxError(f"cannot repack {dist.metadata['Name']}: its installed files have no single .dist-info")
    info_dir = info_dirs.pop()
    records: list[str] = []
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as zf:
        for f in files:
            path = str(f)
            if path.endswith(".pyc") or path == f"{info_dir}/RECORD" or path.endswith(".dist-info/direct_url.json"):
                continue
            source = Path(str(dist.locate_file(f)))
            if not source.is_file():
                continue
            data = source.read_bytes()
            zf.writestr(path, data)
            digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
            records.append(f"{path},sha256={digest},{len(data)}")
        records.append(f"{info_dir}/RECORD,,")
        zf.writestr(f"{info_dir}/RECORD", "\n".join(records) + "\n")
    return out


def pip_wheel(project: Path, dest: Path) -> Path:
    """``pip wheel --no-deps`` of a local project into ``dest``; the wheel's path.

    Tries pip's isolated build first (it fetches the build backend from the
    package index), then the backend already installed (``--no-build-isolation``).
    """
    errors = []
    for extra in ([], ["--no-build-isolation"]):
        before = set(dest.glob("*.whl"))
        cmd = [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", *extra, "-w", str(dest), str(project)]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        built = set(dest.glob("*.whl")) - before
        if proc.returncode == 0 and built:
            return built.pop()
        errors.append(f"$ {' '.join(cmd[2:])}\n{proc.stderr[-1500:]}")
    raise SandboxError(f"cannot build a wheel of {project}:\n" + "\n".join(errors))


def _from_wheelhouse(dist: importlib.metadata.Distribution, wheelhouse: Path | None, dest: Path) -> Path | None:
    if wheelhouse is None:
        return None
    for wheel in sorted(wheelhouse.glob("*.whl")):
        parts = wheel.name.split("-")
        if len(parts) >= 5 and canonical(parts[0]) == canonical(dist.metadata["Name"]) and parts[1] == dist.version:
            return Path(shutil.copy2(wheel, dest))
    return None


def pip_download(dist: importlib.metadata.Distribution, target: Mapping[str, str], dest: Path) -> Path:
    """Download the binary wheel of ``dist`` built for the image's Python and platform."""
    version = target["python_version"]
    nodot = version.replace(".", "")
    machine = target.get("machine", platform.machine())
    glibc = _glibc(target.get("libc_version", "2.17"))
    platforms = [f"manylinux_2_{minor}_{machine}" for minor in range(glibc[1], 16, -1)] + [f"manylinux2014_{machine}"]
    before = set(dest.glob("*.whl"))
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-q", "-d", str(dest),
           "--python-version", version, "--implementation", "cp", "--abi", f"cp{nodot}"]
    for plat in platforms:
        cmd += ["--platform", plat]
    cmd.append(f"{dist.metadata['Name']}=={dist.version}")
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    got = set(dest.glob("*.whl")) - before
    if proc.returncode != 0 or not got:
        raise SandboxError(
            f"{dist.metadata['Name']} {dist.version} has compiled code that does not fit the image's Python "
            f"{version} ({machine}), and no matching wheel could be downloaded:\n{proc.stderr[-1500:]}\n"
            f"Use a base image with the host's Python ({sys.version_info.major}.{sys.version_info.minor}), "
            f"or put a matching wheel in a directory passed as --wheelhouse"
        )
    return got.pop()


def collect_wheels(
    roots: Iterable[str], target: Mapping[str, str], dest: Path, wheelhouse: Path | None = None
) -> list[Path]:
    """Every wheel that ``roots`` (distribution names) need in the image, written to ``dest``."""
    dest.mkdir(parents=True, exist_ok=True)
    env = marker_env(target)
    dists: dict[str, importlib.metadata.Distribution] = {}
    for root in roots:
        for dist in dependency_closure(root, env):
            dists.setdefault(canonical(dist.metadata["Name"]), dist)
    wheels: list[Path] = []
    for name in sorted(dists):
        dist = dists[name]
        project = source_dir(dist)
        if project is not None:
            wheels.append(pip_wheel(project, dest))
            continue
        found = _from_wheelhouse(dist, wheelhouse, dest)
        if found is not None:
            wheels.append(found)
        elif fits_target(dist, target):
            wheels.append(repack(dist, dest))
        else:
            wheels.append(pip_download(dist, target, dest))
    return wheels


def marker_env(target: Mapping[str, str]) -> dict[str, str]:
    """PEP 508 marker variables of the image's Python."""
    return {
        "python_version": target["python_version"],
        "python_full_version": target.get("python_full_version", target["python_version"] + ".0"),
        "implementation_name": "cpython",
        "platform_python_implementation": "CPython",
        "sys_platform": "linux",
        "os_name": "posix",
        "platform_system": "Linux",
        "platform_machine": target.get("machine", platform.machine()),
        "platform_release": "",
        "platform_version": "",
        "implementation_version": target.get("python_full_version", target["python_version"] + ".0"),
    }


PROBE = (
    "import json, platform, sys, sysconfig; "
    "libc = platform.libc_ver(); "
    "print(json.dumps({'python_version': '%d.%d' % sys.version_info[:2], "
    "'python_full_version': platform.python_version(), 'cache_tag': sys.implementation.cache_tag, "
    "'machine': platform.machine(), 'libc': libc[0], 'libc_version': libc[1], "
    "'purelib': sysconfig.get_paths()['purelib']}))"
)


def host_target() -> dict[str, Any]:
    """The probe's answer for the host interpreter (used in tests)."""
    libc = platform.libc_ver()
    return {
        "python_version": "{}.{}".format(*sys.version_info[:2]),
        "python_full_version": platform.python_version(),
        "cache_tag": sys.implementation.cache_tag,
        "machine": platform.machine(),
        "libc": libc[0],
        "libc_version": libc[1],
        "purelib": sysconfig.get_paths()["purelib"],
    }
