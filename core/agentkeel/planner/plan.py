"""Plans: the wire format planners produce, references, conditions and templates.

Wire format (what an LLM or a template emits)::

    {"reasoning": "...",
     "steps": [{"description": "...", "tool_name": "lookup_order",
                "tool_args": {"order_id": "1001"}},
               {"description": "...", "tool_name": "issue_refund",
                "tool_args": {"order_id": "1001", "amount": {"$ref": "/1/total"}},
                "when": {"ref": "/1/status", "op": "eq", "value": "shipped"},
                "expect": {"required": ["refund_id"]}}]}

Steps are numbered from 1 in order (a later revision of a run's plan, after a
replan or a round, from the step id it is given: ids are unique within a run).
``{"$ref": "/N/a/b"}`` is a JSON Pointer into the result of step N (which must
come earlier; in a later revision, any earlier step of the run that succeeded).
``"depends_on": [N, ...]`` makes a step wait for earlier steps whose results it
does not read. Steps that depend on no unfinished step may run at the same time
(``[executor] max_parallel``; see ``agentkeel.runtime.executor``).
A step may be ``"optional": true``: when its tool is unavailable the run goes on
without it and ends ``degraded``. At the top level, ``"observe": true`` marks a
round (the planner sees the results and plans again) and ``"final": true`` with
``"answer"`` ends the rounds with the planner's answer and no steps. ``when`` is a condition:
``{"ref", "op", "value"}`` with op in eq, ne, in, not_in, gt, ge, lt, le,
exists, truthy; or ``{"all": [...]}``, ``{"any": [...]}``, ``{"not": {...}}``.
Conditions are data evaluated here, never code. ``expect`` is a JSON Schema
the step's result must satisfy.
"""

from __future__ import annotations

import operator
import re
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import attrs
import jsonschema
import re2

from agentkeel.errors import PlanRejectedError
from agentkeel.types import AnswerTemplate, Plan, PlanStep

OPERATORS: dict[str, Callable[[Any, Any], bool]] = {
    "eq": operator.eq,
    "ne": operator.ne,
    "gt": operator.gt,
    "ge": operator.ge,
    "lt": operator.lt,
    "le": operator.le,
    "in": lambda a, b: a in b,
    "not_in": lambda a, b: a not in b,
}
UNARY_OPERATORS = ("exists", "truthy")

POINTER_PATTERN = r"^/[1-9][0-9]*(/.*)?$"

CONDITION_SCHEMA: dict[str, Any] = {
    "$defs": {
        "cond": {
            "oneOf": [
                {
                    "type": "object",
                    "required": ["ref", "op"],
                    "additionalProperties": False,
                    "properties": {
                        "ref": {"type": "string", "pattern": POINTER_PATTERN},
                        "op": {"enum": [*OPERATORS, *UNARY_OPERATORS]},
                        "value": {},
                    },
                },
                {
                    "type": "object",
                    "required": ["all"],
                    "additionalProperties": False,
                    "properties": {"all": {"type": "array", "items": {"$ref": "#/$defs/cond"}}},
                },
                {
                    "type": "object",
                    "required": ["any"],
                    "additionalProperties": False,
                    "properties": {"any": {"type": "array", "items": {"$ref": "#/$defs/cond"}}},
                },
                {
                    "type": "object",
                    "required": ["not"],
                    "additionalProperties": False,
                    "properties": {"not": {"$ref": "#/$defs/cond"}},
                },
            ]
        }
    },
    "$ref": "#/$defs/cond",
}


def plan_wire_schema(tool_names: Iterable[str] | None = None) -> dict[str, Any]:
    """JSON Schema of the wire format; with ``tool_names``, ``tool_name`` is an enum."""
    tool_name: dict[str, Any] = {"type": "string", "minLength": 1}
    names = sorted(tool_names) if tool_names is not None else None
    if names:
        tool_name = {"enum": names}
    return {
        "type": "object",
        "required": ["reasoning", "steps"],
        "additionalProperties": False,
        "properties": {
            "reasoning": {"type": "string"},
            "observe": {"type": "boolean"},
            "final": {"type": "boolean"},
            "answer": {"type": "string"},
            "steps": {
                "type": "array",
                "items": {
                    "type": "object",
                    "required": ["description", "tool_name", "tool_args"],
                    "additionalProperties": False,
                    "properties": {
                        "description": {"type": "string"},
                        "tool_name": tool_name,
                        "tool_args": {"type": "object"},
                        "when": CONDITION_SCHEMA["$defs"]["cond"],
                        "expect": {"type": "object"},
                        "optional": {"type": "boolean"},
                        "depends_on": {"type": "array", "items": {"type": "integer", "minimum": 1},
                                       "uniqueItems": True, "maxItems": 1000},
                    },
                },
            },
        },
        "$defs": CONDITION_SCHEMA["$defs"],
    }


