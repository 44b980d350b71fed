"""``python -m agentkeel`` is the ``agentkeel`` command."""

from agentkeel.cli import main

main()
