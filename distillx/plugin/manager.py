"""The plugin manager: built on first use, built-ins first, then ``distillx`` entry points.

Nothing here runs at import: :func:`get_plugin_manager` builds the manager the first time something
needs a registry (``distillx.method(...)``, the Distiller, ``distillx plugins``), so ``import
distillx`` never imports third-party code. Building it

1. registers the built-in plugins (:data:`distillx.plugin.builtins.BUILTIN_PLUGINS`) through the
   same hooks as anyone else;
2. loads each entry point of group ``distillx`` on its own and registers it under the entry-point
   name, unless ``DISTILLX_DISABLE_PLUGINS`` says otherwise;
3. calls ``check_pending()`` so a hook implementation with a misspelt name is an error; each plugin
   is already checked as it registers, so that error is reported against the one plugin at fault.

A plugin that fails to import, or raises while registering (anything but ``KeyboardInterrupt``: a
plugin that calls ``sys.exit`` or ``argparse`` at import included), is withdrawn (its registry
entries are undone), reported with :class:`PluginLoadWarning` naming it, and recorded in
``manager.failed``; the other plugins keep working.

``DISTILLX_DISABLE_PLUGINS``: unset, empty or ``0`` loads every entry point; ``1`` (or ``true``,
``all``) loads none; anything else is a comma-separated list of entry-point names to skip. Built-ins
always load.
"""
from __future__ import annotations

import importlib.metadata
import os
import threading
import warnings
from dataclasses import asdict, dataclass
from typing import Any

import pluggy

from .._version import __version__
from ..methods.base import check_method_class
from . import hookspecs
from .builtins import BUILTIN_PLUGINS
from .registry import Registries

ENTRY_POINT_GROUP = "distillx"
DISABLE_ENV = "DISTILLX_DISABLE_PLUGINS"
# Registration hook -> the registry it fills.
_REGISTRATION_HOOKS = {
    "distillx_register_methods": "methods",
    "distillx_register_weight_transfers": "transfers",
    "distillx_register_kernels": "kernels",
    "distillx_register_augmentations": "augmentations",
    "distillx_register_loggers": "loggers",
}
_TRUE = {"1", "true", "yes", "all"}
_FALSE = {"", "0", "false", "no"}


class PluginLoadWarning(RuntimeWarning):
    """A plugin could not be imported or registered and was skipped."""


@dataclass(frozen=True)
class PluginInfo:
    """Where a registered plugin comes from. ``source`` is "builtin", "entrypoint" or "runtime"."""

    name: str
    source: str
    distribution: str | None = None
    version: str | None = None
    target: str | None = None  # the entry point's "module:attr", or the module of a built-in

    def origin(self) -> str:
        """Where it comes from: ``built-in``, ``distillx-example-plugin 0.1.0`` or ``registered at run time``."""
        return provenance(self.source, self.distribution, self.version)

    def label(self) -> str:
        """Human-readable provenance, e.g. ``example (distillx-example-plugin 0.1.0)``."""
        return f"{self.name} ({self.origin()})"


def provenance(source: str | None, distribution: str | None, version: str | None) -> str:
    """The one formatting of where a plugin comes from (warnings, ``distillx plugins``, errors)."""
    if source == "builtin":
        return "built-in"
    if distribution:
        return f"{distribution} {version}"
    return "registered at run time"


@dataclass(frozen=True)
class FailedPlugin:
    """A plugin that was skipped. ``stage`` is "import" or "register"."""

    name: str
    stage: str
    error: str
    distribution: str | None = None
    version: str | None = None