_WIRE_VALIDATOR = jsonschema.Draft202012Validator(plan_wire_schema())
_CONDITION_VALIDATOR = jsonschema.Draft202012Validator(CONDITION_SCHEMA)


class RefError(LookupError):
    """A reference points at a value that does not exist."""


def _where(path: Iterable[Any]) -> str:
    parts = list(path)
    if len(parts) >= 2 and parts[0] == "steps":
        rest = "".join(f"[{p!r}]" if isinstance(p, str) else f"[{p}]" for p in parts[2:])
        return f"steps[{parts[1]}]{rest} (step {int(parts[1]) + 1})"
    return "".join(f".{p}" for p in parts).lstrip(".") or "plan"


def wire_errors(data: Any) -> list[str]:
    """Every way ``data`` breaks the wire format, each naming the field."""
    return [f"{_where(e.absolute_path)}: {e.message}" for e in _WIRE_VALIDATOR.iter_errors(data)]


def shape_errors(data: Mapping[str, Any]) -> list[str]:
    """What is wrong with how a (schema-valid) plan combines ``final``, ``answer`` and ``observe``."""
    final, observe, has_steps = bool(data.get("final")), bool(data.get("observe")), bool(data["steps"])
    errors = []
    if final and has_steps:
        errors.append('a plan with "final": true ends the run with its "answer" and must have no steps; '
                      'to run steps first, leave "final" out (and set "observe": true to see their results)')
    if final and observe:
        errors.append('"final" and "observe" exclude each other: a final plan ends the rounds')
    if final and not str(data.get("answer", "")).strip():
        errors.append('a plan with "final": true needs a non-empty "answer"')
    if "answer" in data and not final:
        errors.append('"answer" is only for a final plan: add "final": true (and no steps), or drop it')
    if observe and not has_steps:
        errors.append('a plan with "observe": true needs steps to observe; with nothing to run, answer '
                      'with "final": true instead')
    return errors


def parse_plan(
    data: Any, planner: str = "", *, first_step_id: int = 1, answer_template: AnswerTemplate | None = None
) -> Plan:
    """Validate wire-format ``data`` and build a ``Plan`` whose steps are numbered from
    ``first_step_id``. Raises ``PlanRejectedError`` listing every problem."""
    errors = wire_errors(data)
    if not errors:
        errors = shape_errors(data)
    if errors:
        raise PlanRejectedError(errors)
    if isinstance(first_step_id, bool) or not isinstance(first_step_id, int) or first_step_id < 1:
        raise ValueError(f"first_step_id must be an integer >= 1, got {first_step_id!r}")
    steps = []
    for index, raw in enumerate(data["steps"], start=first_step_id):
        args = raw["tool_args"]
        when = raw.get("when")
        arg_refs = frozenset(refs_in_args(args))
        depends = set(arg_refs)
        if when is not None:
            depends.update(refs_in_condition(when))
        after = frozenset(raw.get("depends_on", ()))
        depends.update(after)
        steps.append(
            PlanStep(
                step_id=index,
                tool_name=raw["tool_name"],
                tool_args=args,
                description=raw.get("description", ""),
                when=when,
                expect=raw.get("expect"),
                depends_on=frozenset(depends),
                arg_refs=arg_refs,
                optional=bool(raw.get("optional", False)),
                after=after,
            )
        )
    return Plan(steps=tuple(steps), reasoning=data["reasoning"], planner=planner,
                observe=bool(data.get("observe", False)),
                answer=data["answer"] if data.get("final") else None,
                answer_template=_answer_template(answer_template))


def plan_from_dict(data: Mapping[str, Any]) -> Plan:
    """Rebuild a ``Plan`` from ``Plan.to_dict()`` output (as journaled)."""
    raw_steps = data.get("steps", [])
    wire: dict[str, Any] = {
        "reasoning": data.get("reasoning", ""),
        "steps": [{k: v for k, v in step.items() if k != "step_id"} for step in raw_steps],
    }
    for key in ("observe", "final", "answer"):
        if key in data:
            wire[key] = data[key]
    first = int(raw_steps[0].get("step_id", 1)) if raw_steps else 1
    return parse_plan(wire, planner=data.get("planner", ""), first_step_id=first,
                      answer_template=data.get("answer_template"))


