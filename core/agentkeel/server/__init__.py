"""``agentkeel serve``: the HTTP service (the ``agentkeel[server]`` extra).

``app.create_app`` builds the ASGI application (FastAPI) on one ``AgentSystem``;
``manager.RunManager`` runs requests in the background with a bounded number in
flight, keeps each run's events for streaming and reconnects, cancels and drains;
``service`` holds what the routes share and turns an ``Authorization: Bearer``
API key into a caller;
``problems`` writes every error as an ``application/problem+json`` document;
``metrics`` keeps the Prometheus metrics; ``dashboard`` serves the cost dashboard;
``serve`` runs it all under uvicorn with a graceful SIGTERM.

Only ``serve`` and ``app`` import the web framework, and nothing outside this
package imports it, so the CLI and the library work without the extra.
"""