class DistillxPluginManager(pluggy.PluginManager):
    """A ``pluggy.PluginManager`` for project ``distillx`` that owns the registries.

    :meth:`register` attributes whatever a plugin adds to the registries to that plugin's name and
    withdraws it all if the plugin's registration hooks raise; the exception then propagates (the
    loaders catch it and record the plugin in :attr:`failed`).
    """

    def __init__(self, registries: Registries):
        super().__init__(hookspecs.PROJECT)
        self.add_hookspecs(hookspecs)
        self.registries = registries
        self.plugin_info: dict[str, PluginInfo] = {}
        self.failed: list[FailedPlugin] = []
        self.disabled: list[str] = []  # entry-point names skipped because of DISTILLX_DISABLE_PLUGINS
        # Historic calls with no plugin yet: pluggy replays them to each plugin as it registers.
        for hook_name, kind in _REGISTRATION_HOOKS.items():
            getattr(self.hook, hook_name).call_historic(kwargs={"registry": getattr(registries, kind)})

    def register(self, plugin: Any, name: str | None = None) -> str | None:
        name = name or self.get_canonical_name(plugin)
        if self.is_blocked(name) or self.has_plugin(name) or self.is_registered(plugin):
            return super().register(plugin, name)  # pluggy's own refusal (ValueError) or None if blocked
        with self.registries.providing(name):
            try:
                super().register(plugin, name)  # runs the historic registration hooks
                self._check_pending_for(plugin)
            except BaseException:
                if self.get_plugin(name) is plugin:
                    self.unregister(name=name)
                raise
        self.plugin_info.setdefault(name, PluginInfo(name, "runtime"))
        return name

    def unregister(self, plugin: Any = None, name: str | None = None) -> Any:
        """Unregister like pluggy. Registry entries the plugin added stay (use ``reset_plugins()``)."""
        name = name or self.get_name(plugin)
        removed = super().unregister(plugin, name)
        if removed is not None:
            self.plugin_info.pop(name, None)
        return removed

    def _check_pending_for(self, plugin: Any) -> None:
        # pluggy's check_pending() validates every plugin at once, so one misspelt hook name would
        # break the whole manager; checking each plugin as it registers blames only that plugin.
        for caller in self.get_hookcallers(plugin) or ():
            if not caller.has_spec() and any(
                    i.plugin is plugin and not i.optionalhook for i in caller.get_hookimpls()):
                raise pluggy.PluginValidationError(
                    plugin, f"unknown hook {caller.name!r}: not one of distillx's hooks (misspelt?); "
                            "mark it @hookimpl(optionalhook=True) if it is meant for another plugin")

    # -- loading ---------------------------------------------------------------------------
    def load_builtins(self) -> None:
        for plugin in BUILTIN_PLUGINS:
            info = PluginInfo(plugin.name, "builtin", "distillx", __version__, plugin.module)
            self._load(info, lambda p=plugin: p)

    def load_entry_points(self, disable: str | None = None) -> None:
        """Register every ``distillx`` entry point except those ``disable`` (the env value) names."""
        disable_all, disabled_names = _parse_disable(disable)
        for ep in _entry_points(ENTRY_POINT_GROUP):
            dist = getattr(ep, "dist", None)  # Python >= 3.10
            info = PluginInfo(ep.name, "entrypoint", dist.metadata["Name"] if dist else None,
                              dist.version if dist else None, ep.value)
            if disable_all or ep.name in disabled_names:
                self.disabled.append(ep.name)
                continue
            known = self.plugin_info.get(ep.name)
            if known is not None and known.source == "entrypoint" and known.target == ep.value \
                    and known.distribution == info.distribution:
                continue  # the same distribution seen twice on sys.path
            self._load(info, ep.load)

    def _load(self, info: PluginInfo, load) -> None:
        stage = "import"
        try:
            plugin = load()
            stage = "register"
            if self.has_plugin(info.name):
                other = self.plugin_info.get(info.name, PluginInfo(info.name, "runtime"))
                raise ValueError(f"plugin name {info.name!r} is already taken by {other.label()}")
            self.plugin_info[info.name] = info
            if self.register(plugin, info.name) is None:  # blocked with set_blocked()
                self.plugin_info.pop(info.name, None)
        except KeyboardInterrupt:
            raise
        except BaseException as exc:  # a broken plugin (SystemExit included) must not take the others down
            if self.plugin_info.get(info.name) is info and not self.has_plugin(info.name):
                del self.plugin_info[info.name]
            failure = FailedPlugin(info.name, stage, f"{type(exc).__name__}: {exc}", info.distribution, info.version)
            self.failed.append(failure)
            third_party = info.distribution and info.source != "builtin"
            where = f" from {info.origin()}" if third_party else ""
            action = "failed to import" if stage == "import" else "failed to register"
            warnings.warn(f"distillx plugin {info.name!r}{where} {action} and was skipped: {failure.error}",
                          PluginLoadWarning, stacklevel=3)

    # -- reporting -------------------------------------------------------------------------
    def describe(self) -> dict[str, Any]:
        """Everything ``distillx plugins`` shows, as JSON-serialisable data."""
        report: dict[str, Any] = {
            "plugins": [asdict(self.plugin_info.get(name, PluginInfo(name, "runtime")))
                        for name, plugin in self.list_name_plugin() if plugin is not None],  # None: blocked
        }
        for kind, registry in self.registries:
            report[kind] = [self._describe_entry(e) for e in registry.entries()]
        report["failed"] = [asdict(f) for f in self.failed]
        report["disabled"] = list(self.disabled)
        return report

    def _describe_entry(self, entry) -> dict[str, Any]:
        info = self.plugin_info.get(entry.provider)
        return {
            "name": entry.name,
            "provider": entry.provider,
            "source": info.source if info else None,
            "distribution": info.distribution if info else None,
            "version": info.version if info else None,
            "overrides": entry.overrides,
            "object": _qualname(entry.obj),
        }


def _qualname(obj: Any) -> str:
    module = getattr(obj, "__module__", None)
    name = getattr(obj, "__qualname__", None) or type(obj).__qualname__
    return f"{module}.{name}" if module else name


def _parse_disable(value: str | None) -> tuple[bool, set[str]]:
    """``DISTILLX_DISABLE_PLUGINS`` value -> (disable every entry point, names to disable)."""
    value = (value or "").strip()
    if value.lower() in _FALSE:
        return False, set()
    if value.lower() in _TRUE:
        return True, set()
    return False, {part.strip() for part in value.split(",") if part.strip()}


def _entry_points(group: str) -> list:
    eps = importlib.metadata.entry_points()
    if hasattr(eps, "select"):  # Python >= 3.10
        return list(eps.select(group=group))
    return list(eps.get(group, ()))  # Python 3.9: a dict of group -> entry points


# -- the process-wide manager ------------------------------------------------------------------
_manager: DistillxPluginManager | None = None
# Re-entrant: a plugin's registration hook may itself call distillx.method()/get_registries().
_lock = threading.RLock()


def get_plugin_manager() -> DistillxPluginManager:
    """The process-wide plugin manager, built (and plugins loaded) on the first call."""
    global _manager
    with _lock:
        if _manager is None:
            pm = DistillxPluginManager(Registries(method_check=check_method_class))
            # Published before loading so a re-entrant call from a plugin sees it instead of recursing.
            _manager = pm
            try:
                pm.load_builtins()
                pm.load_entry_points(os.environ.get(DISABLE_ENV))
                pm.check_pending()
            except BaseException:
                _manager = None
                raise
        return _manager


def get_registries() -> Registries:
    """The registries (``methods``, ``transfers``, ``kernels``, ``augmentations``, ``loggers``), built on first use."""
    return get_plugin_manager().registries


def reset_plugins() -> None:
    """Forget the plugin manager; the next use rebuilds it (re-reading entry points and the env)."""
    global _manager
    with _lock:
        _manager = None
