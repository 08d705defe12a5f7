"""Declared options, the one mechanism behind methods (:class:`distillx.methods.Method`) and
augmentations (:class:`distillx.augment.Augmentation`).

A subclass declares ``options = {name: default}``; they are merged with those of its base classes,
checked to be public identifiers that shadow nothing, and set as attributes by :meth:`_set_options`
(defaults deep-copied, an unknown option a ``TypeError`` listing the valid ones). Value checks go
through :mod:`distillx._checks`, so every message reads ``<kind> '<name>': option <o> must be ...``.
"""
from __future__ import annotations

import copy
from typing import Any, ClassVar, Iterable, Mapping

from . import _checks


class Options:
    """Mixin: declared options with defaults, validation and :meth:`config`.

    ``kind`` ("method", "augmentation") and :attr:`label` name the object in messages. A root class
    (Method, Augmentation) sets ``_root`` to itself after its definition: an option must not shadow
    any of its attributes (or ``_reserved`` instance attributes) other than its own options.
    """

    kind: ClassVar[str] = "object"
    name: ClassVar[str] = ""
    options: ClassVar[dict[str, Any]] = {}
    _defaults: ClassVar[dict[str, Any]] = {}
    _reserved: ClassVar[frozenset] = frozenset()
    _root: ClassVar[type] = None  # type: ignore[assignment]

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        merged: dict[str, Any] = {}
        for klass in reversed(cls.__mro__):
            merged.update(klass.__dict__.get("options", {}))
        root = cls._root
        reserved = (cls._reserved | set(dir(root))) - set(root._defaults) if root is not None else set()
        for option in merged:
            if not isinstance(option, str) or not option.isidentifier() or option.startswith("_"):
                raise TypeError(f"{cls.__name__}.options: option names must be public identifiers, got {option!r}")
            if option in reserved:
                raise TypeError(f"{cls.__name__}.options: option {option!r} would shadow {root.__name__}.{option}")
        cls._defaults = merged

    def _set_options(self, options: Mapping[str, Any]) -> None:
        unknown = [k for k in options if k not in self._defaults]
        if unknown:
            valid = ", ".join(sorted(self._defaults)) or "none"
            raise TypeError(f"{self.kind} {self.label!r} got an unknown option {unknown[0]!r}; valid options: {valid}")
        # Defaults are copied so a mutable default (a list of layers, say) is never shared by instances.
        for option, value in {**copy.deepcopy(self._defaults), **options}.items():
            setattr(self, option, value)

    @property
    def label(self) -> str:
        """The name used in messages: ``name``, or the class name when ``name`` is empty."""
        return self.name or type(self).__name__

    @classmethod
    def default_options(cls) -> dict[str, Any]:
        """Every option with its default."""
        return dict(cls._defaults)

    def config(self) -> dict[str, Any]:
        """The current option values; ``type(self)(**x.config())`` rebuilds an equivalent object."""
        return {option: getattr(self, option) for option in self._defaults}

    # -- option checks (each names this object and the option) ------------------------------
    def _what(self, option: str) -> str:
        return f"{self.kind} {self.label!r}: option {option}"

    def check_number(self, option: str, *, gt: float | None = None, ge: float | None = None,
                     lt: float | None = None, le: float | None = None, optional: bool = False) -> None:
        """Raise unless option ``option`` is a finite real number within the given bounds (or None
        when ``optional``)."""
        _checks.number(self._what(option), getattr(self, option), gt=gt, ge=ge, lt=lt, le=le, optional=optional)

    def check_int(self, option: str, *, ge: int | None = None, optional: bool = False) -> None:
        """Raise unless option ``option`` is an int (not a bool) ``>= ge``; ``None`` too when ``optional``."""
        setattr(self, option, _checks.integer(self._what(option), getattr(self, option), ge=ge, optional=optional))

    def check_bool(self, option: str) -> None:
        """Raise unless option ``option`` is True or False (a string such as "no" is not)."""
        _checks.boolean(self._what(option), getattr(self, option))

    def check_choice(self, option: str, choices: Iterable[Any]) -> None:
        """Raise unless option ``option`` is one of ``choices``."""
        value, choices = getattr(self, option), tuple(choices)
        if value not in choices:
            raise ValueError(f"{self._what(option)} must be one of {choices}, got {value!r}")
