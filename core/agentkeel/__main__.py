"""``python -m agentkeel`` is the ``agentkeel`` command."""

from agentkeel.cli import main

if __name__ == "__main__":
    main()
