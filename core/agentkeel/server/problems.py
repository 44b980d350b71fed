"""Errors as RFC 9457 problem documents (``application/problem+json``).

Every error the service answers, bad input included, is one of these: ``title``
is the status's phrase, ``detail`` says what is wrong, and ``errors`` (for
invalid input) names each field, as a JSON pointer into the request, with its
problem. Bad input is never a 500.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from http import HTTPStatus
from typing import Any

PROBLEM_TYPE = "application/problem+json"


class Problem(Exception):  # raised by a route to answer with a problem document
    """An error answer: raise it from a route."""

    def __init__(
        self,
        status: int,
        detail: str,
        *,
        errors: Sequence[Mapping[str, str]] = (),
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail
        self.errors = list(errors)
        self.headers = dict(headers or {})

    def body(self, instance: str = "") -> dict[str, Any]:
        out: dict[str, Any] = {"type": "about:blank", "title": HTTPStatus(self.status).phrase,
                               "status": self.status, "detail": self.detail}
        if instance:
            out["instance"] = instance
        if self.errors:
            out["errors"] = self.errors
        return out


def pointer(location: Sequence[Any]) -> str:
    """A validation error's location as a JSON pointer (``("body", "budget_usd")`` -> ``/budget_usd``);
    query and header parameters keep their place (``query.limit``)."""
    parts = [str(p) for p in location]
    if parts and parts[0] == "body":
        return "/" + "/".join(p.replace("~", "~0").replace("/", "~1") for p in parts[1:])
    return ".".join(parts)
