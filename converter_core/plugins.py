"""Loading plugins from the `vlm_converter` entry-point group and collecting what they register."""

from __future__ import annotations

import contextlib
import functools
import importlib.metadata
import traceback
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, TypeVar

import pluggy

from converter_core import ENTRY_POINT_GROUP, PROJECT_NAME, hookspecs
from converter_core.errors import ConverterError, PluginError, raise_if_environment
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
        return f"plugin {self.name!r} ({self.entry_point}, from {self.distribution}) {self.error}"


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

    def call_first(self, hook_name: str, **kwargs: Any) -> Any:
        """A `firstresult` hook, called implementation by implementation as pluggy would (last
        registered first), so that one that raises is named (see `blame`)."""
        for impl in reversed(getattr(self.hook, hook_name).get_hookimpls()):
            with blame(self.plugin_label(impl.plugin), hook_name):
                answer = impl.function(**{name: kwargs[name] for name in impl.argnames})
            if answer is not None:
                return answer
        return None


OWN_DISTRIBUTION = "vlm-converter"


@contextlib.contextmanager
def blame(label: str, what: str) -> Iterator[None]:
    """Run plugin code; an unexpected exception from a third-party plugin becomes a PluginError naming
    the plugin and what it was doing (exit 2: a broken install, not our bug). The converter's own
    errors (bad input, failed checks) and our own plugins' bugs pass through as they are."""
    try:
        yield
    except (ConverterError, MemoryError):
        raise
    except (Exception, SystemExit) as exc:  # Ctrl-C and SIGTERM (BaseExceptions) stop the run as they are
        if f"({OWN_DISTRIBUTION})" in label and not isinstance(exc, SystemExit):
            raise
        raise_if_environment(exc)
        detail = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else ""
        raise PluginError(f"plugin {label} failed in {what}: {type(exc).__name__}"
                          + (f": {detail}" if detail else "")) from exc


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

        def fail(error: str, detail: str = "", entry_point=entry_point, distribution=distribution) -> None:
            host.failures.append(
                PluginFailure(entry_point.name, distribution, entry_point.value, f"not loaded: {error}", detail)
            )

        if manager.has_plugin(entry_point.name):
            fail(f"the name is already taken by another plugin ({host.plugin_label(manager.get_plugin(entry_point.name))})")
            continue
        try:
            plugin = entry_point.load()
        except BaseException as exc:  # noqa: BLE001 - not even sys.exit() or Ctrl-C in an import may end the CLI
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


def _collect(host: PluginHost, hook_name: str, kind: str, strict: bool) -> dict[str, tuple[T, str]]:
    """Call every implementation of a `register` hook; map each registered name to (object, plugin).

    A name registered twice is a PluginError naming both plugins; with `strict` False (listings, so
    that the user can still see what is installed) the first registration stays and the clash is
    recorded among `host.failures`."""
    found: dict[str, tuple[T, str]] = {}
    for impl in getattr(host.hook, hook_name).get_hookimpls():
        label = host.plugin_label(impl.plugin)

        def register(item: T, _label: str = label) -> None:
            name = getattr(item, "name", None)
            if not isinstance(name, str) or not name:
                raise PluginError(f"plugin {_label} registered a {kind} without a name: {item!r}")
            if name in found:
                message = (f"two plugins register the {kind} {name!r}: {found[name][1]} and {_label}; "
                           "uninstall one of them")
                if strict:
                    raise PluginError(message)
                host.failures.append(PluginFailure(_label, _label, hook_name, f"clashes: {message}"))
                return
            found[name] = (item, _label)

        with blame(label, hook_name):
            impl.function(register=register)
    return found


def collect_backends(host: PluginHost, strict: bool = True) -> dict[str, tuple[Backend, str]]:
    return _collect(host, "converter_register_backends", "backend", strict)


def collect_passes(host: PluginHost, strict: bool = True) -> dict[str, tuple[GraphPass, str]]:
    return _collect(host, "converter_register_passes", "pass", strict)


def hook_descriptions() -> dict[str, str]:
    """Each hook's name and the first line of its documentation."""
    return {
        name: (getattr(hookspecs, name).__doc__ or "").strip().splitlines()[0]
        for name in dir(hookspecs)
        if name.startswith("converter_")
    }


def implementers(host: PluginHost, hook_name: str) -> list[str]:
    return [host.plugin_label(impl.plugin) for impl in getattr(host.hook, hook_name).get_hookimpls()]

