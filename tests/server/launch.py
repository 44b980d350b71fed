"""``python -m tests.server.launch CONFIG PORT``: a real ``agentkeel serve`` (uvicorn, SIGTERM
handling and all) with the support plugins and the slow test plugin loaded."""

from __future__ import annotations

import sys

from agentkeel.config import Config
from agentkeel.runtime.system import AgentSystem
from agentkeel.server.serve import serve

from tests.server import slow_plugin


def main() -> None:
    config_path, port = sys.argv[1], int(sys.argv[2])
    system = AgentSystem(Config.load(config_path), plugins=[slow_plugin])
    serve(system, host="127.0.0.1", port=port, log_level="warning")


if __name__ == "__main__":
    main()
