"""The responder: the user-facing answer of a run, written after its steps.

Defaults, both plugins: ``agentkeel.responder.llm`` (one chat completion on the
cheapest tier, budgeted, with the step results passed as quoted data) and
``agentkeel.responder.default`` (``trylast``: deterministic answers from the
plan's answer template or the step results, and for failed, denied, in-doubt
and budget-exhausted runs what happened, what was undone and what to do next).
"""
