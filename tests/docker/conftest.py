"""Fixtures for the Docker tests.

Tests marked ``docker`` need a reachable Docker engine. On a developer machine
without one they are skipped with the reason; with ``CI=true`` they fail
instead, so CI can never pass by skipping the sandbox.

Images: the sandbox image and the pycode plugin image are built when missing
or built from another runner than this checkout's (``.ci/docker-setup.sh``
builds them ahead of time); the abuse-tools image is the pycode image plus
``sandbox_testtools/agentkeel_abuse_tools.py``.
"""

from __future__ import annotations

import hashlib
import os
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import attrs
import pytest

HERE = Path(__file__).parent
TOOLS_DIR = HERE / "sandbox_testtools"
sys.path.insert(0, str(TOOLS_DIR))

_problem: list[str | None] = []


def docker_problem() -> str | None:
    """None when the engine answers, else why not (computed once)."""
    if not _problem:
        from agentkeel.errors import SandboxError
        from agentkeel.sandbox.docker.client import connect

        try:
            connect(timeout=10).close()
            _problem.append(None)
        except SandboxError as exc:
            _problem.append(str(exc))
    return _problem[0]


@pytest.fixture(autouse=True)
def _require_docker(request: pytest.FixtureRequest) -> None:
    if request.node.get_closest_marker("docker") is None:
        return
    skip_or_fail_without_docker()


def skip_or_fail_without_docker() -> None:
    """Skip (developer machine) or fail (``CI=true``) when the engine is unreachable."""
    problem = docker_problem()
    if problem is None:
        return
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"CI=true and the Docker engine is unreachable: {problem}")
    pytest.skip(f"Docker engine unreachable: {problem}")


@pytest.fixture(scope="session")
def docker_api() -> Iterator[Any]:
    skip_or_fail_without_docker()  # session fixtures are set up before the autouse check
    from agentkeel.sandbox.docker.client import connect

    api = connect(timeout=600)
    yield api
    api.close()


@pytest.fixture(scope="session")
def pycode_image(docker_api: Any) -> str:
    """The pycode plugin image (built when missing or stale: slow, once)."""
    from agentkeel.sandbox.docker.build import (
        build_plugin_image,
        build_sandbox_image,
        image_exists,
        image_runner_digest,
        runner_digest,
    )
    from agentkeel.sandbox.docker.images import SANDBOX_IMAGE, entry_point_plugins, plugin_image

    dist = entry_point_plugins().get("pycode")
    if dist is None:
        pytest.fail("agentkeel-pycode is not installed: pip install -e plugins/agentkeel-pycode")
    image = plugin_image("pycode", dist.version)
    current = runner_digest()

    def fresh(name: str) -> bool:
        return image_exists(docker_api, name) and image_runner_digest(docker_api, name) == current

    if not fresh(SANDBOX_IMAGE):
        build_sandbox_image(docker_api, lambda _t: None)
    if not fresh(image):
        build_plugin_image(docker_api, "pycode", lambda _t: None)
    return image


@pytest.fixture(scope="session")
def tools_image(docker_api: Any, pycode_image: str) -> str:
    """The pycode image plus the abuse tools module, tagged by their content."""
    from agentkeel.sandbox.docker.build import docker_build, probe_image

    source = (TOOLS_DIR / "agentkeel_abuse_tools.py").read_bytes()
    base_id = docker_api.inspect_image(pycode_image)["Id"]
    tag = "agentkeel/test-abuse-tools:" + hashlib.sha256(source + base_id.encode()).hexdigest()[:12]
    purelib = probe_image(docker_api, pycode_image)["purelib"]
    with tempfile.TemporaryDirectory() as tmp:
        context = Path(tmp)
        (context / "agentkeel_abuse_tools.py").write_bytes(source)
        (context / "Dockerfile").write_text(
            f"FROM {pycode_image}\nUSER root\nCOPY agentkeel_abuse_tools.py {purelib}/\n"
            f"RUN chmod 0644 {purelib}/agentkeel_abuse_tools.py"
            f" && python3 -m compileall -q {purelib}/agentkeel_abuse_tools.py\n"
            "USER 10001:10001\n"
        )
        docker_build(docker_api, context, [tag], {}, {"io.agentkeel.image": "test"}, lambda _t: None)
    for old in docker_api.images(name=tag.split(":")[0]):  # earlier versions of the test image
        if tag not in (old.get("RepoTags") or []):
            try:
                docker_api.remove_image(old["Id"], force=False)
            except Exception:  # noqa: BLE001 - in use by a container of a run still going: keep it
                pass
    return tag


@pytest.fixture(scope="session")
def abuse_specs(tools_image: str) -> dict[str, Any]:
    """ToolSpecs of the abuse tools, pointed at the test image."""
    import agentkeel_abuse_tools
    from agentkeel.tools.decorator import spec_of

    specs = {}
    for fn in agentkeel_abuse_tools.ALL:
        spec = spec_of(fn)
        assert spec is not None
        specs[spec.name] = attrs.evolve(spec, image=tools_image, plugin="abuse")
    return specs


@pytest.fixture
def running_containers(docker_api: Any) -> Any:
    """``running_containers(owner=None)``: our running containers (of one owner when given)."""

    def find(owner: str | None = None) -> list[dict[str, Any]]:
        label = f"io.agentkeel.owner={owner}" if owner else "io.agentkeel.sandbox=1"
        return list(docker_api.containers(filters={"label": label, "status": "running"}))

    return find
