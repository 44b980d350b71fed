"""The support plugin's demo requests end to end through ``AgentSystem``: the exact answer
of each, the replan demo (a bounced email becomes a support ticket), the degraded demo
(order tracking without, or with a loopback, carrier service), and the tools and the
shop schema migration behind them.

Nothing here leaves 127.0.0.0/8: the carrier is an ``http.server`` on 127.0.0.1 (port 0),
proxies are switched off, and no LLM tier is configured.
"""

from __future__ import annotations

import json
import os
import re
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from agentkeel import AgentRequest, AgentResponse, AgentSystem, Config, RunStatus, StepStatus
from agentkeel.errors import ToolError
from agentkeel.runtime.compensation import compensation_args
from agentkeel.tools.decorator import spec_of
from agentkeel_support import shop, tools
from agentkeel_support.tools import close_ticket, lookup_order, open_ticket, track_shipment

USER = "agent-42"
CONFIG: dict[str, Any] = {
    "principals": {USER: {"permissions": ["read", "refunds", "email"]}},
    "retry": {"base_delay_s": 0.01, "max_delay_s": 0.05},
    "responder": {"mode": "template"},
}
PROXY_VARS = ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY")
NO_TRACKING = "Order 1003 is delivered: widget-1, total $120.00."
"""The answer of "track order 1003" without the carrier; the runtime adds what could not be done."""


@pytest.fixture(autouse=True)
def offline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(tools.CARRIER_URL_ENV, raising=False)
    for name in PROXY_VARS:  # a loopback request must never go to a proxy
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("no_proxy", "*")
    monkeypatch.setenv("AGENTKEEL_LOAD_PLUGINS", "support")
    # The support tools run in process; no dependency on Docker or the subprocess runner.
    monkeypatch.setenv("AGENTKEEL_DISABLE_PLUGINS", "sandbox_docker,sandbox_subprocess")


@pytest.fixture
def db() -> Path:
    return Path(os.environ[shop.SHOP_DB_ENV])  # isolated per test by tests/conftest.py


@pytest.fixture
def system() -> Iterator[AgentSystem]:
    with AgentSystem(Config.from_dict(CONFIG)) as running:
        yield running


def ask(system: AgentSystem, message: str) -> AgentResponse:
    return system.run_sync(AgentRequest(message=message, user_id=USER))


def statuses(response: AgentResponse) -> list[StepStatus]:
    return [s.status for s in response.steps]


def revisions(response: AgentResponse) -> list[str]:
    return [r.reason for r in response.revisions]


def query(db: Path, sql: str, *params: Any) -> list[tuple[Any, ...]]:
    conn = sqlite3.connect(db)
    try:
        return conn.execute(sql, params).fetchall()
    finally:
        conn.close()


def tool_calls(home: Path, run_id: str) -> list[str]:
    """The tools a run called, in order, from the audit log (one record per call attempt)."""
    records = [json.loads(line) for line in (home / "audit.jsonl").read_text().splitlines()]
    return [r["tool"] for r in records if r["run_id"] == run_id and r["action"] == "tool_call"]


# --- a carrier on loopback --------------------------------------------------------------------

Reply = tuple[int, bytes, dict[str, str]]


def json_reply(data: Any, status: int = 200) -> Reply:
    return status, json.dumps(data).encode(), {"Content-Type": "application/json"}


TRACKING: dict[str, dict[str, Any]] = {
    "/track/1003": {
        "order_id": "1003",
        "carrier": "DHL",
        "status": "delivered to a neighbour",
        "eta": None,
    },
    "/track/1001": {
        "order_id": "1001",
        "carrier": "UPS",
        "status": "in transit",
        "eta": "2025-06-03",
    },
}
"""What the scripted carrier answers for each path."""


class Carrier:
    """A scripted carrier tracking service on 127.0.0.1 (port 0), served by a thread."""

    def __init__(self) -> None:
        self.paths: list[str] = []
        self.reply: Callable[[str], Reply] = self.tracking
        self.drip_s = 0.0  # > 0: send the body one byte at a time, this far apart
        carrier = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                carrier.paths.append(self.path)
                status, body, headers = carrier.reply(self.path)
                self.send_response(status)
                for name, value in headers.items():
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                try:
                    if carrier.drip_s:
                        for byte in body:
                            self.wfile.write(bytes([byte]))
                            self.wfile.flush()
                            time.sleep(carrier.drip_s)
                    else:
                        self.wfile.write(body)
                except OSError:
                    pass  # the client gave up

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(
            target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self.thread.start()

    def tracking(self, path: str) -> Reply:
        found = TRACKING.get(path)
        return json_reply(found) if found else json_reply({"error": "unknown parcel"}, 404)

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=10)


