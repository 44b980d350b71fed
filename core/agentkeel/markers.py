"""The pluggy markers. One name everywhere: the project, the hooks and the entry-point group."""

import pluggy

PROJECT_NAME = "agentkeel"

hookspec = pluggy.HookspecMarker(PROJECT_NAME)
hookimpl = pluggy.HookimplMarker(PROJECT_NAME)
