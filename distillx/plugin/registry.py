"""Name -> object registries that remember which plugin provided each entry.

One :class:`Registry` exists per kind of extension (methods, weight transfers, kernels,
augmentations, loggers). Plugins fill them from their ``distillx_register_*`` hooks. A registry never
silently replaces an entry: adding a taken name is an error naming both providers, unless the
newcomer passes ``override=True``.

The provider is not an argument of :meth:`Registry.add` (a plugin could lie or forget); the plugin
manager sets it with :meth:`Registry.providing` around each plugin's registration, which also undoes
everything that plugin added if its registration fails, so a broken plugin leaves no half-registered
entries behind.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Callable, Iterator

#: Provider recorded for entries added outside any plugin registration (e.g. from a user script).
DIRECT = "<direct call>"


class DuplicateNameError(ValueError):
    """A name is already registered by another (or the same) provider and ``override`` was not set."""


class UnknownNameError(KeyError, ValueError):
    """A name is not registered. A ``KeyError`` for lookups, a ``ValueError`` for config validation."""

    def __str__(self) -> str:
        # KeyError's default __str__ shows repr(message), quotes and escaped newlines included.
        return str(self.args[0]) if self.args else ""


@dataclass(frozen=True)
class Entry:
    """One registered object. ``overrides`` is the provider it replaced with ``override=True``, if any."""

    name: str
    obj: Any
    provider: str
    overrides: str | None = None


def check_name(name: Any, what: str = "name") -> str:
    """Return ``name`` if it is a non-empty string without surrounding whitespace, else raise."""
    if not isinstance(name, str):
        raise TypeError(f"{what} must be a str, got {type(name).__name__} {name!r}")
    if not name or name != name.strip():
        raise ValueError(f"{what} must be a non-empty string without leading/trailing whitespace, got {name!r}")
    return name


class Registry:
    """Registered objects of one ``kind`` (e.g. ``"method"``), each with the plugin that provided it.

    ``check(name, obj)`` optionally validates objects on :meth:`add` (raise ``TypeError``/``ValueError``).
    Iteration yields names in sorted order.
    """

    def __init__(self, kind: str, check: Callable[[str, Any], None] | None = None):
        self.kind = check_name(kind, "kind")
        self._check = check
        self._entries: dict[str, Entry] = {}
        self._provider = DIRECT
        # While a provider is active: (name, entry it replaced or None) for every add, to undo on failure.
        self._journal: list[tuple[str, Entry | None]] | None = None

    # -- registration ------------------------------------------------------------------------
    def add(self, name: str, obj: Any, *, override: bool = False) -> Any:
        """Register ``obj`` under ``name`` and return ``obj`` (so it can be used as a decorator helper).

        Raises :class:`DuplicateNameError` naming both providers when ``name`` is taken and
        ``override`` is false; with ``override=True`` the previous entry is replaced.
        """
        check_name(name, f"{self.kind} name")
        if obj is None:
            raise TypeError(f"{self.kind} {name!r}: the registered object must not be None")
        if self._check is not None:
            self._check(name, obj)
        previous = self._entries.get(name)
        if previous is not None and not override:
            raise DuplicateNameError(
                f"{self.kind} {name!r} is already provided by plugin {previous.provider!r}; "
                f"plugin {self._provider!r} cannot register it again. Use another name, or pass "
                f"override=True to replace it deliberately."
            )
        self._entries[name] = Entry(name, obj, self._provider, previous.provider if previous else None)
        if self._journal is not None:
            self._journal.append((name, previous))
        return obj

    @contextlib.contextmanager
    def providing(self, provider: str) -> Iterator[None]:
        """Attribute every :meth:`add` inside the block to ``provider``; undo them if the block raises."""
        check_name(provider, "provider")
        saved = (self._provider, self._journal)
        self._provider, self._journal = provider, []
        journal = self._journal
        try:
            yield
        except BaseException:
            for name, previous in reversed(journal):
                if previous is None:
                    del self._entries[name]
                else:
                    self._entries[name] = previous
            raise
        finally:
            self._provider, self._journal = saved
        # A nested registration that succeeded must still be undone if the outer one fails.
        if saved[1] is not None:
            saved[1].extend(journal)

    # -- lookup -------------------------------------------------------------------------------
    def get(self, name: str) -> Any:
        """Return the object registered as ``name``; :class:`UnknownNameError` lists the known names."""
        return self.entry(name).obj

    def entry(self, name: str) -> Entry:
        """Return the full :class:`Entry` (object, provider, what it overrode) for ``name``."""
        try:
            return self._entries[name]
        except (KeyError, TypeError):  # TypeError: unhashable name
            known = ", ".join(repr(n) for n in self.names()) or "none"
            raise UnknownNameError(f"unknown {self.kind} {name!r}; registered {self.kind}s: {known}") from None

    def provider(self, name: str) -> str:
        """Name of the plugin that provided ``name``."""
        return self.entry(name).provider

    def names(self) -> list[str]:
        """Registered names, sorted."""
        return sorted(self._entries)

    def entries(self) -> list[Entry]:
        """Registered entries, sorted by name."""
        return [self._entries[n] for n in self.names()]

    def __contains__(self, name: object) -> bool:
        try:
            return name in self._entries
        except TypeError:
            return False

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}, names={self.names()!r})"


class Registries:
    """The registries plugins fill: ``methods``, ``transfers``, ``kernels``, ``augmentations``, ``loggers``."""

    KINDS = ("methods", "transfers", "kernels", "augmentations", "loggers")

    def __init__(self, method_check: Callable[[str, Any], None] | None = None):
        self.methods = Registry("method", method_check)
        self.transfers = Registry("weight transfer", _check_callable)
        self.kernels = Registry("kernel", _check_callable)
        self.augmentations = Registry("augmentation", _check_callable)
        self.loggers = Registry("logger", _check_callable)

    def __iter__(self) -> Iterator[tuple[str, Registry]]:
        return iter((kind, getattr(self, kind)) for kind in self.KINDS)

    @contextlib.contextmanager
    def providing(self, provider: str) -> Iterator[None]:
        """:meth:`Registry.providing` on every registry at once (all undone together on failure)."""
        with contextlib.ExitStack() as stack:
            for _, registry in self:
                stack.enter_context(registry.providing(provider))
            yield


def _check_callable(name: str, obj: Any) -> None:
    if not callable(obj):
        raise TypeError(f"{name!r} must be callable (a function or class), got {type(obj).__name__}")
