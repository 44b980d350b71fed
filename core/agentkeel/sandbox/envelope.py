"""The result envelope: how a tool's value or failure crosses a process boundary as JSON.

One module for every out-of-process sandbox. The subprocess child
(``agentkeel.sandbox.subprocess.child``) and the in-container runner
(``sandbox_images/python/runner.py``, which finds a copy of this file next to
it in the image) encode a call's outcome with ``call_tool``; both host-side
backends decode it with ``decode``. Standard library only, and loadable by file
path: the generic sandbox image has no agentkeel installed.

An envelope is one JSON object::

    {"ok": true, "value": <the tool's JSON result>}
    {"ok": false, "error": {"kind": K, "type": T, "message": M, "retryable": R, "traceback": TB}}

- ``kind``: what failed, one of ``KINDS``. ``"exception"``: the tool raised.
  The others are failures around the tool: ``"import"`` (it cannot be loaded),
  ``"bad_request"``, ``"bad_output"`` (its result is not JSON),
  ``"result_too_large"``, ``"oom"``, and those a supervisor reports:
  ``"timeout"``, ``"output_limit"``, ``"killed"``, ``"internal"``.
- ``type``: the exception's type as ``module.Qualname`` (builtins unqualified:
  ``"ValueError"``); ``""`` when no exception of the tool is involved.
- ``message``: ``str(exception)``, or what went wrong; at most ``MESSAGE_LIMIT``
  characters.
- ``retryable``: whether the same call could succeed if tried again. For
  ``"exception"`` it is the exception's own boolean ``retryable`` attribute
  (``ToolError(..., retryable=False)``, or any class that sets one), True when
  it has none; for the other kinds it is fixed (``RETRYABLE_KINDS``).
- ``traceback``: the formatted traceback from the tool's own frame (this
  module's frames are left out), its last ``TRACEBACK_LIMIT`` characters; ``""``
  when there is none.

A supervisor may add keys of its own next to ``ok`` (the docker runner adds
``v``, ``stdout``, ``stderr``...); ``decode`` ignores them.

What a host reads back is untrusted: the hosts decode it with
``agentkeel.jsonvalue.loads`` (bounded depth and size, no NaN) and hand
``decode`` the parsed object. ``decode`` of raw text is bounded too (no NaN,
no ``RecursionError``), for callers that cannot import agentkeel.
"""

from __future__ import annotations

import importlib
import json
import math
import traceback as _traceback
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple, TextIO

EXCEPTION = "exception"
IMPORT = "import"
BAD_REQUEST = "bad_request"
BAD_OUTPUT = "bad_output"
RESULT_TOO_LARGE = "result_too_large"
OUT_OF_MEMORY = "oom"
TIMEOUT = "timeout"
OUTPUT_LIMIT = "output_limit"
KILLED = "killed"
INTERNAL = "internal"
KINDS = frozenset(
    {EXCEPTION, IMPORT, BAD_REQUEST, BAD_OUTPUT, RESULT_TOO_LARGE, OUT_OF_MEMORY, TIMEOUT, OUTPUT_LIMIT, KILLED,
     INTERNAL}
)
# Kinds after which trying the same call again may succeed ("exception" asks the exception).
RETRYABLE_KINDS = frozenset({EXCEPTION, TIMEOUT, KILLED})

MESSAGE_LIMIT = 4000
TRACEBACK_LIMIT = 8000
DEFAULT_MAX_BYTES = 1 << 20


class EnvelopeError(Exception):
    """A failure around the tool rather than in it; ``kind`` names it."""

    kind = BAD_REQUEST


class BadRequestError(EnvelopeError):
    """The request is malformed or names something that is not a tool."""

    kind = BAD_REQUEST


class ToolNotFoundError(EnvelopeError):
    """The tool's module cannot be imported or has no such function."""

    kind = IMPORT


class BadResultError(EnvelopeError):
    """The tool's result is not JSON."""

    kind = BAD_OUTPUT


class ResultTooLargeError(BadResultError):
    """The tool's result is larger than the limit."""

    kind = RESULT_TOO_LARGE


class MalformedEnvelopeError(ValueError):
    """What the host read is not an envelope."""


def type_name(obj_type: type) -> str:
    """``module.Qualname`` of a type; builtins by their bare name."""
    if obj_type.__module__ == "builtins":
        return obj_type.__qualname__
    return f"{obj_type.__module__}.{obj_type.__qualname__}"


# --- encoding (in the child) ------------------------------------------------------


def failure(kind: str, message: str, *, exc_type: str = "", retryable: bool | None = None,
            traceback: str = "") -> dict[str, Any]:
    """The failure envelope of ``kind`` (``retryable`` defaults to the kind's)."""
    if kind not in KINDS:
        raise ValueError(f"unknown failure kind {kind!r}")
    return {
        "ok": False,
        "error": {
            "kind": kind,
            "type": exc_type,
            "message": message[:MESSAGE_LIMIT],
            "retryable": kind in RETRYABLE_KINDS if retryable is None else retryable,
            "traceback": traceback[-TRACEBACK_LIMIT:],
        },
    }