@pytest.fixture
def carrier(monkeypatch: pytest.MonkeyPatch) -> Iterator[Carrier]:
    service = Carrier()
    monkeypatch.setenv(tools.CARRIER_URL_ENV, service.url)
    try:
        yield service
    finally:
        service.close()


def assert_answered_without_tracking(response: AgentResponse) -> None:
    """The template's answer from the lookup, then the runtime's sentence naming the
    tracking step that could not be done (its wording is the responder's)."""
    assert response.answer.startswith(NO_TRACKING + " "), response.answer
    tail = response.answer[len(NO_TRACKING) :]
    assert "track_shipment" in tail or "ask the carrier where the parcel of order 1003 is" in tail
    assert "try again later" in tail


def tool_error(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> ToolError:
    with pytest.raises(ToolError) as info:
        fn(*args, **kwargs)
    return info.value


# --- the demo requests, answer by answer -------------------------------------------------------


def test_refund_if_shipped_answers_then_has_nothing_left_to_refund(
    system: AgentSystem, db: Path
) -> None:
    shipped = ask(system, "refund order 1001 if it has shipped")
    assert shipped.status is RunStatus.SUCCEEDED, shipped.message
    assert shipped.plan is not None and shipped.plan.planner == "rules:support:refund_if_shipped"
    refund_id = shipped.steps[1].result["refund_id"]
    assert re.fullmatch(r"R-[0-9a-f]{12}", refund_id)
    assert shipped.answer == f"Order 1001 was shipped, so I refunded $49.99 (refund {refund_id})."
    assert shipped.answer_source == "template"

    again = ask(system, "refund order 1001 if it has shipped")
    assert again.status is RunStatus.FAILED
    assert statuses(again) == [StepStatus.SUCCEEDED, StepStatus.FAILED]
    assert again.answer == (
        "I could not complete your request: step 2 (issue_refund) failed: refund of 49.99 exceeds "
        "the 0.00 left to refund on order 1001 (total 49.99) (issue_refund failed after 1 "
        "attempt(s)). You can try again later, or rephrase the request. Done before it stopped: "
        "step 1 (lookup_order)."
    )
    assert query(db, "SELECT refund_id, status FROM refunds") == [(refund_id, "issued")]

    status = ask(system, "where is order 1001")
    assert status.answer == (
        "Order 1001 is shipped: widget-1, total $49.99, of which $49.99 has been refunded."
    )


def test_a_pending_order_is_not_refunded_and_the_answer_says_why(
    system: AgentSystem, db: Path
) -> None:
    pending = ask(system, "refund order 1002 if it has shipped")
    assert pending.status is RunStatus.SUCCEEDED, pending.message
    assert statuses(pending) == [StepStatus.SUCCEEDED, StepStatus.SKIPPED]
    assert pending.answer == (
        "Order 1002 is pending, so I did not refund it: only shipped or delivered orders are "
        "refunded."
    )
    assert query(db, "SELECT * FROM refunds") == []


def test_check_then_refund_answers_like_refund_if_shipped(system: AgentSystem) -> None:
    response = ask(system, "Check if order ORD-123 is shipped and refund it if so.")
    assert response.status is RunStatus.SUCCEEDED, response.message
    assert response.plan is not None and response.plan.planner == "rules:support:check_then_refund"
    refund_id = response.steps[1].result["refund_id"]
    assert response.answer == (
        f"Order ORD-123 was shipped, so I refunded $49.99 (refund {refund_id})."
    )
    cancelled = ask(system, "check if order 1004 is shipped and refund it if so")
    assert cancelled.answer == (
        "Order 1004 is cancelled, so I did not refund it: only shipped or delivered orders are "
        "refunded."
    )


def test_where_is_order_1003(system: AgentSystem) -> None:
    response = ask(system, "where is order 1003")
    assert response.status is RunStatus.SUCCEEDED, response.message
    assert response.answer == "Order 1003 is delivered: widget-1, total $120.00."


@pytest.mark.parametrize(
    ("message", "answer"),
    [
        ("is widget-1 in stock", "Widget (widget-1) is in stock: 42 units left."),
        ("check stock of widget-1", "Widget (widget-1) is in stock: 42 units left."),
        ("Is gadget-2 in stock?", "Gadget (gadget-2) is out of stock: 0 units left."),
        ("check the inventory of gizmo-3", "Gizmo (gizmo-3) is in stock: 7 units left."),
    ],
)
def test_stock_answers(system: AgentSystem, message: str, answer: str) -> None:
    response = ask(system, message)
    assert response.status is RunStatus.SUCCEEDED, response.message
    assert response.answer == answer


def test_one_unit_left_is_singular(system: AgentSystem, db: Path) -> None:
    lookup_order("1001")  # create the database
    conn = sqlite3.connect(db)
    with conn:
        conn.execute("UPDATE products SET stock = 1 WHERE product_id = 'gizmo-3'")
    conn.close()
    assert ask(system, "is gizmo-3 in stock").answer == "Gizmo (gizmo-3) is in stock: 1 unit left."


def test_refund_and_email_mentions_both_and_the_address(system: AgentSystem, db: Path) -> None:
    response = ask(system, "refund order 1001 and email the customer")
    assert response.status is RunStatus.SUCCEEDED, response.message
    assert statuses(response) == [StepStatus.SUCCEEDED] * 3
    refund_id = response.steps[1].result["refund_id"]
    assert response.answer == (
        f"Order 1001 was shipped, so I refunded $49.99 (refund {refund_id}) and emailed the "
        "customer at alice@example.com."
    )
    assert query(db, "SELECT to_addr, subject FROM emails") == [
        ("alice@example.com", "Your refund for order 1001")
    ]


def test_refund_and_email_of_a_pending_order_does_neither(system: AgentSystem, db: Path) -> None:
    response = ask(system, "refund order 1002 and email the customer")
    assert response.status is RunStatus.SUCCEEDED, response.message
    assert statuses(response) == [StepStatus.SUCCEEDED, StepStatus.SKIPPED, StepStatus.SKIPPED]
    assert response.answer == (
        "Order 1002 is pending, so I did not refund it and did not email the customer: only "
        "shipped or delivered orders are refunded."
    )
    assert query(db, "SELECT * FROM emails") == [] and query(db, "SELECT * FROM refunds") == []


def test_refund_and_email_of_1005_fails_and_the_refund_is_undone(
    system: AgentSystem, db: Path
) -> None:
    response = ask(system, "refund order 1005 and email the customer")
    assert response.status is RunStatus.FAILED
    assert revisions(response) == ["initial"]  # the template has no replan
    assert statuses(response) == [StepStatus.SUCCEEDED, StepStatus.COMPENSATED, StepStatus.FAILED]
    assert response.answer == (
        "I could not complete your request: step 3 (send_email) failed: mail to frank@mail.invalid "
        "bounced: mailbox unavailable (send_email is not idempotent and takes no idempotency key: "
        "not retried). You can try again later, or rephrase the request. I undid what had been "
        "done: step 2 (issue_refund) rolled back. Done before it stopped: step 1 (lookup_order)."
    )
    assert query(db, "SELECT order_id, status FROM refunds") == [("1005", "cancelled")]
    assert query(db, "SELECT * FROM tickets") == []


# --- the replan demo ---------------------------------------------------------------------------


def test_a_bounced_update_email_becomes_a_ticket(
    system: AgentSystem, db: Path, isolated_home: Path
) -> None:
    response = ask(system, "email the customer of order 1005 an update")
    assert response.status is RunStatus.SUCCEEDED, response.message
    assert revisions(response) == ["initial", "replan"]
    assert [r.plan.planner for r in response.revisions] == [
        "rules:support:email_update",
        "rules:support:email_update:replan",
    ]
    assert [(s.step_id, s.tool_name, s.status) for s in response.steps] == [
        (1, "lookup_order", StepStatus.SUCCEEDED),
        (2, "send_email", StepStatus.FAILED),
        (3, "open_ticket", StepStatus.SUCCEEDED),
    ]
    assert "mail to frank@mail.invalid bounced" in (response.steps[1].error or "")
    ticket_id = response.steps[2].result["ticket_id"]
    assert re.fullmatch(r"T-[0-9a-f]{12}", ticket_id)
    assert response.answer == (
        "I could not email the customer of order 1005 (the email to frank@mail.invalid could not "
        f"be delivered), so I opened ticket {ticket_id} for a support agent to contact them."
    )
    assert query(db, "SELECT ticket_id, order_id, note, idempotency_key, status FROM tickets") == [
        (
            ticket_id,
            "1005",
            "The update email to the customer of order 1005 could not be delivered. "
            "Contact them another way.",
            f"{response.run_id}:3",
            "open",
        )
    ]
    assert query(db, "SELECT * FROM emails") == []
    # The replan reused the lookup of revision 1: it ran once.
    system.close()
    assert tool_calls(isolated_home, response.run_id) == [
        "lookup_order",
        "send_email",
        "open_ticket",
    ]


def test_an_update_email_that_works_needs_no_replan(system: AgentSystem, db: Path) -> None:
    response = ask(system, "tell the customer of order 1001 about their order")
    assert response.status is RunStatus.SUCCEEDED, response.message
    assert revisions(response) == ["initial"]
    assert statuses(response) == [StepStatus.SUCCEEDED, StepStatus.SUCCEEDED]
    email_id = response.steps[1].result["email_id"]
    assert response.answer == (
        f"I emailed the customer of order 1001 an update at alice@example.com (email {email_id})."
    )
    assert query(db, "SELECT email_id, to_addr, subject FROM emails") == [
        (email_id, "alice@example.com", "An update on your order 1001")
    ]
    assert query(db, "SELECT * FROM tickets") == []


def test_rolling_back_the_replanned_run_closes_the_ticket(system: AgentSystem, db: Path) -> None:
    response = ask(system, "email the customer of order 1005 an update")
    assert response.status is RunStatus.SUCCEEDED, response.message
    ticket_id = response.steps[2].result["ticket_id"]
    rolled = system.rollback_sync(response.run_id)
    assert rolled.status is RunStatus.ROLLED_BACK, rolled.message
    by_id = {s.step_id: s.status for s in rolled.steps}
    assert by_id[3] is StepStatus.COMPENSATED
    assert rolled.answer == f"Run {response.run_id} was rolled back: step 3 (open_ticket) undone."
    assert query(db, "SELECT ticket_id, status FROM tickets") == [(ticket_id, "closed")]
    again = system.rollback_sync(response.run_id)  # nothing left to undo, nothing changes
    assert query(db, "SELECT ticket_id, status FROM tickets") == [(ticket_id, "closed")]
    assert again.status is RunStatus.ROLLED_BACK, again.message


# --- the degraded demo -------------------------------------------------------------------------


def test_track_order_without_a_carrier_is_degraded(system: AgentSystem) -> None:
    response = ask(system, "track order 1003")
    assert response.status is RunStatus.DEGRADED, response.message
    assert response.plan is not None and response.plan.planner == "rules:support:track_order"
    assert statuses(response) == [StepStatus.SUCCEEDED, StepStatus.FAILED]
    assert response.steps[1].error is not None
    assert (
        "the carrier's tracking service is not configured (set AGENTKEEL_CARRIER_URL)"
        in response.steps[1].error
    )
    assert "optional step 2 (track_shipment) was unavailable" in response.message
    assert_answered_without_tracking(response)


def test_track_order_with_the_carrier(system: AgentSystem, carrier: Carrier) -> None:
    response = ask(system, "track order 1003")
    assert response.status is RunStatus.SUCCEEDED, response.message
    assert statuses(response) == [StepStatus.SUCCEEDED, StepStatus.SUCCEEDED]
    assert response.steps[1].result == {
        "order_id": "1003",
        "carrier": "DHL",
        "status": "delivered to a neighbour",
        "eta": None,
    }
    assert response.answer == (
        "Order 1003 is delivered. The carrier DHL reports: delivered to a neighbour."
    )
    with_eta = ask(system, "track my order 1001")
    assert with_eta.status is RunStatus.SUCCEEDED, with_eta.message
    assert with_eta.answer == (
        "Order 1001 is shipped. The carrier UPS reports: in transit, estimated delivery 2025-06-03."
    )
    assert carrier.paths == ["/track/1003", "/track/1001"]


def test_track_order_when_the_carrier_answers_500_retries_then_degrades(
    system: AgentSystem, carrier: Carrier
) -> None:
    carrier.reply = lambda path: (500, b"oops", {"Content-Type": "text/plain"})
    response = ask(system, "track order 1003")
    assert response.status is RunStatus.DEGRADED, response.message
    assert "answered HTTP 500 for order 1003" in (response.steps[1].error or "")
    assert carrier.paths == ["/track/1003"] * 3  # retryable: [retry] max_attempts
    assert_answered_without_tracking(response)


def test_track_order_when_the_carrier_answers_garbage_degrades_at_once(
    system: AgentSystem, carrier: Carrier
) -> None:
    carrier.reply = lambda path: (200, b"<html>tracking!</html>", {"Content-Type": "text/html"})
    response = ask(system, "track order 1003")
    assert response.status is RunStatus.DEGRADED, response.message
    assert "sent a bad answer: the answer: not JSON" in (response.steps[1].error or "")
    assert carrier.paths == ["/track/1003"]  # not retryable
    assert_answered_without_tracking(response)


def test_track_order_when_the_carrier_is_unreachable_degrades(
    system: AgentSystem, monkeypatch: pytest.MonkeyPatch
) -> None:
    closed = ThreadingHTTPServer(("127.0.0.1", 0), BaseHTTPRequestHandler)
    port = closed.server_address[1]
    closed.server_close()  # nothing listens there now
    monkeypatch.setenv(tools.CARRIER_URL_ENV, f"http://127.0.0.1:{port}")
    response = ask(system, "track order 1003")
    assert response.status is RunStatus.DEGRADED, response.message
    assert "cannot reach the carrier's tracking service" in (response.steps[1].error or "")
    assert_answered_without_tracking(response)


# --- track_shipment on its own -----------------------------------------------------------------


def test_track_shipment_not_configured() -> None:
    error = tool_error(track_shipment, "1003")
    assert str(error) == (
        "the carrier's tracking service is not configured (set AGENTKEEL_CARRIER_URL)"
    )
    assert error.retryable is False


@pytest.mark.parametrize("url", ["file:///etc/passwd", "ftp://127.0.0.1/", "127.0.0.1:8080", "http://"])
def test_track_shipment_refuses_a_url_that_is_not_http(
    monkeypatch: pytest.MonkeyPatch, url: str
) -> None:
    monkeypatch.setenv(tools.CARRIER_URL_ENV, url)
    error = tool_error(track_shipment, "1003")
    assert "must be an http:// or https:// URL" in str(error) and error.retryable is False


def test_track_shipment_builds_the_path_from_a_quoted_order_id(
    carrier: Carrier, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(tools.CARRIER_URL_ENV, carrier.url + "/api/")
    carrier.reply = lambda path: json_reply({"carrier": "DHL", "status": "ok", "eta": ""})
    result = track_shipment("A/../x y")
    assert carrier.paths == ["/api/track/A%2F..%2Fx%20y"]
    assert result == {"order_id": "A/../x y", "carrier": "DHL", "status": "ok", "eta": None}
    spec = spec_of(track_shipment)
    assert spec is not None and spec.output_schema is not None
    jsonschema.validate(result, spec.output_schema)


@pytest.mark.parametrize(
    ("status", "retryable", "message"),
    [
        (404, False, "has no tracking for order 1003 (HTTP 404)"),
        (400, False, "answered HTTP 400 for order 1003"),
        (429, True, "answered HTTP 429"),
        (500, True, "answered HTTP 500"),
        (503, True, "answered HTTP 503"),
        (204, False, "answered HTTP 204"),
    ],
)
def test_track_shipment_http_errors(
    carrier: Carrier, status: int, retryable: bool, message: str
) -> None:
    carrier.reply = lambda path: (status, b"" if status == 204 else b"no", {})
    error = tool_error(track_shipment, "1003")
    assert message in str(error)
    assert error.retryable is retryable


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"[1, 2]", "expected a JSON object, got list"),
        (b'{"carrier": "DHL"}', "'status' must be text of 1 to 120 printable characters"),
        (b'{"carrier": "", "status": "x"}', "'carrier' must be text"),
        (b'{"carrier": 7, "status": "x"}', "'carrier' must be text"),
        (b'{"carrier": "\\u001b[31mDHL", "status": "x"}', "'carrier' must be text"),
        (b'{"carrier": "DHL", "status": "x", "eta": 20250603}', "'eta' must be text"),
        (b'{"carrier": "DHL", "status": "' + b"x" * 121 + b'"}', "'status' must be text"),
        (b'{"order_id": "1001", "carrier": "DHL", "status": "x"}', "answered about order '1001'"),
        (b'{"carrier": "DHL", "status": NaN}', "NaN is not a JSON number"),
        (b"\xff\xfe", "not UTF-8"),
        (b"{" + b" " * (70 * 1024) + b"}", "longer than 65536 bytes"),
    ],
)
def test_track_shipment_refuses_bad_answers(carrier: Carrier, body: bytes, message: str) -> None:
    carrier.reply = lambda path: (200, body, {"Content-Type": "application/json"})
    error = tool_error(track_shipment, "1003")
    assert message in str(error)
    assert error.retryable is False


