"""``@tool``: the schema and metadata a function declares."""

from __future__ import annotations

from typing import Literal

import pytest
from agentkeel import ToolSpecError, tool
from agentkeel.tools.decorator import spec_of


def test_schema_and_metadata_come_from_the_function() -> None:
    @tool(permissions=["refunds"], idempotent=False, rollback="undo", timeout=10.0)
    async def refund(order_id: str, amount: float, mode: Literal["full", "part"] = "full",
                     note: str | None = None, idempotency_key: str | None = None) -> dict:
        """Refund an order."""
        return {}

    spec = spec_of(refund)
    assert spec is not None
    assert spec.description == "Refund an order."
    assert spec.accepts_key and spec.is_async and not spec.idempotent
    assert spec.retry_safe  # accepts the key
    schema = spec.args_schema
    assert schema["required"] == ["order_id", "amount"]
    assert schema["properties"]["amount"] == {"type": "number"}
    assert schema["properties"]["mode"] == {"enum": ["full", "part"], "default": "full"}
    assert "idempotency_key" not in schema["properties"]
    assert schema["additionalProperties"] is False


def test_bare_decorator_and_sync_functions() -> None:
    @tool(allow_uncancellable=True)
    def ping(n: int) -> int:
        return n

    spec = spec_of(ping)
    assert spec is not None and spec.name == "ping" and not spec.is_async
    assert ping(3) == 3  # still an ordinary function


def test_declaration_errors_name_the_tool() -> None:
    # Which sandboxes exist is known only once plugins are loaded (the registry checks the
    # name, see test_registry); the decorator refuses what can never be a sandbox name.
    with pytest.raises(ToolSpecError, match="tool '<lambda>': isolation must be a sandbox name"):
        tool(isolation="")(lambda: None)
    with pytest.raises(ToolSpecError, match="isolation must be a sandbox name, got 3"):
        tool(isolation=3)(lambda: None)  # type: ignore[arg-type]
    spec = spec_of(tool(isolation="vm")(lambda: None))
    assert spec is not None and spec.isolation == "vm"
    with pytest.raises(ToolSpecError, match="permissions must be a list"):
        tool(permissions="refunds")(lambda: None)