def exception_failure(exc: BaseException) -> dict[str, Any]:
    """The failure envelope describing ``exc``, raised by a tool (or while loading it)."""
    if isinstance(exc, MemoryError):
        return failure(OUT_OF_MEMORY, "out of memory (MemoryError)", exc_type="MemoryError")
    if isinstance(exc, EnvelopeError):
        return failure(exc.kind, _describe(exc))
    retryable = getattr(exc, "retryable", True)
    return failure(
        EXCEPTION,
        _describe(exc),
        exc_type=type_name(type(exc)),
        retryable=retryable if isinstance(retryable, bool) else True,
        traceback=format_traceback(exc),
    )


def format_traceback(exc: BaseException) -> str:
    """The traceback of ``exc`` from the first frame that is not this module's ("" without one)."""
    tb = exc.__traceback__
    while tb is not None and tb.tb_frame.f_globals is globals():
        tb = tb.tb_next
    if tb is None:
        return ""
    try:
        return "".join(_traceback.format_exception(type(exc), exc, tb))
    except Exception:  # noqa: BLE001 - a broken __str__ must not lose the error
        return ""


def _describe(exc: BaseException) -> str:
    if isinstance(exc, SystemExit):
        return f"the tool called sys.exit({exc.code!r})"
    try:
        return str(exc)
    except Exception:  # noqa: BLE001 - a broken __str__ must not lose the error
        return f"<unprintable {type(exc).__name__}>"


def dumps(envelope: Mapping[str, Any]) -> bytes:
    """An envelope (or a supervisor's reply built on one) as compact JSON bytes."""
    return json.dumps(envelope, separators=(",", ":"), allow_nan=False).encode()


# Prebuilt: after a MemoryError there may be no memory left to build it.
OUT_OF_MEMORY_ENVELOPE = dumps(failure(OUT_OF_MEMORY, "out of memory (MemoryError)", exc_type="MemoryError"))


def _not_json(obj: Any) -> Any:
    raise BadResultError(
        f"the tool returned a {type_name(type(obj))}, which is not JSON; tools that run in a sandbox "
        f"must return JSON values (dict, list, str, number, bool, None)"
    )


def encode_value(value: Any, max_bytes: int = DEFAULT_MAX_BYTES) -> bytes:
    """The success envelope of ``value``; ``BadResultError`` when JSON cannot carry it."""
    try:
        data = json.dumps({"ok": True, "value": value}, default=_not_json, allow_nan=False,
                          separators=(",", ":")).encode()
    except RecursionError:
        raise BadResultError("the tool's result is nested too deeply to be JSON") from None
    except ValueError as exc:  # NaN or infinity, circular references
        where = non_finite_path(value)
        if where is not None:
            raise BadResultError(f"the tool's result is not valid JSON: {where}") from None
        raise BadResultError(f"the tool's result is not valid JSON: {exc}") from None
    if len(data) > max_bytes:
        raise ResultTooLargeError(
            f"the tool's result is {len(data)} bytes of JSON, more than the limit of {max_bytes} bytes; "
            f"return a reference (a path, an id) instead of the data"
        )
    return data


def non_finite_path(value: Any, root: str = "value") -> str | None:
    """``"value.a.0: NaN is not a JSON number"`` for the first NaN or infinity in ``value``, else None.

    Iterative (any depth); containers met twice are skipped (a cycle is not a number problem).
    """
    stack: list[tuple[Any, str]] = [(value, root)]
    seen: set[int] = set()
    while stack:
        node, path = stack.pop()
        if isinstance(node, float):
            if not math.isfinite(node):
                name = "NaN" if math.isnan(node) else ("Infinity" if node > 0 else "-Infinity")
                return f"{path}: {name} is not a JSON number"
        elif isinstance(node, (Mapping, list, tuple)):
            if id(node) in seen:
                continue
            seen.add(id(node))
            items = node.items() if isinstance(node, Mapping) else enumerate(node)
            stack.extend((item, f"{path}.{key}") for key, item in reversed(list(items)))
    return None


def encode_exception(exc: BaseException) -> bytes:
    """The failure envelope of ``exc`` as bytes (the prebuilt one when memory runs out)."""
    try:
        return dumps(exception_failure(exc))
    except MemoryError:
        return OUT_OF_MEMORY_ENVELOPE


