"""Tools the benchmarks run, in a module a sandbox child process can import."""

from agentkeel import tool


@tool(isolation="subprocess")
def noop() -> None:
    """Do nothing, in whatever sandbox runs it."""
