"""The customer-support tools of the chapter, over the shop database.

What each tool declares is what the runtime relies on:

- ``lookup_order`` and ``check_inventory`` only read: permission "read",
  idempotent, safe to retry.
- ``issue_refund`` moves money: permission "refunds", not idempotent, undone by
  ``cancel_refund``. It takes the runtime's ``idempotency_key`` and the database
  honours it: a second call with the same key returns the first refund instead
  of paying twice, so the runtime may retry it or re-run it after a crash.
- ``cancel_refund`` is the compensator. The runtime calls it with the original
  arguments of ``issue_refund`` plus fields of its result (``refund_id``); it is
  idempotent (cancelling a cancelled refund changes nothing).
- ``send_email`` cannot be taken back and takes no idempotency key: the
  chapter's example of a tool that must never run twice for one step.
- ``open_ticket`` hands an order to a human support agent: permission "email",
  not idempotent, undone by ``close_ticket``. Like ``issue_refund`` it takes the
  idempotency key and honours it (the same key returns the first ticket).
  ``close_ticket`` is idempotent.
- ``track_shipment`` asks the carrier's tracking service at
  ``$AGENTKEEL_CARRIER_URL`` (``GET {url}/track/{order_id}``, JSON): permission
  "read", idempotent. Without the variable, or when the service is down or
  answers badly, it raises ``ToolError`` (retryable for connection errors,
  timeouts and 5xx answers), which is what an ``"optional"`` plan step needs to
  go on without it.

Refusals (unknown order, wrong status, bad amount) raise
``ToolError(retryable=False)``: trying again cannot help.
"""

from __future__ import annotations

import http.client
import math
import os
import re
import sqlite3
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from typing import IO, Any

from agentkeel import jsonvalue, tool
from agentkeel.errors import ToolError

from agentkeel_support.shop import connect, now, transaction

REFUNDABLE_STATUSES = ("shipped", "delivered")
TOOL_TIMEOUT_S = 15.0

CARRIER_URL_ENV = "AGENTKEEL_CARRIER_URL"
CARRIER_TIMEOUT_S = 5.0
"""Socket timeout of one tracking request, and the deadline for reading its whole answer."""
CARRIER_MAX_BYTES = 64 * 1024
"""The largest tracking answer read; a longer one is refused."""
MAX_NOTE_CHARS = 2000

_EMAIL = re.compile(r"[^@\s]+@[^@\s]+\.[^@\s]+")

ORDER_OUTPUT_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["order_id", "status", "total"],
    "properties": {
        "order_id": {"type": "string"},
        "status": {"enum": ["pending", "shipped", "delivered", "cancelled"]},
        "total": {"type": "number", "minimum": 0},
        "customer_email": {"type": "string"},
        "product_id": {"type": "string"},
        "refunded": {"type": "number", "minimum": 0},
    },
}
INVENTORY_OUTPUT_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["product_id", "name", "stock", "in_stock"],
    "properties": {
        "product_id": {"type": "string"},
        "name": {"type": "string"},
        "stock": {"type": "integer", "minimum": 0},
        "in_stock": {"type": "boolean"},
    },
}
REFUND_OUTPUT_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["refund_id", "order_id", "amount", "status"],
    "properties": {
        "refund_id": {"type": "string"},
        "order_id": {"type": "string"},
        "amount": {"type": "number", "exclusiveMinimum": 0},
        "status": {"enum": ["issued", "cancelled"]},
        "created_at": {"type": "string"},
        "replayed": {"type": "boolean"},
    },
}
CANCEL_OUTPUT_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["order_id", "refund_id", "status"],
    "properties": {
        "order_id": {"type": "string"},
        "refund_id": {"type": ["string", "null"]},
        "status": {"enum": ["cancelled", "nothing_to_cancel"]},
    },
}
EMAIL_OUTPUT_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["email_id", "to", "subject", "sent_at"],
    "properties": {
        "email_id": {"type": "string"},
        "to": {"type": "string"},
        "subject": {"type": "string"},
        "sent_at": {"type": "string"},
    },
}
TICKET_OUTPUT_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["ticket_id", "order_id", "note", "status", "created_at"],
    "properties": {
        "ticket_id": {"type": "string"},
        "order_id": {"type": "string"},
        "note": {"type": "string"},
        "status": {"enum": ["open", "closed"]},
        "created_at": {"type": "string"},
        "replayed": {"type": "boolean"},
    },
}
CLOSE_TICKET_OUTPUT_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["ticket_id", "status"],
    "properties": {
        "ticket_id": {"type": ["string", "null"]},
        "order_id": {"type": "string"},
        "status": {"enum": ["closed", "nothing_to_close"]},
        "closed_at": {"type": "string"},
    },
}
TRACKING_OUTPUT_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["order_id", "carrier", "status", "eta"],
    "additionalProperties": False,
    "properties": {
        "order_id": {"type": "string"},
        "carrier": {"type": "string", "minLength": 1},
        "status": {"type": "string", "minLength": 1},
        "eta": {"type": ["string", "null"]},
    },
}


