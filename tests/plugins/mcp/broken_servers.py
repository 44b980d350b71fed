"""MCP servers that fail to start, for the start-up error tests.

``python broken_servers.py exit``: writes a message to stderr and exits at once.
``python broken_servers.py silent``: reads its stdin and never answers (exits at EOF).
"""

from __future__ import annotations

import sys

if __name__ == "__main__":
    if sys.argv[1] == "exit":
        print("fatal: the test server refuses to start (missing API key)", file=sys.stderr)
        sys.exit(3)
    sys.stdin.read()
