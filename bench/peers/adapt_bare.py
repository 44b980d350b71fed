"""The floor: a plain asyncio loop that validates each step's arguments and awaits the tool."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import jsonschema
import scenario


class BareLoop:
    """Each step: a precompiled Draft 2020-12 validator checks the arguments, then the tool is awaited."""

    def __init__(self, k: int) -> None:
        self.calls = scenario.script(k)
        self.tools = {fn.__name__: fn for fn in scenario.TOOLS}
        self.validators = {name: jsonschema.Draft202012Validator(schema) for name, schema in scenario.SCHEMAS.items()}

    async def run(self) -> list[dict[str, Any]]:
        results = []
        for call in self.calls:
            self.validators[call.tool].validate(call.args)
            results.append(await self.tools[call.tool](**call.args))
        return results

    def results(self, output: list[dict[str, Any]]) -> list[Any]:
        return output


@asynccontextmanager
async def open_session(k: int) -> AsyncIterator[BareLoop]:
    """A bare loop over the K-step script."""
    yield BareLoop(k)