@tool(
    permissions=["read"],
    idempotent=True,
    output_schema=ORDER_OUTPUT_SCHEMA,
    timeout=TOOL_TIMEOUT_S,
)
def lookup_order(order_id: str) -> dict[str, Any]:
    """Look up an order: its status (pending, shipped, delivered or cancelled),
    total, customer email, product, and the amount refunded so far."""
    with connect() as conn:
        row = conn.execute("SELECT * FROM orders WHERE order_id = ?", (order_id,)).fetchone()
        if row is None:
            raise ToolError(f"order {order_id} not found; check the order number", retryable=False)
        refunded = _refunded(conn, order_id)
    return {
        "order_id": row["order_id"],
        "status": row["status"],
        "total": row["total"],
        "customer_email": row["customer_email"],
        "product_id": row["product_id"],
        "refunded": refunded,
    }


@tool(
    permissions=["read"],
    idempotent=True,
    output_schema=INVENTORY_OUTPUT_SCHEMA,
    timeout=TOOL_TIMEOUT_S,
)
def check_inventory(product_id: str) -> dict[str, Any]:
    """Check how many units of a product are in stock."""
    with connect() as conn:
        row = conn.execute("SELECT * FROM products WHERE product_id = ?", (product_id,)).fetchone()
    if row is None:
        raise ToolError(f"product {product_id} not found; check the product id", retryable=False)
    return {
        "product_id": row["product_id"],
        "name": row["name"],
        "stock": row["stock"],
        "in_stock": row["stock"] > 0,
    }


@tool(
    permissions=["refunds"],
    idempotent=False,
    rollback="cancel_refund",
    output_schema=REFUND_OUTPUT_SCHEMA,
    timeout=TOOL_TIMEOUT_S,
)
def issue_refund(
    order_id: str, amount: float, idempotency_key: str | None = None
) -> dict[str, Any]:
    """Refund ``amount`` of a shipped or delivered order (at most what is left to refund).

    With an ``idempotency_key`` already used for this order and amount, returns
    that refund (``replayed``: true) instead of refunding again.
    """
    amount = _money(amount)
    with connect() as conn, transaction(conn):
        if idempotency_key is not None:
            existing = conn.execute(
                "SELECT * FROM refunds WHERE idempotency_key = ?", (idempotency_key,)
            ).fetchone()
            if existing is not None:
                if existing["order_id"] != order_id or not math.isclose(existing["amount"], amount):
                    raise ToolError(
                        f"idempotency key {idempotency_key!r} was used for a refund of "
                        f"{existing['amount']:.2f} on order {existing['order_id']}; use a new key "
                        f"for a different refund",
                        retryable=False,
                    )
                return _refund_dict(existing, replayed=True)
        order = conn.execute(
            "SELECT status, total FROM orders WHERE order_id = ?", (order_id,)
        ).fetchone()
        if order is None:
            raise ToolError(f"order {order_id} not found; check the order number", retryable=False)
        if order["status"] not in REFUNDABLE_STATUSES:
            raise ToolError(
                f"order {order_id} is {order['status']}; only shipped or delivered orders "
                f"can be refunded",
                retryable=False,
            )
        remaining = round(order["total"] - _refunded(conn, order_id), 2)
        if amount > remaining:
            raise ToolError(
                f"refund of {amount:.2f} exceeds the {remaining:.2f} left to refund on order "
                f"{order_id} (total {order['total']:.2f})",
                retryable=False,
            )
        refund_id = "R-" + uuid.uuid4().hex[:12]
        conn.execute(
            "INSERT INTO refunds (refund_id, order_id, amount, idempotency_key, status, "
            "created_at) VALUES (?, ?, ?, ?, 'issued', ?)",
            (refund_id, order_id, amount, idempotency_key, now()),
        )
        row = conn.execute("SELECT * FROM refunds WHERE refund_id = ?", (refund_id,)).fetchone()
    return _refund_dict(row, replayed=False)


