"""The tool router component: ``@tool``, the registry, the router, breakers and rate limits."""

from agentkeel.tools.decorator import spec_of, tool

__all__ = ["spec_of", "tool"]
