"""MCP servers that fail to start, for the start-up error tests.

``python broken_servers.py exit``: writes a message to stderr and exits at once.
``python broken_servers.py silent``: reads its stdin and never answers (exits at EOF).
``python broken_servers.py garbage``: writes lines that are not JSON-RPC, then never answers.
"""

from __future__ import annotations

import sys

if __name__ == "__main__":
    if sys.argv[1] == "exit":
        print("fatal: the test server refuses to start (missing API key)", file=sys.stderr)
        sys.exit(3)
    if sys.argv[1] == "garbage":
        for n in range(3):
            print(f"this is not JSON-RPC {n}", flush=True)
    sys.stdin.read()
