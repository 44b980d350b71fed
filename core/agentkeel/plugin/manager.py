"""Plugin loading: the default components, entry points, and what failed.

Default components are plugins listed in ``DEFAULT_PLUGINS`` and registered
like third-party ones, under their full dotted module names (so a third-party
entry point called ``permissions`` or ``journal`` is its own plugin, never
confused with a default). An entry is ``"module"`` (the module is the plugin)
or ``"module:Class"`` (a plugin that keeps state: one instance per system).
pip-installed plugins come from the ``agentkeel`` entry-point group; an entry
point names a module or an object, never a class. Environment controls:

- ``AGENTKEEL_LOAD_PLUGINS=a,b``: load only these entry-point plugins.
- ``AGENTKEEL_DISABLE_PLUGINS=a,b``: block these plugins, default ones
  included, by entry-point name or dotted name (the short names of earlier
  releases, such as ``memory_sqlite``, still work).

``build_plugin_manager`` raises ``PluginError`` naming the plugin that failed;
with ``tolerant=True`` it leaves such a plugin out and reports it in
``LoadedPlugins.broken`` instead (``agentkeel plugins`` and ``agentkeel tools``
use that so one broken package cannot hide the rest).
"""

from __future__ import annotations

import importlib
import importlib.metadata
import inspect
import os
from collections.abc import Iterable

import attrs
import pluggy

import agentkeel.hookspecs as hookspecs
from agentkeel.errors import PluginError
from agentkeel.markers import PROJECT_NAME

DEFAULT_PLUGINS: tuple[str, ...] = (
    "agentkeel.permissions.default:PermissionsGate",
    "agentkeel.permissions.keys_default",
    "agentkeel.cost.pricing",
    "agentkeel.cost.default",
    "agentkeel.memory.sqlite:SQLiteMemory",
    "agentkeel.journal.default",
    "agentkeel.planner.rules",
    "agentkeel.planner.llm:LLMPlanner",
    "agentkeel.sandbox.inprocess",
    "agentkeel.sandbox.subprocess.backend",
    "agentkeel.sandbox.docker.plugin",
    "agentkeel.tools.router",
    "agentkeel.evaluator.default",
    "agentkeel.evaluator.judge:LLMJudge",
    "agentkeel.recovery.default",
    "agentkeel.responder.llm:LLMResponder",
    "agentkeel.responder.default",
)

# Names the default plugins had before they were registered by dotted name.
LEGACY_NAMES: dict[str, str] = {
    "permissions": "agentkeel.permissions.default",
    "pricing": "agentkeel.cost.pricing",
    "memory_sqlite": "agentkeel.memory.sqlite",
    "journal": "agentkeel.journal.default",
    "planner_rules": "agentkeel.planner.rules",
    "planner_llm": "agentkeel.planner.llm",
    "sandbox_inprocess": "agentkeel.sandbox.inprocess",
    "sandbox_subprocess": "agentkeel.sandbox.subprocess.backend",
    "sandbox_docker": "agentkeel.sandbox.docker.plugin",
    "evaluator": "agentkeel.evaluator.default",
    "recovery": "agentkeel.recovery.default",
}

DEFAULT_NAMES = frozenset(entry.partition(":")[0] for entry in DEFAULT_PLUGINS)


@attrs.frozen
class BrokenPlugin:
    """A plugin left out because it failed to load or register: its name and why."""

    name: str
    error: str


@attrs.define
class LoadedPlugins:
    """A plugin manager and the plugins that could not be loaded (tolerant mode only)."""

    pm: pluggy.PluginManager
    broken: list[BrokenPlugin] = attrs.field(factory=list)
    distributions: dict[str, tuple[str, str]] = attrs.field(factory=dict)
    """plugin name -> (distribution name, version) for entry-point plugins."""


def env_list(name: str) -> set[str] | None:
    value = os.environ.get(name)
    if value is None:
        return None
    return {item.strip() for item in value.split(",") if item.strip()}


def disable_hint(name: str) -> str:
    return f"to run without it, set AGENTKEEL_DISABLE_PLUGINS={name}"