def resolve(target: str, *, not_found_hint: str = "") -> Callable[..., Any]:
    """The function named ``module:qualname``; ``ToolNotFoundError``/``BadRequestError`` otherwise.

    ``not_found_hint`` is appended to the message when the module cannot be imported.
    """
    module_name, sep, qualname = target.partition(":")
    if not sep or not module_name or not qualname:
        raise BadRequestError(f"tool reference {target!r} is not of the form 'module:qualname'")
    if "<locals>" in qualname or "<lambda>" in qualname:
        raise BadRequestError(
            f"tool {target!r} is defined inside a function; tools that run out of process must be "
            f"module-level functions"
        )
    try:
        obj: Any = importlib.import_module(module_name)
    except ImportError as exc:
        raise ToolNotFoundError(f"cannot import module {module_name!r}: {exc}{not_found_hint}") from None
    except Exception as exc:  # noqa: BLE001 - a module that fails to import is a load failure
        raise ToolNotFoundError(f"cannot load {target}: {type_name(type(exc))}: {_describe(exc)}") from None
    for part in qualname.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise ToolNotFoundError(f"module {module_name!r} has no attribute {qualname!r}") from None
    if not callable(obj):
        raise BadRequestError(f"{target!r} is not callable")
    return obj  # type: ignore[no-any-return]


def invoke(fn: Callable[..., Any], args: Mapping[str, Any]) -> Any:
    """``fn(**args)``; coroutine functions and returned awaitables run under ``asyncio.run``."""
    import inspect  # here, not at the top: a supervisor that only decodes does not need it

    if inspect.iscoroutinefunction(inspect.unwrap(fn)):
        import asyncio  # only async tools pay for importing asyncio

        return asyncio.run(fn(**args))
    result = fn(**args)
    if inspect.isawaitable(result):
        import asyncio

        async def wait() -> Any:
            return await result

        return asyncio.run(wait())
    return result


def call_tool(target: str, args: Mapping[str, Any], *, max_bytes: int = DEFAULT_MAX_BYTES,
              not_found_hint: str = "", stderr: TextIO | None = None) -> bytes:
    """Load ``target``, call it with ``args`` and return its envelope. Never raises.

    When ``stderr`` is given, the traceback of a failure is also written there.
    """
    try:
        if not isinstance(args, Mapping):
            raise BadRequestError("the tool's arguments must be a JSON object")
        return encode_value(invoke(resolve(target, not_found_hint=not_found_hint), args), max_bytes)
    except MemoryError:
        # Prebuilt: the failed frames still hold their memory until this block exits.
        return OUT_OF_MEMORY_ENVELOPE
    except BaseException as exc:  # noqa: BLE001 - whatever the tool raised becomes its result
        data = encode_exception(exc)
        if stderr is not None and not isinstance(exc, EnvelopeError):
            try:
                stderr.write(format_traceback(exc))
                stderr.flush()
            except Exception:  # noqa: BLE001 - a broken stream must not lose the result
                pass
        return data


# --- decoding (on the host) -------------------------------------------------------


class Success(NamedTuple):
    """A decoded success envelope."""

    value: Any


class Failure(NamedTuple):
    """A decoded failure envelope (see the module docs for the fields)."""

    kind: str
    type: str
    message: str
    retryable: bool
    traceback: str

    def describe(self, label: str, *, traceback_limit: int = 0) -> str:
        """One message for the host's error: ``"<label> raised <type>: <message>"`` for exceptions,
        ``"<label>: <message>"`` otherwise, plus the traceback's last ``traceback_limit`` characters."""
        if self.kind == EXCEPTION and self.type:
            text = f"{label} raised {self.type}: {self.message}"
        else:
            text = f"{label}: {self.message}"
        if traceback_limit > 0 and self.traceback.strip():
            text += "\n" + self.traceback[-traceback_limit:].rstrip()
        return text


def _reject_constant(name: str) -> Any:
    raise MalformedEnvelopeError(f"{name} is not a JSON number")


def decode(data: bytes | str | Mapping[str, Any]) -> Success | Failure:
    """The outcome in an envelope (JSON text, or an already parsed object).

    Raises ``MalformedEnvelopeError`` when ``data`` is not an envelope. Text is
    parsed without NaN or infinity and a nesting too deep to parse is refused;
    hosts parse with ``agentkeel.jsonvalue.loads`` first and pass the object.
    """
    if isinstance(data, (bytes, str)):
        try:
            obj = json.loads(data, parse_constant=_reject_constant)
        except MalformedEnvelopeError:
            raise
        except RecursionError:
            raise MalformedEnvelopeError("nested too deeply to parse") from None
        except ValueError as exc:
            raise MalformedEnvelopeError(f"not JSON: {exc}") from None
    else:
        obj = data
    if not isinstance(obj, Mapping) or not isinstance(obj.get("ok"), bool):
        raise MalformedEnvelopeError("not an object with a boolean 'ok'")
    if obj["ok"]:
        return Success(obj.get("value"))
    error = obj.get("error")
    if not isinstance(error, Mapping) or not isinstance(error.get("kind"), str):
        raise MalformedEnvelopeError("a failure without an 'error' object naming its 'kind'")
    kind = error["kind"] if error["kind"] in KINDS else INTERNAL
    retryable = error.get("retryable")
    return Failure(
        kind=kind,
        type=str(error.get("type") or ""),
        message=str(error.get("message") or ""),
        retryable=retryable if isinstance(retryable, bool) else kind in RETRYABLE_KINDS,
        traceback=str(error.get("traceback") or ""),
    )