@tool(
    permissions=["refunds"],
    idempotent=True,
    output_schema=CANCEL_OUTPUT_SCHEMA,
    timeout=TOOL_TIMEOUT_S,
)
def cancel_refund(
    order_id: str,
    refund_id: str | None = None,
    amount: float | None = None,
    idempotency_key: str | None = None,
) -> dict[str, Any]:
    """Cancel a refund of an order, found by ``refund_id`` or else by the
    ``idempotency_key`` it was issued with (``amount`` is accepted and ignored,
    so the original arguments of ``issue_refund`` can be passed as they are).

    Cancelling an already cancelled refund changes nothing. When only a key is
    given and no refund was issued with it, there is nothing to undo and the
    result says so (``status``: "nothing_to_cancel").
    """
    del amount  # part of the compensation call's arguments; the refund row knows its amount
    if refund_id is None and idempotency_key is None:
        raise ToolError(
            "cancel_refund needs refund_id or the idempotency_key the refund was issued with",
            retryable=False,
        )
    with connect() as conn, transaction(conn):
        row = _find_refund(conn, refund_id, idempotency_key)
        if row is None:
            if refund_id is not None:
                raise ToolError(
                    f"refund {refund_id} not found; check the refund id", retryable=False
                )
            return {"order_id": order_id, "refund_id": None, "status": "nothing_to_cancel"}
        if row["order_id"] != order_id:
            raise ToolError(
                f"refund {row['refund_id']} belongs to order {row['order_id']}, not {order_id}",
                retryable=False,
            )
        if row["status"] == "issued":
            conn.execute(
                "UPDATE refunds SET status = 'cancelled', cancelled_at = ? WHERE refund_id = ?",
                (now(), row["refund_id"]),
            )
            row = conn.execute(
                "SELECT * FROM refunds WHERE refund_id = ?", (row["refund_id"],)
            ).fetchone()
    return {
        "order_id": row["order_id"],
        "refund_id": row["refund_id"],
        "amount": row["amount"],
        "status": "cancelled",
        "cancelled_at": row["cancelled_at"],
    }


@tool(
    permissions=["email"],
    idempotent=False,
    output_schema=EMAIL_OUTPUT_SCHEMA,
    timeout=TOOL_TIMEOUT_S,
    # A quick local write: run in-process, accepting that a call given up at its
    # timeout (the thread cannot be stopped) leaves the step in_doubt for a human.
    allow_uncancellable=True,
)
def send_email(to: str, subject: str, body: str) -> dict[str, Any]:
    """Send an email to a customer. It cannot be unsent, and sending twice sends two emails."""
    if not _EMAIL.fullmatch(to):
        raise ToolError(f"{to!r} is not an email address", retryable=False)
    if not subject.strip():
        raise ToolError("the email needs a subject", retryable=False)
    if to.endswith(".invalid"):  # the reserved TLD (RFC 2606): this mailbox bounces
        raise ToolError(f"mail to {to} bounced: mailbox unavailable", retryable=False)
    email_id = "E-" + uuid.uuid4().hex[:12]
    sent_at = now()
    with connect() as conn:
        conn.execute(
            "INSERT INTO emails (email_id, to_addr, subject, body, sent_at) VALUES (?, ?, ?, ?, ?)",
            (email_id, to, subject, body, sent_at),
        )
    return {"email_id": email_id, "to": to, "subject": subject, "sent_at": sent_at}


