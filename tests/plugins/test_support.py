"""The agentkeel-support distribution: entry point, tools over a real SQLite shop, templates."""

from __future__ import annotations

import importlib.metadata
import sqlite3
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import agentkeel_support.plugin
import jsonschema
import pluggy
import pytest
from agentkeel import AgentRequest, Config, RunStatus, StepStatus, hookspecs
from agentkeel.errors import ToolError
from agentkeel.planner.plan import evaluate_condition, parse_plan, resolve_args
from agentkeel.tools.registry import ToolRegistry
from agentkeel.types import Plan, ToolSpec
from agentkeel_support import shop
from agentkeel_support.plugin import TEMPLATES
from agentkeel_support.tools import (
    cancel_refund,
    check_inventory,
    issue_refund,
    lookup_order,
    send_email,
)


@pytest.fixture
def shop_db(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    path = tmp_path / "shop" / "shop.db"
    monkeypatch.setenv(shop.SHOP_DB_ENV, str(path))
    return path


@pytest.fixture
def tools() -> dict[str, ToolSpec]:
    registry = ToolRegistry()
    agentkeel_support.plugin.agentkeel_register_tools(registry.register_callback("support"))
    registry.validate_references()
    return registry.all()


def query(db: Path, sql: str, *params: Any) -> list[tuple[Any, ...]]:
    conn = sqlite3.connect(db)
    try:
        return conn.execute(sql, params).fetchall()
    finally:
        conn.close()


def refund_rows(db: Path) -> list[tuple[Any, ...]]:
    return query(db, "SELECT refund_id, order_id, amount, idempotency_key, status FROM refunds")


def refusal(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> ToolError:
    with pytest.raises(ToolError) as info:
        fn(*args, **kwargs)
    assert info.value.retryable is False
    return info.value


# --- distribution and plugin ----------------------------------------------------------------


def test_entry_point_names_the_plugin_module() -> None:
    eps = [ep for ep in importlib.metadata.entry_points(group="agentkeel") if ep.name == "support"]
    assert len(eps) == 1
    assert eps[0].value == "agentkeel_support.plugin"
    assert eps[0].load() is agentkeel_support.plugin
    assert importlib.metadata.version("agentkeel-support") == "0.1.0"


def test_plugin_manager_loads_support_from_entry_points() -> None:
    pm = pluggy.PluginManager("agentkeel")
    pm.add_hookspecs(hookspecs)
    assert pm.load_setuptools_entrypoints("agentkeel", name="support") == 1
    pm.check_pending()  # every hook the plugin implements exists, with a valid signature
    assert pm.get_plugin("support") is agentkeel_support.plugin
    hooks = {caller.name for caller in pm.get_hookcallers(agentkeel_support.plugin) or []}
    assert hooks == {"agentkeel_register_tools", "agentkeel_register_plan_templates"}


def test_tool_declarations(tools: dict[str, ToolSpec]) -> None:
    assert set(tools) == {
        "lookup_order",
        "check_inventory",
        "issue_refund",
        "cancel_refund",
        "send_email",
        "open_ticket",
        "close_ticket",
        "track_shipment",
    }
    assert all(spec.plugin == "support" for spec in tools.values())
    for name in ("lookup_order", "check_inventory"):
        assert tools[name].permissions == {"read"} and tools[name].idempotent
    refund = tools["issue_refund"]
    assert refund.permissions == {"refunds"}
    assert not refund.idempotent and refund.accepts_key and refund.rollback == "cancel_refund"
    assert "idempotency_key" not in refund.args_schema["properties"]
    cancel = tools["cancel_refund"]
    assert cancel.idempotent and cancel.permissions == {"refunds"}
    email = tools["send_email"]
    assert email.permissions == {"email"}
    assert not email.idempotent and not email.accepts_key and email.rollback is None
    assert not email.retry_safe
    assert tools["lookup_order"].output_schema is not None
    assert set(tools["lookup_order"].output_schema["required"]) == {"order_id", "status", "total"}
    ticket = tools["open_ticket"]
    assert ticket.permissions == {"email"} and ticket.rollback == "close_ticket"
    assert not ticket.idempotent and ticket.accepts_key and ticket.retry_safe
    close = tools["close_ticket"]
    assert close.permissions == {"email"} and close.idempotent and close.rollback is None
    track = tools["track_shipment"]
    assert track.permissions == {"read"} and track.idempotent and track.rollback is None
    assert track.args_schema["required"] == ["order_id"]


def test_plugin_registers_every_template() -> None:
    registered: list[object] = []
    agentkeel_support.plugin.agentkeel_register_plan_templates(registered.append)
    assert registered == list(TEMPLATES)


# --- the shop database ----------------------------------------------------------------------


def test_database_is_created_with_sample_data(shop_db: Path) -> None:
    assert not shop_db.exists()
    lookup_order("1001")
    assert shop_db.is_file()
    assert len(query(shop_db, "SELECT * FROM orders")) == len(shop.SAMPLE_ORDERS)
    assert len(query(shop_db, "SELECT * FROM products")) == len(shop.SAMPLE_PRODUCTS)
    assert query(shop_db, "PRAGMA journal_mode") == [("wal",)]
    assert refund_rows(shop_db) == [] and query(shop_db, "SELECT * FROM emails") == []


def test_database_path_falls_back_to_agentkeel_home(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(shop.SHOP_DB_ENV, raising=False)
    monkeypatch.setenv("AGENTKEEL_HOME", str(tmp_path / "home"))
    assert shop.shop_db_path() == tmp_path / "home" / "shop.db"
    check_inventory("widget-1")
    assert (tmp_path / "home" / "shop.db").is_file()


def test_processes_creating_the_database_at_once_seed_it_once(shop_db: Path) -> None:
    code = "from agentkeel_support.tools import lookup_order; print(lookup_order('1003')['status'])"
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        for _ in range(6)
    ]
    outputs = [proc.communicate(timeout=60) for proc in procs]
    for proc, (out, err) in zip(procs, outputs, strict=True):
        assert proc.returncode == 0, err
        assert out.strip() == "delivered"
    assert len(query(shop_db, "SELECT * FROM orders")) == len(shop.SAMPLE_ORDERS)


# --- read tools -----------------------------------------------------------------------------


def test_lookup_order(shop_db: Path, tools: dict[str, ToolSpec]) -> None:
    result = lookup_order("1001")
    assert result == {
        "order_id": "1001",
        "status": "shipped",
        "total": 49.99,
        "customer_email": "alice@example.com",
        "product_id": "widget-1",
        "refunded": 0,
    }
    jsonschema.validate(result, tools["lookup_order"].output_schema)
    assert [lookup_order(o)["status"] for o in ("1002", "1003", "1004")] == [
        "pending",
        "delivered",
        "cancelled",
    ]


def test_lookup_of_unknown_order_is_a_permanent_error(shop_db: Path) -> None:
    assert "order 9999 not found" in str(refusal(lookup_order, "9999"))


def test_check_inventory(shop_db: Path, tools: dict[str, ToolSpec]) -> None:
    widget = check_inventory("widget-1")
    assert widget == {"product_id": "widget-1", "name": "Widget", "stock": 42, "in_stock": True}
    jsonschema.validate(widget, tools["check_inventory"].output_schema)
    assert check_inventory("gadget-2")["in_stock"] is False
    assert "product nope not found" in str(refusal(check_inventory, "nope"))


# --- refunds --------------------------------------------------------------------------------


def test_refund_inserts_exactly_one_row(shop_db: Path, tools: dict[str, ToolSpec]) -> None:
    result = issue_refund("1001", 49.99)
    jsonschema.validate(result, tools["issue_refund"].output_schema)
    assert result["status"] == "issued" and result["replayed"] is False
    assert refund_rows(shop_db) == [(result["refund_id"], "1001", 49.99, None, "issued")]
    assert lookup_order("1001")["refunded"] == 49.99


def test_refund_with_the_same_key_twice_refunds_once(shop_db: Path) -> None:
    first = issue_refund("1003", 20.0, idempotency_key="run-1:2")
    second = issue_refund("1003", 20.0, idempotency_key="run-1:2")
    assert second["refund_id"] == first["refund_id"]
    assert second["replayed"] is True and first["replayed"] is False
    assert len(refund_rows(shop_db)) == 1
    third = issue_refund("1003", 20.0, idempotency_key="run-2:2")
    assert third["refund_id"] != first["refund_id"]
    assert len(refund_rows(shop_db)) == 2


def test_reusing_a_key_for_another_refund_is_refused(shop_db: Path) -> None:
    issue_refund("1003", 20.0, idempotency_key="k")
    assert "use a new key" in str(refusal(issue_refund, "1003", 30.0, idempotency_key="k"))
    assert len(refund_rows(shop_db)) == 1


@pytest.mark.parametrize(
    ("order_id", "amount", "message"),
    [
        ("1002", 10.0, "order 1002 is pending"),
        ("1004", 10.0, "order 1004 is cancelled"),
        ("1001", 0.0, "must be positive"),
        ("1001", -5.0, "must be positive"),
        ("1001", 50.0, "exceeds the 49.99 left"),
        ("9999", 1.0, "order 9999 not found"),
    ],
)
def test_refund_refusals_leave_no_row(
    shop_db: Path, order_id: str, amount: float, message: str
) -> None:
    lookup_order("1001")  # the database exists, so "no row" is checked rather than "no file"
    assert message in str(refusal(issue_refund, order_id, amount))
    assert refund_rows(shop_db) == []


def test_refunds_cannot_exceed_the_order_total_together(shop_db: Path) -> None:
    issue_refund("1003", 100.0)
    assert "exceeds the 20.00 left" in str(refusal(issue_refund, "1003", 20.01))
    issue_refund("1003", 20.0)
    assert len(refund_rows(shop_db)) == 2


def test_concurrent_full_refunds_pay_once(shop_db: Path) -> None:
    lookup_order("1001")  # create the database first; only the refunds race
    outcomes: list[str] = []
    lock = threading.Lock()

    def attempt() -> None:
        try:
            issue_refund("1001", 49.99)
            outcome = "refunded"
        except ToolError as exc:
            outcome = "retryable" if exc.retryable else "refused"
        with lock:
            outcomes.append(outcome)

    threads = [threading.Thread(target=attempt) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(outcomes) == ["refunded"] + ["refused"] * 7
    assert len(refund_rows(shop_db)) == 1


# --- the compensator ------------------------------------------------------------------------


def test_cancel_refund_with_original_args_and_result(
    shop_db: Path, tools: dict[str, ToolSpec]
) -> None:
    original_args = {"order_id": "1001", "amount": 49.99}
    result = issue_refund(**original_args, idempotency_key="run-9:2")
    compensation = {**original_args, "refund_id": result["refund_id"]}
    jsonschema.validate(compensation, tools["cancel_refund"].args_schema)
    cancelled = cancel_refund(**compensation)
    jsonschema.validate(cancelled, tools["cancel_refund"].output_schema)
    assert cancelled["status"] == "cancelled" and cancelled["refund_id"] == result["refund_id"]
    assert refund_rows(shop_db) == [(result["refund_id"], "1001", 49.99, "run-9:2", "cancelled")]
    again = cancel_refund(**compensation)
    assert again == cancelled  # idempotent: the same answer, nothing changed
    assert lookup_order("1001")["refunded"] == 0
    issue_refund("1001", 49.99)  # the cancelled amount can be refunded again


def test_cancel_refund_by_idempotency_key(shop_db: Path) -> None:
    result = issue_refund("1003", 120.0, idempotency_key="run-3:2")
    cancelled = cancel_refund("1003", amount=120.0, idempotency_key="run-3:2")
    assert cancelled["refund_id"] == result["refund_id"]
    assert query(shop_db, "SELECT status FROM refunds") == [("cancelled",)]


def test_cancel_refund_when_nothing_was_refunded(shop_db: Path) -> None:
    assert cancel_refund("1001", idempotency_key="never-used")["status"] == "nothing_to_cancel"
    assert "refund R-missing not found" in str(
        refusal(cancel_refund, "1001", refund_id="R-missing")
    )
    assert "needs refund_id" in str(refusal(cancel_refund, "1001"))


def test_cancel_refund_of_another_order_is_refused(shop_db: Path) -> None:
    result = issue_refund("1001", 10.0)
    assert "belongs to order 1001" in str(
        refusal(cancel_refund, "1003", refund_id=result["refund_id"])
    )
    assert query(shop_db, "SELECT status FROM refunds") == [("issued",)]


# --- email ----------------------------------------------------------------------------------


def test_send_email_inserts_a_row_each_time(shop_db: Path, tools: dict[str, ToolSpec]) -> None:
    result = send_email("alice@example.com", "Your refund", "Done.")
    jsonschema.validate(result, tools["send_email"].output_schema)
    assert query(
        shop_db, "SELECT email_id, to_addr, subject, body, idempotency_key FROM emails"
    ) == [(result["email_id"], "alice@example.com", "Your refund", "Done.", None)]
    send_email("alice@example.com", "Your refund", "Done.")
    assert (
        len(query(shop_db, "SELECT * FROM emails")) == 2
    )  # nothing stops a second send: never retry it
    assert "not an email address" in str(refusal(send_email, "alice", "s", "b"))
    assert len(query(shop_db, "SELECT * FROM emails")) == 2


# --- templates ------------------------------------------------------------------------------


def plan_for(message: str) -> tuple[str, Plan]:
    """The one template matching ``message`` and the plan it yields."""
    matches = [(t.name, t.match(message)) for t in TEMPLATES]
    found = [(name, wire) for name, wire in matches if wire is not None]
    assert len(found) == 1, f"{message!r} matched {[name for name, _ in found]}"
    name, wire = found[0]
    answer = wire.pop("answer_template", None)
    return name, parse_plan(wire, planner=f"rules:{name}", answer_template=answer)


def assert_plan_checks(plan: Plan, tools: dict[str, ToolSpec]) -> None:
    from agentkeel.planner.check import plan_problems

    assert plan_problems(plan, tools) == []


REFUND_IF_SHIPPED = [
    "refund order 1001 if it has shipped",
    "Refund order 1001 if shipped",
    "refund order #1001 if it has been shipped.",
    "Check if order ORD-123 is shipped and refund it if so.",
]


@pytest.mark.parametrize("message", REFUND_IF_SHIPPED)
def test_refund_if_shipped_template(message: str, tools: dict[str, ToolSpec]) -> None:
    _, plan = plan_for(message)
    order_id = "ORD-123" if "ORD-123" in message else "1001"
    lookup, refund = plan.steps
    assert (lookup.tool_name, dict(lookup.tool_args)) == ("lookup_order", {"order_id": order_id})
    assert refund.tool_name == "issue_refund"
    assert dict(refund.tool_args) == {"order_id": order_id, "amount": {"$ref": "/1/total"}}
    assert refund.when == {"ref": "/1/status", "op": "in", "value": ["shipped", "delivered"]}
    assert refund.depends_on == {1}
    assert_plan_checks(plan, tools)


def test_refund_if_shipped_condition_against_real_lookups(shop_db: Path) -> None:
    _, plan = plan_for("refund order 1001 if it has shipped")
    refund = plan.steps[1]
    assert refund.when is not None
    shipped = {1: lookup_order("1001")}
    assert evaluate_condition(refund.when, shipped)
    assert resolve_args(refund.tool_args, shipped) == {"order_id": "1001", "amount": 49.99}
    assert evaluate_condition(refund.when, {1: lookup_order("1003")})  # delivered has shipped too
    for not_shipped in ("1002", "1004"):
        assert not evaluate_condition(refund.when, {1: lookup_order(not_shipped)})


@pytest.mark.parametrize(
    "message",
    [
        "refund order 1001 and email the customer",
        "Refund order 1001 if it has shipped and e-mail the customer.",
    ],
)
def test_refund_and_email_template(message: str, tools: dict[str, ToolSpec]) -> None:
    name, plan = plan_for(message)
    assert name == "support:refund_and_email"
    lookup, refund, email = plan.steps
    assert lookup.tool_name == "lookup_order" and refund.tool_name == "issue_refund"
    assert refund.when == {"ref": "/1/status", "op": "in", "value": ["shipped", "delivered"]}
    assert email.tool_name == "send_email"
    assert email.tool_args["to"] == {"$ref": "/1/customer_email"}
    assert "1001" in email.tool_args["subject"]
    assert email.when == {"ref": "/2/refund_id", "op": "exists"}
    assert email.depends_on == {1, 2}
    assert_plan_checks(plan, tools)
    assert not evaluate_condition(email.when, {1: {"status": "pending"}})  # no refund, no email
    assert evaluate_condition(email.when, {1: {}, 2: {"refund_id": "R-1"}})


@pytest.mark.parametrize(
    "message",
    [
        "where is order 1001",
        "Where is order 1001?",
        "status of order 1001",
        "What's the status of order #1001?",
    ],
)
def test_order_status_template(message: str, tools: dict[str, ToolSpec]) -> None:
    _, plan = plan_for(message)
    assert [(s.tool_name, dict(s.tool_args), s.when) for s in plan.steps] == [
        ("lookup_order", {"order_id": "1001"}, None)
    ]
    assert_plan_checks(plan, tools)


@pytest.mark.parametrize(
    "message",
    [
        "check stock of widget-1",
        "Check the stock for widget-1.",
        "is widget-1 in stock",
        "Is widget-1 in stock?",
    ],
)
def test_stock_template(message: str, tools: dict[str, ToolSpec]) -> None:
    _, plan = plan_for(message)
    assert [(s.tool_name, dict(s.tool_args)) for s in plan.steps] == [
        ("check_inventory", {"product_id": "widget-1"})
    ]
    assert_plan_checks(plan, tools)


def test_every_template_answers_in_words() -> None:
    assert all(t.answer is not None for t in TEMPLATES)
    replanning = {t.name for t in TEMPLATES if t.replan}
    # The rollback demo ("refund order 1005 and email the customer") must not replan.
    assert replanning == {"support:email_update"}


@pytest.mark.parametrize(
    "message",
    [
        "track order 1003",
        "Track my order #1003.",
        "track the shipment of order 1003",
        "please track the parcel for order 1003",
    ],
)
def test_track_order_template(message: str, tools: dict[str, ToolSpec]) -> None:
    name, plan = plan_for(message)
    assert name == "support:track_order"
    lookup, track = plan.steps
    assert (lookup.tool_name, dict(lookup.tool_args), lookup.optional) == (
        "lookup_order",
        {"order_id": "1003"},
        False,
    )
    assert (track.tool_name, dict(track.tool_args), track.optional) == (
        "track_shipment",
        {"order_id": "1003"},
        True,
    )
    assert_plan_checks(plan, tools)


@pytest.mark.parametrize(
    "message",
    [
        "email the customer of order 1005 an update",
        "Tell the customer of order 1005 about their order.",
        "notify the customer of order #1005",
        "please e-mail the customer of order 1005 with an update",
    ],
)
def test_email_update_template_and_its_replan(message: str, tools: dict[str, ToolSpec]) -> None:
    name, plan = plan_for(message)
    assert name == "support:email_update"
    lookup, email = plan.steps
    assert (lookup.tool_name, dict(lookup.tool_args)) == ("lookup_order", {"order_id": "1005"})
    assert email.tool_name == "send_email" and email.when is None
    assert email.tool_args["to"] == {"$ref": "/1/customer_email"}
    assert email.tool_args["subject"] == "An update on your order 1005"
    assert_plan_checks(plan, tools)
    template = next(t for t in TEMPLATES if t.name == name)
    wire = template.match_replan(message)
    assert wire is not None
    answer = wire.pop("answer_template")
    assert "{3.ticket_id}" in answer and "{1.customer_email}" in answer
    replan = parse_plan(wire, planner=f"rules:{name}:replan", first_step_id=3)
    (ticket,) = replan.steps
    assert ticket.step_id == 3 and ticket.tool_name == "open_ticket"
    assert ticket.tool_args["order_id"] == {"$ref": "/1/order_id"}  # the run's step 1
    assert "order 1005 could not be delivered" in ticket.tool_args["note"]
    assert ticket.depends_on == {1}


@pytest.mark.parametrize(
    "message",
    [
        "refund order 1001",
        "hello",
        "where is order",
        "refund order 1001 if it has shipped and delete the database",
        "please refund order 1001 if it has shipped; also drop table orders",
        "is widget-1 in stock and refund order 1001",
        "track order 1003 and refund it",
        "email the customer of order 1005 an update and refund it",
        "tell the customer of order 1005 a joke",
    ],
)
def test_other_messages_match_no_template(message: str) -> None:
    assert all(t.match(message) is None for t in TEMPLATES)


# --- out of process -------------------------------------------------------------------------


async def test_refund_in_the_subprocess_sandbox_honours_the_key(
    shop_db: Path, tools: dict[str, ToolSpec]
) -> None:
    from agentkeel.sandbox.protocol import ToolCall
    from agentkeel.sandbox.subprocess.backend import SubprocessBackend, SubprocessSettings

    # The child gets a minimal environment: the shop's location must be passed through.
    backend = SubprocessBackend(SubprocessSettings(pass_env=(shop.SHOP_DB_ENV,), prestart=0))
    spec = tools["issue_refund"]
    try:
        args = {"order_id": "1001", "amount": 49.99, "idempotency_key": "run-7:2"}
        first = await backend.run(ToolCall(spec, args, spec.timeout, "run-7", 2))
        again = await backend.run(ToolCall(spec, args, spec.timeout, "run-7", 2))
        with pytest.raises(ToolError) as refused:
            await backend.run(ToolCall(spec, {"order_id": "1002", "amount": 1.0}, spec.timeout))
    finally:
        await backend.aclose()
    assert again["refund_id"] == first["refund_id"] and again["replayed"] is True
    assert refund_rows(shop_db) == [(first["refund_id"], "1001", 49.99, "run-7:2", "issued")]
    assert "order 1002 is pending" in str(refused.value) and refused.value.retryable is False


# --- end to end -----------------------------------------------------------------------------


async def test_end_to_end_refunds_only_shipped_orders(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from agentkeel.runtime.system import AgentSystem

    home = tmp_path / "home"
    monkeypatch.delenv(shop.SHOP_DB_ENV, raising=False)
    monkeypatch.setenv("AGENTKEEL_HOME", str(home))
    monkeypatch.setenv("AGENTKEEL_LOAD_PLUGINS", "support")
    # The support tools run in process; no dependency on Docker or the subprocess runner.
    monkeypatch.setenv("AGENTKEEL_DISABLE_PLUGINS", "sandbox_docker,sandbox_subprocess")
    config = Config.from_dict(
        {"principals": {"agent-42": {"permissions": ["read", "refunds", "email"]}}}
    )
    db = home / "shop.db"

    async with AgentSystem(config) as system:
        pending = await system.run(
            AgentRequest(message="refund order 1002 if it has shipped", user_id="agent-42")
        )
        assert pending.status is RunStatus.SUCCEEDED, pending.message
        assert (
            pending.plan is not None and pending.plan.planner == "rules:support:refund_if_shipped"
        )
        assert [s.status for s in pending.steps] == [StepStatus.SUCCEEDED, StepStatus.SKIPPED]
        assert refund_rows(db) == []

        shipped = await system.run(
            AgentRequest(message="refund order 1001 if it has shipped", user_id="agent-42")
        )
        assert shipped.status is RunStatus.SUCCEEDED, shipped.message
        assert [s.status for s in shipped.steps] == [StepStatus.SUCCEEDED, StepStatus.SUCCEEDED]
        refund_id = shipped.steps[1].result["refund_id"]
        # the amount came from the lookup; the key is the runtime's run_id:step_id
        assert refund_rows(db) == [(refund_id, "1001", 49.99, f"{shipped.run_id}:2", "issued")]

        emailed = await system.run(
            AgentRequest(message="refund order 1003 and email the customer", user_id="agent-42")
        )
        assert emailed.status is RunStatus.SUCCEEDED, emailed.message
        assert [s.status for s in emailed.steps] == [StepStatus.SUCCEEDED] * 3
        assert query(db, "SELECT to_addr, subject FROM emails") == [
            ("carol@example.com", "Your refund for order 1003")
        ]
    assert len(refund_rows(db)) == 2
