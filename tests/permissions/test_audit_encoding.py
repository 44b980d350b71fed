"""The audit log's direct record encoder must produce exactly canonical() bytes,
or verify() would reject records the writer considered good."""

from __future__ import annotations

import json

from agentkeel.permissions.audit import FORMAT, canonical, record_text
from hypothesis import given
from hypothesis import strategies as st

text = st.text(max_size=30)


@given(
    ts=st.floats(min_value=0, max_value=4e9, allow_nan=False),
    fields=st.tuples(text, text, text, text, text, text),
    arg_keys=st.lists(text, max_size=4).map(tuple),
    seq=st.integers(min_value=1, max_value=10**9),
    prev=text,
)
def test_record_text_is_canonical(
    ts: float, fields: tuple[str, ...], arg_keys: tuple[str, ...], seq: int, prev: str
) -> None:
    run_id, principal, action, tool, decision, reason = fields
    fast = record_text(ts=ts, run_id=run_id, principal=principal, action=action, tool=tool,
                       decision=decision, reason=reason, arg_keys=arg_keys, seq=seq, prev=prev)
    body = {"ts": ts, "run_id": run_id, "principal": principal, "action": action, "tool": tool,
            "decision": decision, "reason": reason, "arg_keys": list(arg_keys), "seq": seq, "prev": prev,
            "v": FORMAT}
    assert fast == canonical(body)
    assert json.loads(fast) == body
