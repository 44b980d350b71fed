"""The OpenAPI document, fuzzed with schemathesis against a real server: no 5xx for any
input it generates, and every response (status code, content type, body, SSE events)
matches the document. Runs as an admin, so every route is reachable."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.server.conftest import LiveServer

CHECKS = "not_a_server_error,status_code_conformance,content_type_conformance,response_schema_conformance"


def _schemathesis() -> list[str]:
    found = shutil.which("schemathesis", path=str(Path(sys.executable).parent)) or shutil.which("schemathesis")
    if found is None:
        pytest.skip("schemathesis is not installed (pip install -e '.[test]')")
    return [found]


@pytest.mark.parametrize("principal", ["root", "carol"])
def test_openapi_fuzz_finds_no_server_error_and_no_mismatch(server: LiveServer, principal: str,
                                                            tmp_path: Path) -> None:
    proc = subprocess.run(
        [*_schemathesis(), "run", f"{server.url}/openapi.json", "--checks", CHECKS,
         "-H", f"Authorization: Bearer {server.keys[principal]}", "-n", "30", "--seed", "12345",
         "--request-timeout", "30", "--report-dir", str(tmp_path)],
        capture_output=True, text=True, timeout=600, cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stdout[-8000:] + proc.stderr[-2000:] + server.output()[-4000:]
    assert " passed" in proc.stdout and "failed" not in proc.stdout.split("SUMMARY")[-1].split("Warnings")[0]
