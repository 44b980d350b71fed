"""agentkeel-pycode: the ``run_python`` code tool, run in the docker sandbox."""

from agentkeel_pycode.plugin import run_python

__all__ = ["run_python"]