def test_track_shipment_normalizes_whitespace(carrier: Carrier) -> None:
    carrier.reply = lambda path: json_reply(
        {"carrier": " DHL\n Express ", "status": "in\ttransit", "eta": "2025-06-03", "extra": 1}
    )
    assert track_shipment("1003") == {
        "order_id": "1003",
        "carrier": "DHL Express",
        "status": "in transit",
        "eta": "2025-06-03",
    }


def test_track_shipment_does_not_follow_a_redirect_off_http(carrier: Carrier) -> None:
    carrier.reply = lambda path: (302, b"", {"Location": "ftp://127.0.0.1/track"})
    error = tool_error(track_shipment, "1003")
    assert "answered HTTP 302" in str(error) and error.retryable is False
    assert carrier.paths == ["/track/1003"]


def test_track_shipment_follows_a_redirect_to_http(carrier: Carrier) -> None:
    carrier.reply = lambda path: (
        (301, b"", {"Location": "/v2/track/1003"})
        if path == "/track/1003"
        else carrier.tracking(path.removeprefix("/v2"))
    )
    assert track_shipment("1003")["status"] == "delivered to a neighbour"
    assert carrier.paths == ["/track/1003", "/v2/track/1003"]


def test_track_shipment_gives_up_on_a_server_that_drips(
    carrier: Carrier, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(tools, "CARRIER_TIMEOUT_S", 0.3)
    carrier.drip_s = 0.05  # each byte well within the socket timeout, the whole far beyond
    carrier.reply = lambda path: json_reply({"carrier": "DHL", "status": "x" * 100})
    started = time.monotonic()
    error = tool_error(track_shipment, "1003")
    assert "took longer than 0.3s to send its answer" in str(error) and error.retryable is True
    assert time.monotonic() - started < 3


# --- tickets -----------------------------------------------------------------------------------


def test_open_ticket_with_the_same_key_opens_one(db: Path) -> None:
    first = open_ticket("1005", "call them", idempotency_key="run-1:3")
    again = open_ticket("1005", "call them", idempotency_key="run-1:3")
    assert again["ticket_id"] == first["ticket_id"]
    assert (first["replayed"], again["replayed"]) == (False, True)
    assert first["status"] == "open" and first["note"] == "call them"
    assert query(db, "SELECT ticket_id, idempotency_key FROM tickets") == [
        (first["ticket_id"], "run-1:3")
    ]
    other = open_ticket("1005", "call them", idempotency_key="run-2:3")
    unkeyed = open_ticket("1005", "call them")
    assert len({first["ticket_id"], other["ticket_id"], unkeyed["ticket_id"]}) == 3
    assert len(query(db, "SELECT * FROM tickets")) == 3


def test_open_ticket_refusals(db: Path) -> None:
    open_ticket("1005", "call them", idempotency_key="k")
    for args, message in [
        (("1001", "call them"), "use a new key"),
        (("1005", "write to them"), "use a new key"),
    ]:
        error = tool_error(open_ticket, *args, idempotency_key="k")
        assert message in str(error) and error.retryable is False
    assert "order 9999 not found" in str(tool_error(open_ticket, "9999", "note"))
    assert "needs a note" in str(tool_error(open_ticket, "1005", "   "))
    assert "more than 2000" in str(tool_error(open_ticket, "1005", "x" * 2001))
    assert len(query(db, "SELECT * FROM tickets")) == 1


def test_close_ticket_is_idempotent_and_finds_a_ticket_by_key(db: Path) -> None:
    ticket = open_ticket("1005", "call them", idempotency_key="run-1:3")
    closed = close_ticket(ticket["ticket_id"])
    assert closed["status"] == "closed" and closed["ticket_id"] == ticket["ticket_id"]
    assert close_ticket(ticket["ticket_id"]) == closed  # nothing changes the second time
    assert close_ticket(idempotency_key="run-1:3") == closed
    assert close_ticket(idempotency_key="never-used") == {
        "ticket_id": None,
        "status": "nothing_to_close",
    }
    assert "ticket T-missing not found" in str(tool_error(close_ticket, "T-missing"))
    assert "needs ticket_id" in str(tool_error(close_ticket))
    assert query(db, "SELECT status FROM tickets") == [("closed",)]


def test_close_ticket_gets_the_ticket_id_as_a_compensation() -> None:
    forward, compensator = spec_of(open_ticket), spec_of(close_ticket)
    assert forward is not None and compensator is not None
    assert forward.rollback == compensator.name
    args = {"order_id": "1005", "note": "call them"}
    result = open_ticket(**args, idempotency_key="run-5:3")
    assert compensation_args(compensator, args, result) == {"ticket_id": result["ticket_id"]}


# --- the shop schema, version 2 ----------------------------------------------------------------


def make_version_1(db: Path) -> None:
    """A shop database as version 1 of agentkeel-support left it, with some history."""
    db.parent.mkdir(parents=True, exist_ok=True)
    conn = sqlite3.connect(db, isolation_level=None)
    try:
        conn.execute("PRAGMA journal_mode = WAL")
        for statement in shop.SCHEMA_V1:
            conn.execute(statement)
        conn.executemany("INSERT INTO products VALUES (?, ?, ?)", shop.SAMPLE_PRODUCTS)
        conn.executemany("INSERT INTO orders VALUES (?, ?, ?, ?, ?)", shop.SAMPLE_ORDERS)
        conn.execute("UPDATE products SET stock = 5 WHERE product_id = 'widget-1'")
        conn.execute(
            "INSERT INTO refunds VALUES ('R-old', '1001', 10.0, 'old:2', 'issued', '2024-01-01', NULL)"
        )
        conn.execute("PRAGMA user_version = 1")
    finally:
        conn.close()


def test_a_new_database_is_version_2_with_tickets(db: Path) -> None:
    lookup_order("1001")
    assert query(db, "PRAGMA user_version") == [(shop.SCHEMA_VERSION,)] == [(2,)]
    assert query(db, "SELECT * FROM tickets") == []


def test_a_version_1_database_is_migrated_in_place(db: Path) -> None:
    make_version_1(db)
    assert query(db, "SELECT name FROM sqlite_master WHERE name = 'tickets'") == []
    ticket = open_ticket("1005", "call them")
    assert query(db, "PRAGMA user_version") == [(2,)]
    assert query(db, "SELECT ticket_id FROM tickets") == [(ticket["ticket_id"],)]
    # kept, not re-seeded: the changed stock, the refund, one row per sample order
    assert query(db, "SELECT stock FROM products WHERE product_id = 'widget-1'") == [(5,)]
    assert query(db, "SELECT refund_id, status FROM refunds") == [("R-old", "issued")]
    assert len(query(db, "SELECT * FROM orders")) == len(shop.SAMPLE_ORDERS)
    assert lookup_order("1001")["refunded"] == 10.0


def test_processes_migrating_at_once_migrate_once(db: Path) -> None:
    make_version_1(db)
    code = "from agentkeel_support.tools import lookup_order; print(lookup_order('1003')['status'])"
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        for _ in range(6)
    ]
    for proc in procs:
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err
        assert out.strip() == "delivered"
    assert query(db, "PRAGMA user_version") == [(2,)]
    assert query(db, "SELECT stock FROM products WHERE product_id = 'widget-1'") == [(5,)]
    assert query(db, "SELECT count(*) FROM sqlite_master WHERE name = 'tickets'") == [(1,)]


def test_a_newer_database_is_refused(db: Path) -> None:
    make_version_1(db)
    conn = sqlite3.connect(db)
    conn.execute("PRAGMA user_version = 3")
    conn.close()
    error = tool_error(lookup_order, "1001")
    assert "has schema version 3, newer than this agentkeel-support understands (2)" in str(error)
    assert error.retryable is False