@tool(
    permissions=["email"],
    idempotent=False,
    rollback="close_ticket",
    output_schema=TICKET_OUTPUT_SCHEMA,
    timeout=TOOL_TIMEOUT_S,
)
def open_ticket(order_id: str, note: str, idempotency_key: str | None = None) -> dict[str, Any]:
    """Open a support ticket on an order, so a human support agent follows it up.

    With an ``idempotency_key`` already used for this order and note, returns
    that ticket (``replayed``: true) instead of opening a second one.
    """
    note = note.strip()
    if not note:
        raise ToolError("the ticket needs a note saying what the agent should do", retryable=False)
    if len(note) > MAX_NOTE_CHARS:
        raise ToolError(
            f"the ticket's note has {len(note)} characters, more than {MAX_NOTE_CHARS}",
            retryable=False,
        )
    with connect() as conn, transaction(conn):
        if idempotency_key is not None:
            existing = conn.execute(
                "SELECT * FROM tickets WHERE idempotency_key = ?", (idempotency_key,)
            ).fetchone()
            if existing is not None:
                if existing["order_id"] != order_id or existing["note"] != note:
                    raise ToolError(
                        f"idempotency key {idempotency_key!r} was used for ticket "
                        f"{existing['ticket_id']} on order {existing['order_id']} with another "
                        f"note; use a new key for a different ticket",
                        retryable=False,
                    )
                return _ticket_dict(existing, replayed=True)
        order = conn.execute("SELECT 1 FROM orders WHERE order_id = ?", (order_id,)).fetchone()
        if order is None:
            raise ToolError(f"order {order_id} not found; check the order number", retryable=False)
        ticket_id = "T-" + uuid.uuid4().hex[:12]
        conn.execute(
            "INSERT INTO tickets (ticket_id, order_id, note, idempotency_key, status, created_at) "
            "VALUES (?, ?, ?, ?, 'open', ?)",
            (ticket_id, order_id, note, idempotency_key, now()),
        )
        row = conn.execute("SELECT * FROM tickets WHERE ticket_id = ?", (ticket_id,)).fetchone()
    return _ticket_dict(row, replayed=False)


@tool(
    permissions=["email"],
    idempotent=True,
    output_schema=CLOSE_TICKET_OUTPUT_SCHEMA,
    timeout=TOOL_TIMEOUT_S,
)
def close_ticket(ticket_id: str | None = None, idempotency_key: str | None = None) -> dict[str, Any]:
    """Close a support ticket, found by ``ticket_id`` or else by the
    ``idempotency_key`` it was opened with: the compensator of ``open_ticket``.

    Closing a closed ticket changes nothing. When only a key is given and no
    ticket was opened with it, there is nothing to undo and the result says so
    (``status``: "nothing_to_close").
    """
    if ticket_id is None and idempotency_key is None:
        raise ToolError(
            "close_ticket needs ticket_id or the idempotency_key the ticket was opened with",
            retryable=False,
        )
    with connect() as conn, transaction(conn):
        row: sqlite3.Row | None = None
        if ticket_id is not None:
            row = conn.execute("SELECT * FROM tickets WHERE ticket_id = ?", (ticket_id,)).fetchone()
        if row is None and idempotency_key is not None:
            row = conn.execute(
                "SELECT * FROM tickets WHERE idempotency_key = ?", (idempotency_key,)
            ).fetchone()
        if row is None:
            if ticket_id is not None:
                raise ToolError(
                    f"ticket {ticket_id} not found; check the ticket id", retryable=False
                )
            return {"ticket_id": None, "status": "nothing_to_close"}
        if row["status"] == "open":
            conn.execute(
                "UPDATE tickets SET status = 'closed', closed_at = ? WHERE ticket_id = ?",
                (now(), row["ticket_id"]),
            )
            row = conn.execute(
                "SELECT * FROM tickets WHERE ticket_id = ?", (row["ticket_id"],)
            ).fetchone()
    return {
        "ticket_id": row["ticket_id"],
        "order_id": row["order_id"],
        "status": "closed",
        "closed_at": row["closed_at"],
    }