def _answer_template(value: Any) -> AnswerTemplate | None:
    """An answer template as a ``Plan`` holds it (text, or a tuple of choices), checked."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, (list, tuple)) and all(
        isinstance(c, Mapping) and isinstance(c.get("text"), str) and set(c) <= {"when", "text"} for c in value
    ):
        for choice in value:
            if "when" in choice:
                errors = [e.message for e in _CONDITION_VALIDATOR.iter_errors(choice["when"])]
                if errors:
                    raise PlanRejectedError([f"answer template condition {choice['when']!r}: {errors[0]}"])
        return tuple(dict(c) for c in value)
    raise PlanRejectedError([
        "an answer template is text, or a list of {\"when\": condition, \"text\": text} choices; "
        f"got {value!r}"])


def _pointer_step(pointer: str) -> int:
    return int(pointer.split("/", 2)[1])


def refs_in_args(value: Any) -> Iterable[int]:
    """Step ids referenced by ``{"$ref": ...}`` anywhere inside ``value``."""
    if isinstance(value, Mapping):
        ref = value.get("$ref")
        if isinstance(ref, str) and len(value) == 1:
            if not re.match(POINTER_PATTERN, ref):
                raise PlanRejectedError([f"bad reference {ref!r}: expected a pointer like '/1/field'"])
            yield _pointer_step(ref)
            return
        for item in value.values():
            yield from refs_in_args(item)
    elif isinstance(value, list):
        for item in value:
            yield from refs_in_args(item)


def refs_in_condition(cond: Mapping[str, Any]) -> Iterable[int]:
    if "ref" in cond:
        yield _pointer_step(cond["ref"])
    for key in ("all", "any"):
        for sub in cond.get(key, ()):
            yield from refs_in_condition(sub)
    if "not" in cond:
        yield from refs_in_condition(cond["not"])


def resolve_pointer(pointer: str, results: Mapping[int, Any]) -> Any:
    """Follow ``/N/a/b`` into ``results`` (step id -> result). Raises ``RefError``."""
    tokens = pointer.split("/")[1:]
    step_id = int(tokens[0])
    if step_id not in results:
        raise RefError(f"{pointer}: step {step_id} has no result")
    node = results[step_id]
    for raw in tokens[1:]:
        token = raw.replace("~1", "/").replace("~0", "~")
        if isinstance(node, Mapping) and token in node:
            node = node[token]
        elif isinstance(node, list) and token.isdigit() and int(token) < len(node):
            node = node[int(token)]
        else:
            raise RefError(f"{pointer}: no {token!r} in the result of step {step_id}")
    return node


def resolve_args(value: Any, results: Mapping[int, Any]) -> Any:
    """Replace every ``{"$ref": pointer}`` in ``value`` by the value it points at."""
    if isinstance(value, Mapping):
        ref = value.get("$ref")
        if isinstance(ref, str) and len(value) == 1:
            return resolve_pointer(ref, results)
        return {k: resolve_args(v, results) for k, v in value.items()}
    if isinstance(value, list):
        return [resolve_args(v, results) for v in value]
    return value


def evaluate_condition(cond: Mapping[str, Any], results: Mapping[int, Any]) -> bool:
    """Evaluate a declarative condition against earlier results. Raises ``RefError``
    when a referenced value is missing (except for the ``exists`` operator)."""
    if "all" in cond:
        return all(evaluate_condition(c, results) for c in cond["all"])
    if "any" in cond:
        return any(evaluate_condition(c, results) for c in cond["any"])
    if "not" in cond:
        return not evaluate_condition(cond["not"], results)
    op = cond["op"]
    if op == "exists":
        try:
            resolve_pointer(cond["ref"], results)
        except RefError:
            return False
        return True
    actual = resolve_pointer(cond["ref"], results)
    if op == "truthy":
        return bool(actual)
    try:
        return OPERATORS[op](actual, cond.get("value"))
    except TypeError as exc:
        raise RefError(f"{cond['ref']}: cannot apply {op!r} to {actual!r}: {exc}") from exc


_PLACEHOLDER = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")


def _as_steps(steps: Iterable[Mapping[str, Any]]) -> tuple[Mapping[str, Any], ...]:
    """A typed converter, so ``PlanTemplate(steps=[...])`` passes ``mypy --strict``."""
    return tuple(steps)


@attrs.frozen
class PlanTemplate:
    r"""A rule: a regular expression with named groups and the wire-format steps it yields.

    The pattern must match the whole message (stripped of surrounding space),
    case-insensitively. It is compiled by RE2, which matches in time linear in
    the message's length whatever the pattern (Python's ``re`` backtracks: two
    adjacent ``\s*`` before a failing tail took seconds on a long run of
    spaces), so its syntax is RE2's: ``(?P<name>...)`` and ``(?<name>...)``
    groups, classes, ``{m,n}`` repetition and ``(?i)``-style flags, but no
    backreferences, lookahead or lookbehind, and ``\z`` rather than ``\Z``;
    ``\d``, ``\s``, ``\w`` and ``\b`` are ASCII (``\pL``, ``\p{Greek}`` name
    Unicode classes). A pattern RE2 cannot compile is refused when the template
    is built, with a ``ValueError`` naming the template.

    String values in ``tool_args`` may contain ``{group}`` placeholders, filled
    from the match. A value that is exactly one placeholder is converted to the
    type the tool's schema asks for (integer or number) by the rule planner.

    ``answer`` is what the deterministic responder answers when the plan ran:
    text whose ``{N.field}`` placeholders render step N's result (``{N.field:.2f}``
    takes a format spec; ``{group}`` placeholders are filled from the match), or
    a list of ``{"when": condition, "text": ...}`` choices, the first whose
    condition (the plan's condition language) holds on the results.

    ``replan`` is a different approach, planned (once) when a step of this
    template's plan fails and recovery decides to replan: steps numbered after
    the template's own (a ``{"$ref"}`` to step 1 still means the template's first
    step), answered by ``replan_answer``.
    """

    pattern: str
    steps: tuple[Mapping[str, Any], ...] = attrs.field(converter=_as_steps)
    reasoning: str = ""
    name: str = ""
    answer: Any = None
    replan: tuple[Mapping[str, Any], ...] = attrs.field(default=(), converter=_as_steps)
    replan_answer: Any = None
    replan_reasoning: str = ""
    _regex: Any = attrs.field(init=False, repr=False, eq=False)

    def __attrs_post_init__(self) -> None:
        object.__setattr__(self, "_regex", _template_regex(self.pattern, self.name))
        for what, value in (("answer", self.answer), ("replan_answer", self.replan_answer)):
            try:
                _answer_template(value)
            except PlanRejectedError as exc:
                raise ValueError(f"plan template {self.name or self.pattern!r}: {what}: {exc}") from None

    def _groups(self, message: str) -> dict[str, str] | None:
        m = self._regex.fullmatch(message.strip())
        if m is None:
            return None
        return {k: v for k, v in m.groupdict().items() if v is not None}

    def match(self, message: str) -> dict[str, Any] | None:
        """The wire-format plan for ``message``, or None when the pattern does not match.

        The filled answer template, if any, is under ``"answer_template"`` (not wire format)."""
        groups = self._groups(message)
        if groups is None:
            return None
        wire: dict[str, Any] = {
            "reasoning": self.reasoning or f"matched template {self.name or self.pattern!r}",
            "steps": [_fill(step, groups) for step in self.steps],
        }
        if self.answer is not None:
            wire["answer_template"] = _fill(_listed(self.answer), groups)
        return wire

    def match_replan(self, message: str) -> dict[str, Any] | None:
        """The wire-format replan for ``message`` (None without ``replan`` steps or a match)."""
        groups = self._groups(message) if self.replan else None
        if groups is None:
            return None
        wire: dict[str, Any] = {
            "reasoning": self.replan_reasoning or f"the other approach of template {self.name or self.pattern!r}",
            "steps": [_fill(step, groups) for step in self.replan],
        }
        if self.replan_answer is not None:
            wire["answer_template"] = _fill(_listed(self.replan_answer), groups)
        return wire


def _listed(value: Any) -> Any:
    return [dict(c) for c in value] if isinstance(value, (list, tuple)) else value


def _template_regex(pattern: Any, name: str) -> Any:
    """``pattern`` compiled by RE2, case-insensitive; a ``ValueError`` naming the template if it cannot be."""
    what = f"plan template {name or pattern!r}"
    if not isinstance(pattern, str):
        raise ValueError(f"{what}: the pattern must be a string, got {type(pattern).__name__}")
    options = re2.Options()
    options.case_sensitive = False
    options.log_errors = False
    try:
        return re2.compile(pattern, options)
    except re2.error as exc:
        reason = exc.args[0] if exc.args else exc
        reason = reason.decode("utf-8", "replace") if isinstance(reason, bytes) else str(reason)
        raise ValueError(
            f"{what}: pattern {pattern!r} is refused: {reason}. Templates are matched by RE2, in time linear "
            f"in the length of the message: backreferences, lookahead and lookbehind, possessive quantifiers "
            f"and Python-only syntax such as (?x), (?#...) and \\Z (write \\z) are not available"
        ) from None


def _fill(value: Any, groups: Mapping[str, str]) -> Any:
    if isinstance(value, str):
        return _PLACEHOLDER.sub(lambda m: groups.get(m.group(1), m.group(0)), value)
    if isinstance(value, Mapping):
        return {k: _fill(v, groups) for k, v in value.items()}
    if isinstance(value, list):
        return [_fill(v, groups) for v in value]
    return value
