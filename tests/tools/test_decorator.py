from __future__ import annotations

from typing import Literal

import pytest
from agentkeel import ToolSpecError, tool
from agentkeel.tools.decorator import ToolRegistry, spec_of


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
    @tool
    def ping(n: int) -> int:
        return n

    spec = spec_of(ping)
    assert spec is not None and spec.name == "ping" and not spec.is_async
    assert ping(3) == 3  # still an ordinary function


def test_declaration_errors_name_the_tool() -> None:
    with pytest.raises(ToolSpecError, match="isolation must be one of"):
        tool(isolation="vm")(lambda: None)
    with pytest.raises(ToolSpecError, match="permissions must be a list"):
        tool(permissions="refunds")(lambda: None)


def test_registry_rejects_duplicates_bad_schemas_and_unknown_targets() -> None:
    @tool
    def a() -> None: ...

    @tool(name="a")
    def a2() -> None: ...

    @tool(args_schema={"type": "object", "properties": {"x": {"type": "nonsense"}}})
    def b(x: int) -> None: ...

    @tool(rollback="missing")
    def c() -> None: ...

    registry = ToolRegistry()
    registry.register_callback("p1")(a)
    with pytest.raises(ToolSpecError, match="plugin 'p2': tool 'a' is already registered by plugin 'p1'"):
        registry.register_callback("p2")(a2)
    with pytest.raises(ToolSpecError, match="plugin 'p3': tool 'b': invalid args_schema"):
        registry.register_callback("p3")(b)
    with pytest.raises(ToolSpecError, match="plugin 'p4': register\\(\\) takes a function decorated"):
        registry.register_callback("p4")(lambda: None)
    registry.register_callback("p5")(c)
    with pytest.raises(ToolSpecError, match="plugin 'p5': tool 'c': rollback target 'missing'"):
        registry.validate_references()
    assert registry["a"].plugin == "p1"