@tool(
    permissions=["read"],
    idempotent=True,
    output_schema=TRACKING_OUTPUT_SCHEMA,
    timeout=TOOL_TIMEOUT_S,
)
def track_shipment(order_id: str) -> dict[str, Any]:
    """Ask the carrier's tracking service where an order's parcel is: the carrier,
    its tracking status and the estimated delivery date (``eta``, or null)."""
    base = os.environ.get(CARRIER_URL_ENV, "").strip()
    if not base:
        raise ToolError(
            f"the carrier's tracking service is not configured (set {CARRIER_URL_ENV})",
            retryable=False,
        )
    parts = urllib.parse.urlsplit(base)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ToolError(
            f"{CARRIER_URL_ENV} must be an http:// or https:// URL, got {base!r}", retryable=False
        )
    if not order_id.strip():
        raise ToolError("track_shipment needs an order id", retryable=False)
    url = f"{base.rstrip('/')}/track/{urllib.parse.quote(order_id, safe='')}"
    request = urllib.request.Request(
        url, headers={"Accept": "application/json", "User-Agent": "agentkeel-support"}
    )
    opener = urllib.request.build_opener(_HttpOnlyRedirects)
    where = f"the carrier's tracking service at {base}"
    try:
        with opener.open(request, timeout=CARRIER_TIMEOUT_S) as response:
            status = response.status
            body = _read_bounded(response, where)
    except urllib.error.HTTPError as exc:
        exc.close()
        if exc.code == 404:
            raise ToolError(
                f"{where} has no tracking for order {order_id} (HTTP 404)", retryable=False
            ) from None
        transient = exc.code >= 500 or exc.code in (408, 429)
        raise ToolError(
            f"{where} answered HTTP {exc.code} for order {order_id}", retryable=transient
        ) from None
    except urllib.error.URLError as exc:
        raise ToolError(f"cannot reach {where}: {exc.reason}", retryable=True) from None
    except OSError as exc:  # timeouts, resets, refused connections
        raise ToolError(f"cannot reach {where}: {exc or type(exc).__name__}", retryable=True) from None
    except http.client.HTTPException as exc:
        raise ToolError(
            f"{where} sent a broken HTTP answer ({type(exc).__name__})", retryable=False
        ) from None
    if status != 200:
        raise ToolError(f"{where} answered HTTP {status} for order {order_id}", retryable=False)
    return _tracking(body, order_id, where)


ALL_TOOLS = (
    lookup_order,
    check_inventory,
    issue_refund,
    cancel_refund,
    send_email,
    open_ticket,
    close_ticket,
    track_shipment,
)


def _money(amount: float) -> float:
    if (
        isinstance(amount, bool)
        or not isinstance(amount, (int, float))
        or not math.isfinite(amount)
    ):
        raise ToolError(f"amount must be a finite number, got {amount!r}", retryable=False)
    rounded = round(float(amount), 2)
    if rounded <= 0:
        raise ToolError(f"refund amount must be positive, got {amount!r}", retryable=False)
    return rounded


def _refunded(conn: sqlite3.Connection, order_id: str) -> float:
    total: float = conn.execute(
        "SELECT COALESCE(SUM(amount), 0) FROM refunds WHERE order_id = ? AND status = 'issued'",
        (order_id,),
    ).fetchone()[0]
    return round(total, 2)


