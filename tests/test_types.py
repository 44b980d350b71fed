"""The types that cross component boundaries: what an ``AgentRequest`` refuses."""

from __future__ import annotations

import math
from typing import Any

import pytest
from agentkeel import AgentRequest


def test_a_valid_request_takes_defaults() -> None:
    request = AgentRequest(message="refund order 1", user_id="agent")
    assert (request.session_id, request.budget_usd) == ("default", None)
    assert len(request.run_id) == 16 and request.run_id != AgentRequest(message="m", user_id="u").run_id
    assert AgentRequest(message="m", user_id="u", budget_usd=0).budget_usd == 0


@pytest.mark.parametrize(
    ("fields", "error"),
    [
        ({"message": ""}, "message must not be empty"),
        ({"message": " \n\t"}, "message must not be empty"),
        ({"user_id": ""}, "user id must not be empty"),
        ({"session_id": ""}, "session id must not be empty"),
        ({"run_id": ""}, "run id must not be empty"),
        ({"message": "caf\udce9"}, "message is not valid UTF-8 text"),
        ({"user_id": "\udcff"}, "user id is not valid UTF-8 text"),
        ({"message": b"bytes"}, "message must be a string, got bytes"),
        ({"budget_usd": -0.01}, "budget must be a finite amount of USD >= 0"),
        ({"budget_usd": math.nan}, "budget must be a finite amount"),
        ({"budget_usd": math.inf}, "budget must be a finite amount"),
        ({"budget_usd": True}, "budget must be a number of USD"),
        ({"budget_usd": "1.0"}, "budget must be a number of USD"),
        ({"budget_usd": -1}, "budget must be a finite amount of USD >= 0"),
        ({"session_id": None}, "session id must be a string, got NoneType"),
        ({"session_id": "s\ud800"}, "session id is not valid UTF-8 text"),
        ({"user_id": ["u"]}, "user id must be a string, got list"),
        ({"run_id": "r\udc80"}, "run id is not valid UTF-8 text"),
    ],
)
def test_invalid_requests_are_refused_naming_the_field(fields: dict[str, Any], error: str) -> None:
    with pytest.raises(ValueError, match=error):
        AgentRequest(**{"message": "m", "user_id": "u", **fields})