def build_plugin_manager(
    *, load_entrypoints: bool = True, plugins: Iterable[object] = (), tolerant: bool = False
) -> LoadedPlugins:
    """A fresh plugin manager: hookspecs, default plugins, entry points, then ``plugins``."""
    pm = pluggy.PluginManager(PROJECT_NAME)
    pm.add_hookspecs(hookspecs)
    loaded = LoadedPlugins(pm)
    blocked = {LEGACY_NAMES.get(name, name) for name in env_list("AGENTKEEL_DISABLE_PLUGINS") or ()}
    blocked |= env_list("AGENTKEEL_DISABLE_PLUGINS") or set()
    for name in blocked:
        pm.set_blocked(name)
    for entry in DEFAULT_PLUGINS:
        module_name, _, class_name = entry.partition(":")
        if module_name in blocked:
            continue
        module = importlib.import_module(module_name)
        plugin = getattr(module, class_name)() if class_name else module
        _register(loaded, plugin, module_name, tolerant)
    if load_entrypoints:
        _load_entrypoints(loaded, tolerant)
    for plugin in plugins:
        _register(loaded, plugin, None, tolerant)
    _check_pending(loaded, tolerant)
    return loaded


def plugin_label(pm: pluggy.PluginManager, plugin: object) -> str:
    """The name a plugin is known by: its registered name, else its module or class name."""
    name = pm.get_name(plugin)
    if name and not name.isdigit():
        return name
    return getattr(plugin, "__name__", None) or type(plugin).__name__


def _fail(loaded: LoadedPlugins, name: str, message: str, tolerant: bool, cause: BaseException | None) -> None:
    error = PluginError(name, message)
    if not tolerant:
        raise error from cause
    loaded.broken.append(BrokenPlugin(name, str(error)))


def _register(loaded: LoadedPlugins, plugin: object, name: str | None, tolerant: bool) -> None:
    label = name or getattr(plugin, "__name__", None) or type(plugin).__name__
    if inspect.isclass(plugin):
        _fail(loaded, label, f"{plugin!r} is a class; register an instance of it (or a module)", tolerant, None)
        return
    try:
        loaded.pm.register(plugin, name=name)
    except (pluggy.PluginValidationError, ValueError) as exc:
        _fail(loaded, label, f"{exc}; {disable_hint(label)}", tolerant, exc)


def _entry_points() -> list[tuple[importlib.metadata.EntryPoint, importlib.metadata.Distribution]]:
    found = []
    seen: set[str] = set()
    for dist in importlib.metadata.distributions():
        for ep in dist.entry_points:
            if ep.group == PROJECT_NAME and ep.name not in seen:
                seen.add(ep.name)
                found.append((ep, dist))
    return found


def _load_entrypoints(loaded: LoadedPlugins, tolerant: bool) -> None:
    """Load each entry point on its own, so a failure names the entry point that failed."""
    pm = loaded.pm
    allowed = env_list("AGENTKEEL_LOAD_PLUGINS")
    for ep, dist in _entry_points():
        if pm.is_blocked(ep.name) or (allowed is not None and ep.name not in allowed):
            continue
        if pm.has_plugin(ep.name):
            _fail(loaded, ep.name, f"entry point {ep.value} has the name of a plugin already loaded; "
                  "rename the entry point", tolerant, None)
            continue
        try:
            plugin = ep.load()
        except Exception as exc:  # noqa: BLE001 - any import failure is the plugin's, and reported as such
            _fail(loaded, ep.name, f"failed to load {ep.value} (distribution {dist.metadata['Name']}): "
                  f"{type(exc).__name__}: {exc}; {disable_hint(ep.name)}", tolerant, exc)
            continue
        if inspect.isclass(plugin):
            _fail(loaded, ep.name, f"entry point {ep.value} names a class; pluggy needs a module or an "
                  f"object: point the entry point at the module that holds the @hookimpl functions, or "
                  f"at an instance (e.g. `{ep.name} = \"pkg.mod:plugin\"` with `plugin = {plugin.__name__}()`)",
                  tolerant, None)
            continue
        before = len(loaded.broken)
        _register(loaded, plugin, ep.name, tolerant)
        if len(loaded.broken) == before:
            loaded.distributions[ep.name] = (dist.metadata["Name"], dist.version)


def _check_pending(loaded: LoadedPlugins, tolerant: bool) -> None:
    pm = loaded.pm
    while True:
        try:
            pm.check_pending()
            return
        except pluggy.PluginValidationError as exc:
            name = plugin_label(pm, exc.plugin)
            _fail(loaded, name, f"{exc}; {disable_hint(name)}", tolerant, exc)
            pm.unregister(exc.plugin)


def own_version() -> str:
    try:
        return importlib.metadata.version(PROJECT_NAME)
    except importlib.metadata.PackageNotFoundError:
        return "unknown"
