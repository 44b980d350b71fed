"""What every component that calls a language model shares.

- ``agentkeel.models.completion``: the OpenAI client (endpoint, retries), and
  the priced chat completion: one deadline, the budget reserved before the call
  and settled after it by exact rules, optionally streamed. The LLM planner and
  the LLM responder both call through it.
- ``agentkeel.models.data``: step results rendered for a prompt as quoted,
  size-capped, untrusted DATA, never as instructions.
"""
