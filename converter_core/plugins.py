"""Loading plugins from the `vlm_converter` entry-point group and collecting what they register."""

from __future__ import annotations

import functools
import importlib.metadata
import traceback
from dataclasses import dataclass, field
from typing import Any, TypeVar

import pluggy

from converter_core import ENTRY_POINT_GROUP, PROJECT_NAME, hookspecs
from converter_core.errors import PluginError
from converter_core.extension import Backend, GraphPass


@dataclass
class PluginInfo:
    name: str
    distribution: str
    version: str
    entry_point: str
    hooks: list[str]


@dataclass
class PluginFailure:
    """A plugin that could not be used, and why; the others keep working."""

    name: str
    distribution: str
    entry_point: str
    error: str
    detail: str = ""

    def message(self) -> str:
        return f"plugin {self.name!r} ({self.entry_point}, from {self.distribution}) not loaded: {self.error}"


@dataclass
class PluginHost:
    """The plugin manager and what loading found out about each plugin."""

    manager: pluggy.PluginManager
    plugins: list[PluginInfo] = field(default_factory=list)
    failures: list[PluginFailure] = field(default_factory=list)

    @property
    def hook(self) -> Any:
        return self.manager.hook

    def plugin_label(self, plugin: object) -> str:
        name = self.manager.get_name(plugin)
        info = next((p for p in self.plugins if p.name == name), None)
        return f"{name} ({info.distribution})" if info else str(name)


def _distribution_of(entry_point: importlib.metadata.EntryPoint) -> tuple[str, str]:
    dist = entry_point.dist
    if dist is None:
        return "unknown distribution", "?"
    return dist.metadata["Name"], dist.version


def load_plugins(group: str = ENTRY_POINT_GROUP) -> PluginHost:
    """Add the hook specs, then load every entry point of `group`, isolating broken ones."""
    manager = pluggy.PluginManager(PROJECT_NAME)
    manager.add_hookspecs(hookspecs)
    host = PluginHost(manager)
    entry_points = sorted(importlib.metadata.entry_points(group=group), key=lambda ep: ep.name)
    for entry_point in entry_points:
        distribution, version = _distribution_of(entry_point)

        def fail(error: str, detail: str = "") -> None:
            host.failures.append(
                PluginFailure(entry_point.name, distribution, entry_point.value, error, detail)
            )

        if manager.has_plugin(entry_point.name):
            fail(f"the name is already taken by another plugin ({host.plugin_label(manager.get_plugin(entry_point.name))})")
            continue
        try:
            plugin = entry_point.load()
        except Exception as exc:  # a plugin's import error must not take the CLI down
            fail(f"import failed: {type(exc).__name__}: {exc}", traceback.format_exc())
            continue
        try:
            manager.register(plugin, name=entry_point.name)
        except pluggy.PluginValidationError as exc:
            fail(f"invalid hook implementation: {exc}")
            continue
        unknown = sorted(
            caller.name for caller in manager.get_hookcallers(plugin) or [] if caller.spec is None
        )
        if unknown:
            manager.unregister(plugin)
            fail(f"implements hooks that do not exist: {', '.join(unknown)}")
            continue
        hooks = sorted(caller.name for caller in manager.get_hookcallers(plugin) or [])
        host.plugins.append(PluginInfo(entry_point.name, distribution, version, entry_point.value, hooks))
    manager.check_pending()
    return host


@functools.cache
def get_plugin_manager() -> PluginHost:
    """The process-wide plugin host, loaded once."""
    return load_plugins()


T = TypeVar("T")


def _collect(host: PluginHost, hook_name: str, kind: str) -> dict[str, tuple[T, str]]:
    """Call every implementation of a `register` hook; map each registered name to (object, plugin)."""
    found: dict[str, tuple[T, str]] = {}
    for impl in getattr(host.hook, hook_name).get_hookimpls():
        label = host.plugin_label(impl.plugin)

        def register(item: T, _label: str = label) -> None:
            name = getattr(item, "name", None)
            if not isinstance(name, str) or not name:
                raise PluginError(f"plugin {_label} registered a {kind} without a name: {item!r}")
            if name in found:
                raise PluginError(
                    f"two plugins register the {kind} {name!r}: {found[name][1]} and {_label}; "
                    "uninstall one of them"
                )
            found[name] = (item, _label)

        impl.function(register=register)
    return found


def collect_backends(host: PluginHost) -> dict[str, tuple[Backend, str]]:
    return _collect(host, "converter_register_backends", "backend")


def collect_passes(host: PluginHost) -> dict[str, tuple[GraphPass, str]]:
    return _collect(host, "converter_register_passes", "pass")


def hook_descriptions() -> dict[str, str]:
    """Each hook's name and the first line of its documentation."""
    return {
        name: (getattr(hookspecs, name).__doc__ or "").strip().splitlines()[0]
        for name in dir(hookspecs)
        if name.startswith("converter_")
    }


def implementers(host: PluginHost, hook_name: str) -> list[str]:
    return [host.plugin_label(impl.plugin) for impl in getattr(host.hook, hook_name).get_hookimpls()]

