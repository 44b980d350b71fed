"""The ``support`` plugin: registers the support tools and the rule templates
that plan the demo requests without an LLM.

Templates (patterns match the whole message, case-insensitive):

- "refund order 1001 if it has shipped" / "... if shipped" / the chapter's
  "check if order ORD-123 is shipped and refund it if so": look the order up,
  then refund its total only when its status is shipped or delivered.
- "refund order 1001 and email the customer": the same, then email the
  customer only when the refund ran.
- "where is order 1001" / "status of order 1001": look the order up.
- "check stock of widget-1" / "is widget-1 in stock": check the inventory.

A placeholder that is a whole value (``"{order_id}"``) stays a string, which is
what the tools' schemas ask for; amounts and addresses come from the lookup
through ``{"$ref": "/1/..."}`` pointers, never from the message.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from agentkeel.markers import hookimpl
from agentkeel.planner.plan import PlanTemplate

from agentkeel_support.tools import ALL_TOOLS, REFUNDABLE_STATUSES

_ORDER = r"(?:the\s+)?order\s+(?:#\s*|number\s+)?(?P<order_id>[A-Za-z0-9][A-Za-z0-9-]*)"
_PRODUCT = r"(?P<product_id>[A-Za-z0-9][A-Za-z0-9_-]*)"
_IF_SHIPPED = r"if\s+(?:it\s+)?(?:has\s+(?:been\s+)?|is\s+|was\s+)?shipped"
_END = r"\s*[.!?]?"
_PLEASE = r"(?:please\s+)?"

_LOOKUP: dict[str, Any] = {
    "description": "Look up order {order_id}",
    "tool_name": "lookup_order",
    "tool_args": {"order_id": "{order_id}"},
}
_REFUND_IF_SHIPPED: dict[str, Any] = {
    "description": "Refund the total of order {order_id} if it has shipped",
    "tool_name": "issue_refund",
    "tool_args": {"order_id": "{order_id}", "amount": {"$ref": "/1/total"}},
    "when": {"ref": "/1/status", "op": "in", "value": list(REFUNDABLE_STATUSES)},
    "expect": {"type": "object", "required": ["refund_id"]},
}
_EMAIL_IF_REFUNDED: dict[str, Any] = {
    "description": "Tell the customer of order {order_id} about the refund",
    "tool_name": "send_email",
    "tool_args": {
        "to": {"$ref": "/1/customer_email"},
        "subject": "Your refund for order {order_id}",
        "body": (
            "Hello,\n\nwe have refunded your order {order_id}. The money should reach your "
            "account within 5 business days.\n\nThe support team"
        ),
    },
    "when": {"ref": "/2/refund_id", "op": "exists"},
}

_REFUND_REASONING = (
    "Look the order up first; refund its total only if it has shipped or been delivered."
)

_STOCK: dict[str, Any] = {
    "description": "Check the stock of {product_id}",
    "tool_name": "check_inventory",
    "tool_args": {"product_id": "{product_id}"},
}

TEMPLATES: tuple[PlanTemplate, ...] = (
    PlanTemplate(
        pattern=rf"{_PLEASE}refund\s+{_ORDER}(?:\s*,?\s*{_IF_SHIPPED})?\s*,?\s*and\s+"
        rf"(?:e-?mail|notify|tell)\s+the\s+customer{_END}",
        steps=(_LOOKUP, _REFUND_IF_SHIPPED, _EMAIL_IF_REFUNDED),
        reasoning="Refund a shipped or delivered order only; email only if it was refunded.",
        name="support:refund_and_email",
    ),
    PlanTemplate(
        pattern=rf"{_PLEASE}refund\s+{_ORDER}\s*,?\s*{_IF_SHIPPED}{_END}",
        steps=(_LOOKUP, _REFUND_IF_SHIPPED),
        reasoning=_REFUND_REASONING,
        name="support:refund_if_shipped",
    ),
    PlanTemplate(
        pattern=rf"{_PLEASE}check\s+(?:if|whether)\s+{_ORDER}\s+(?:is|has(?:\s+been)?)\s+shipped\s+"
        rf"and\s+(?:if\s+so\s+)?refund\s+it(?:\s+if\s+so)?{_END}",
        steps=(_LOOKUP, _REFUND_IF_SHIPPED),
        reasoning=_REFUND_REASONING,
        name="support:check_then_refund",
    ),
    PlanTemplate(
        pattern=rf"{_PLEASE}(?:where\s+is|(?:what(?:'s|\s+is)\s+the\s+)?status\s+of|look\s*up|track)"
        rf"\s+(?:my\s+)?{_ORDER}{_END}",
        steps=(_LOOKUP,),
        reasoning="A status question needs only the order lookup.",
        name="support:order_status",
    ),
    PlanTemplate(
        pattern=rf"{_PLEASE}check\s+(?:the\s+)?(?:stock|inventory)\s+(?:of|for)\s+{_PRODUCT}{_END}",
        steps=(_STOCK,),
        reasoning="A stock question needs only the inventory check.",
        name="support:check_stock",
    ),
    PlanTemplate(
        pattern=rf"(?:is|are)\s+{_PRODUCT}\s+in\s+stock{_END}",
        steps=(_STOCK,),
        reasoning="A stock question needs only the inventory check.",
        name="support:in_stock",
    ),
)


@hookimpl
def agentkeel_register_tools(register: Callable[[Any], None]) -> None:
    for fn in ALL_TOOLS:
        register(fn)


@hookimpl
def agentkeel_register_plan_templates(register: Callable[[PlanTemplate], None]) -> None:
    for template in TEMPLATES:
        register(template)
