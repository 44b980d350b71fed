"""The ``support`` plugin: registers the support tools and the rule templates
that plan the demo requests without an LLM, each with the answer the
deterministic responder gives when it ran.

Templates (patterns match the whole message, case-insensitive):

- ``support:refund_if_shipped``: "refund order 1001 if it has shipped" / "... if
  shipped"; ``support:check_then_refund``: the chapter's "check if order ORD-123
  is shipped and refund it if so". Look the order up, then refund its total only
  when its status is shipped or delivered.
- ``support:refund_and_email``: "refund order 1001 and email the customer": the
  same, then email the customer only when the refund ran. It has no replan, so a
  bounced email (order 1005) aborts the run and the refund is compensated.
- ``support:order_status``: "where is order 1001" / "status of order 1001" /
  "look up order 1001": look the order up.
- ``support:track_order``: "track order 1003": look the order up, then ask the
  carrier's tracking service (``track_shipment``, an optional step). Without it
  (``$AGENTKEEL_CARRIER_URL`` unset, the service down) the run ends ``degraded``
  and answers with the order's status.
- ``support:email_update``: "email the customer of order 1005 an update" / "tell
  the customer of order 1001 about their order": look the order up, then email
  the customer. When the email fails (order 1005's mailbox bounces), the replan
  opens a support ticket (``open_ticket``) instead, and the run succeeds.
- ``support:check_stock`` / ``support:in_stock``: "check stock of widget-1" /
  "is widget-1 in stock": check the inventory.

A placeholder that is a whole value (``"{order_id}"``) stays a string, which is
what the tools' schemas ask for; amounts and addresses come from the lookup
through ``{"$ref": "/1/..."}`` pointers, never from the message. The answers
render step results (``{1.status}``, ``{2.amount:.2f}``) as short text.
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

_REFUNDED: dict[str, Any] = {"ref": "/2/refund_id", "op": "exists"}
_NOT_REFUNDABLE: dict[str, Any] = {
    "ref": "/1/status",
    "op": "not_in",
    "value": list(REFUNDABLE_STATUSES),
}
_REFUND_ANSWER: list[dict[str, Any]] = [
    {
        "when": _REFUNDED,
        "text": "Order {1.order_id} was {1.status}, so I refunded ${2.amount:.2f} "
        "(refund {2.refund_id}).",
    },
    {
        "when": _NOT_REFUNDABLE,
        "text": "Order {1.order_id} is {1.status}, so I did not refund it: only shipped or "
        "delivered orders are refunded.",
    },
]
_REFUND_AND_EMAIL_ANSWER: list[dict[str, Any]] = [
    {
        "when": {"all": [_REFUNDED, {"ref": "/3/email_id", "op": "exists"}]},
        "text": "Order {1.order_id} was {1.status}, so I refunded ${2.amount:.2f} "
        "(refund {2.refund_id}) and emailed the customer at {3.to}.",
    },
    {
        "when": _NOT_REFUNDABLE,
        "text": "Order {1.order_id} is {1.status}, so I did not refund it and did not email the "
        "customer: only shipped or delivered orders are refunded.",
    },
]

_ORDER_FACTS = "{1.product_id}, total ${1.total:.2f}"
_STATUS_ANSWER: list[dict[str, Any]] = [
    {
        "when": {"ref": "/1/refunded", "op": "gt", "value": 0},
        "text": "Order {1.order_id} is {1.status}: " + _ORDER_FACTS
        + ", of which ${1.refunded:.2f} has been refunded.",
    },
    {"text": "Order {1.order_id} is {1.status}: " + _ORDER_FACTS + "."},
]

_TRACK: dict[str, Any] = {
    "description": "Ask the carrier where the parcel of order {order_id} is",
    "tool_name": "track_shipment",
    "tool_args": {"order_id": "{order_id}"},
    "optional": True,
}
_TRACK_ANSWER: list[dict[str, Any]] = [
    {
        "when": {"ref": "/2/eta", "op": "truthy"},
        "text": "Order {1.order_id} is {1.status}. The carrier {2.carrier} reports: {2.status}, "
        "estimated delivery {2.eta}.",
    },
    {
        "when": {"ref": "/2/carrier", "op": "exists"},
        "text": "Order {1.order_id} is {1.status}. The carrier {2.carrier} reports: {2.status}.",
    },
    # Without tracking: the lookup's status (the responder adds that step 2 could not be done).
    {"text": "Order {1.order_id} is {1.status}: " + _ORDER_FACTS + "."},
]

_EMAIL_UPDATE: dict[str, Any] = {
    "description": "Email the customer of order {order_id} an update",
    "tool_name": "send_email",
    "tool_args": {
        "to": {"$ref": "/1/customer_email"},
        "subject": "An update on your order {order_id}",
        "body": (
            "Hello,\n\nthis is an update on your order {order_id}. Reply to this email if you "
            "have any questions about it.\n\nThe support team"
        ),
    },
}
_TICKET_FOR_AGENT: dict[str, Any] = {
    "description": "Open a ticket so a support agent contacts the customer of order {order_id}",
    "tool_name": "open_ticket",
    "tool_args": {
        "order_id": {"$ref": "/1/order_id"},  # step 1 of the run: the template's lookup
        "note": (
            "The update email to the customer of order {order_id} could not be delivered. "
            "Contact them another way."
        ),
    },
    "expect": {"type": "object", "required": ["ticket_id"]},
}

_STOCK: dict[str, Any] = {
    "description": "Check the stock of {product_id}",
    "tool_name": "check_inventory",
    "tool_args": {"product_id": "{product_id}"},
}
_STOCK_ANSWER: list[dict[str, Any]] = [
    {
        "when": {"ref": "/1/stock", "op": "eq", "value": 1},
        "text": "{1.name} ({1.product_id}) is in stock: 1 unit left.",
    },
    {
        "when": {"ref": "/1/in_stock", "op": "truthy"},
        "text": "{1.name} ({1.product_id}) is in stock: {1.stock} units left.",
    },
    {"text": "{1.name} ({1.product_id}) is out of stock: {1.stock} units left."},
]

TEMPLATES: tuple[PlanTemplate, ...] = (
    PlanTemplate(
        pattern=rf"{_PLEASE}refund\s+{_ORDER}(?:\s*,?\s*{_IF_SHIPPED})?\s*,?\s*and\s+"
        rf"(?:e-?mail|notify|tell)\s+the\s+customer{_END}",
        steps=(_LOOKUP, _REFUND_IF_SHIPPED, _EMAIL_IF_REFUNDED),
        reasoning="Refund a shipped or delivered order only; email only if it was refunded.",
        name="support:refund_and_email",
        answer=_REFUND_AND_EMAIL_ANSWER,
        # No replan: when the email fails, the run aborts and the refund is compensated.
    ),
    PlanTemplate(
        pattern=rf"{_PLEASE}refund\s+{_ORDER}\s*,?\s*{_IF_SHIPPED}{_END}",
        steps=(_LOOKUP, _REFUND_IF_SHIPPED),
        reasoning=_REFUND_REASONING,
        name="support:refund_if_shipped",
        answer=_REFUND_ANSWER,
    ),
    PlanTemplate(
        pattern=rf"{_PLEASE}check\s+(?:if|whether)\s+{_ORDER}\s+(?:is|has(?:\s+been)?)\s+shipped\s+"
        rf"and\s+(?:if\s+so\s+)?refund\s+it(?:\s+if\s+so)?{_END}",
        steps=(_LOOKUP, _REFUND_IF_SHIPPED),
        reasoning=_REFUND_REASONING,
        name="support:check_then_refund",
        answer=_REFUND_ANSWER,
    ),
    PlanTemplate(
        pattern=rf"{_PLEASE}(?:where\s+is|(?:what(?:'s|\s+is)\s+the\s+)?status\s+of|look\s*up)"
        rf"\s+(?:my\s+)?{_ORDER}{_END}",
        steps=(_LOOKUP,),
        reasoning="A status question needs only the order lookup.",
        name="support:order_status",
        answer=_STATUS_ANSWER,
    ),
    PlanTemplate(
        pattern=rf"{_PLEASE}track\s+(?:the\s+(?:shipment|parcel|package)\s+(?:of|for)\s+)?"
        rf"(?:my\s+)?{_ORDER}{_END}",
        steps=(_LOOKUP, _TRACK),
        reasoning="Look the order up, then ask the carrier; without the carrier, answer from "
        "the lookup.",
        name="support:track_order",
        answer=_TRACK_ANSWER,
    ),
    PlanTemplate(
        pattern=rf"{_PLEASE}(?:e-?mail|notify|update|tell)\s+the\s+customer\s+of\s+{_ORDER}"
        rf"(?:\s+(?:with\s+)?an\s+update|\s+about\s+(?:their|the|his|her)\s+order)?{_END}",
        steps=(_LOOKUP, _EMAIL_UPDATE),
        reasoning="Look the order up, then email its customer.",
        name="support:email_update",
        answer="I emailed the customer of order {1.order_id} an update at {2.to} "
        "(email {2.email_id}).",
        replan=(_TICKET_FOR_AGENT,),
        replan_reasoning="The email could not be delivered: hand the order to a support agent.",
        replan_answer="I could not email the customer of order {1.order_id} (the email to "
        "{1.customer_email} could not be delivered), so I opened ticket {3.ticket_id} for a "
        "support agent to contact them.",
    ),
    PlanTemplate(
        pattern=rf"{_PLEASE}check\s+(?:the\s+)?(?:stock|inventory)\s+(?:of|for)\s+{_PRODUCT}{_END}",
        steps=(_STOCK,),
        reasoning="A stock question needs only the inventory check.",
        name="support:check_stock",
        answer=_STOCK_ANSWER,
    ),
    PlanTemplate(
        pattern=rf"(?:is|are)\s+{_PRODUCT}\s+in\s+stock{_END}",
        steps=(_STOCK,),
        reasoning="A stock question needs only the inventory check.",
        name="support:in_stock",
        answer=_STOCK_ANSWER,
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