def _find_refund(
    conn: sqlite3.Connection, refund_id: str | None, idempotency_key: str | None
) -> sqlite3.Row | None:
    row: sqlite3.Row | None = None
    if refund_id is not None:
        row = conn.execute("SELECT * FROM refunds WHERE refund_id = ?", (refund_id,)).fetchone()
    if row is None and idempotency_key is not None:
        row = conn.execute(
            "SELECT * FROM refunds WHERE idempotency_key = ?", (idempotency_key,)
        ).fetchone()
    return row


def _refund_dict(row: sqlite3.Row, *, replayed: bool) -> dict[str, Any]:
    return {
        "refund_id": row["refund_id"],
        "order_id": row["order_id"],
        "amount": row["amount"],
        "status": row["status"],
        "created_at": row["created_at"],
        "replayed": replayed,
    }


def _ticket_dict(row: sqlite3.Row, *, replayed: bool) -> dict[str, Any]:
    return {
        "ticket_id": row["ticket_id"],
        "order_id": row["order_id"],
        "note": row["note"],
        "status": row["status"],
        "created_at": row["created_at"],
        "replayed": replayed,
    }


class _HttpOnlyRedirects(urllib.request.HTTPRedirectHandler):
    """Follows redirects to http(s) URLs only (never ``ftp:``); any other ends as an HTTPError."""

    def redirect_request(
        self,
        req: urllib.request.Request,
        fp: IO[bytes],
        code: int,
        msg: str,
        headers: http.client.HTTPMessage,
        newurl: str,
    ) -> urllib.request.Request | None:
        if urllib.parse.urlsplit(newurl).scheme not in ("http", "https"):
            return None
        return super().redirect_request(req, fp, code, msg, headers, newurl)


def _read_bounded(response: Any, where: str) -> bytes:
    """The answer's body: at most ``CARRIER_MAX_BYTES``, within ``CARRIER_TIMEOUT_S`` in all
    (the socket timeout alone would let a server that drips bytes hold the call)."""
    deadline = time.monotonic() + CARRIER_TIMEOUT_S
    chunks: list[bytes] = []
    size = 0
    while True:
        chunk = response.read1(min(8192, CARRIER_MAX_BYTES + 1 - size))  # what has arrived
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)
        size += len(chunk)
        if size > CARRIER_MAX_BYTES:
            raise ToolError(
                f"{where} sent an answer longer than {CARRIER_MAX_BYTES} bytes", retryable=False
            )
        if time.monotonic() > deadline:
            raise ToolError(
                f"{where} took longer than {CARRIER_TIMEOUT_S:g}s to send its answer",
                retryable=True,
            )


_CARRIER_FIELDS = {"carrier": 80, "status": 120, "eta": 40}  # field -> longest accepted text


def _tracking(body: bytes, order_id: str, where: str) -> dict[str, Any]:
    """The tracking fields of the carrier's answer, checked: short single-line text only."""
    try:
        data = jsonvalue.loads(body, what="the answer", max_bytes=CARRIER_MAX_BYTES)
    except ValueError as exc:
        raise ToolError(f"{where} sent a bad answer: {exc}", retryable=False) from None
    if not isinstance(data, dict):
        raise ToolError(
            f"{where} sent a bad answer: expected a JSON object, got {type(data).__name__}",
            retryable=False,
        )
    answered_for = data.get("order_id", order_id)
    if answered_for != order_id:
        raise ToolError(
            f"{where} answered about order {str(answered_for)[:40]!r}, not {order_id}",
            retryable=False,
        )
    out: dict[str, Any] = {"order_id": order_id}
    for field, limit in _CARRIER_FIELDS.items():
        value = data.get(field)
        if field == "eta" and value in (None, ""):
            out[field] = None
            continue
        text = " ".join(value.split()) if isinstance(value, str) else ""
        if not text or len(text) > limit or not text.isprintable():
            raise ToolError(
                f"{where} sent a bad answer: {field!r} must be text of 1 to {limit} printable "
                f"characters, got {str(value)[:60]!r}",
                retryable=False,
            )
        out[field] = text
    return out
