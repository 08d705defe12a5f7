"""The value specs the run-config schema is written in (:mod:`distillx.config.schema`): each
resolves a value at a dotted key path, filling defaults and collecting every problem as a message
that names the path, what was expected and what came."""

from __future__ import annotations

import copy
import difflib
import math
import re
from typing import Any, Callable, Optional

__all__ = ["ConfigError", "Spec", "Int", "Float", "Bool", "Str", "Warmup", "AnyTable", "ListOf", "MapOf", "Key",
           "Table", "OneOf", "describe"]


class ConfigError(ValueError):
    """A config (or a ``--set`` override, or what a config names) is invalid; ``problems`` lists each."""

    def __init__(self, problems, source: Optional[str] = None):
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        self.source = source
        if len(self.problems) == 1:
            text = self.problems[0]
            message = f"{source}: {text}" if source else text
        else:
            head = f"{source}: {len(self.problems)} problems" if source else f"{len(self.problems)} problems"
            message = head + "\n" + "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(message)


_TYPE_NAMES = {bool: "boolean", int: "integer", float: "float", str: "string", list: "array", dict: "table",
               type(None): "null"}


def describe(value: Any) -> str:
    """``value`` as shown in error messages: its repr (shortened) and its TOML/JSON type."""
    text = repr(value)
    if len(text) > 60:
        text = text[:57] + "..."
    return f"{text} ({_TYPE_NAMES.get(type(value), type(value).__name__)})"


def _join(path: str, key) -> str:
    return f"{path}.{key}" if path else str(key)


def _where(path: str) -> str:
    return f"[{path}]" if path else "the top level"


# -- value specs -------------------------------------------------------------------------------------
class Spec:
    """One kind of value. ``resolve`` returns the checked (normalised) value or appends to ``errors``."""

    expected = "a value"

    def resolve(self, value: Any, path: str, errors: list) -> Any:  # pragma: no cover - interface
        raise NotImplementedError

    def fail(self, value: Any, path: str, errors: list, expected: Optional[str] = None) -> None:
        errors.append(f"{path}: expected {expected or self.expected}, got {describe(value)}")

    def child(self, key: str, path: str) -> "Optional[Spec]":
        """The spec of ``key`` below this value (for ``--set`` paths); raise ConfigError if there is none."""
        raise ConfigError(f"{path} is {self.expected}: it has no key {key!r}")


class Int(Spec):
    def __init__(self, minimum: Optional[int] = None):
        self.minimum = minimum
        self.expected = "an integer" + (f" >= {minimum}" if minimum is not None else "")

    def resolve(self, value, path, errors):
        if isinstance(value, bool) or not isinstance(value, int) or (self.minimum is not None and value < self.minimum):
            self.fail(value, path, errors)
            return None
        return value


class Float(Spec):
    """A finite number (an integer is accepted and turned into a float) within the bounds."""

    def __init__(self, minimum: Optional[float] = None, exclusive_min: bool = False,
                 maximum: Optional[float] = None, exclusive_max: bool = False):
        self.minimum, self.exclusive_min = minimum, exclusive_min
        self.maximum, self.exclusive_max = maximum, exclusive_max
        bounds = []
        if minimum is not None:
            bounds.append(f"{'>' if exclusive_min else '>='} {minimum}")
        if maximum is not None:
            bounds.append(f"{'<' if exclusive_max else '<='} {maximum}")
        self.expected = "a finite number" + (" " + " and ".join(bounds) if bounds else "")

    def check(self, value) -> bool:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            return False
        if self.minimum is not None and (value <= self.minimum if self.exclusive_min else value < self.minimum):
            return False
        if self.maximum is not None and (value >= self.maximum if self.exclusive_max else value > self.maximum):
            return False
        return True

    def resolve(self, value, path, errors):
        if not self.check(value):
            self.fail(value, path, errors)
            return None
        return float(value)


class Bool(Spec):
    expected = "a boolean (true or false)"

    def resolve(self, value, path, errors):
        if not isinstance(value, bool):
            self.fail(value, path, errors)
            return None
        return value


class Str(Spec):
    def __init__(self, choices: Optional[tuple] = None, pattern: Optional[str] = None, what: Optional[str] = None,
                 check: Optional[Callable[[str], Optional[str]]] = None):
        self.choices = choices
        self.pattern = re.compile(pattern) if pattern else None
        self.check = check
        if what:
            self.expected = what
        elif choices:
            self.expected = "one of " + ", ".join(repr(c) for c in choices)
        else:
            self.expected = "a non-empty string"

    def resolve(self, value, path, errors):
        if not isinstance(value, str) or not value or (self.choices and value not in self.choices) or (
                self.pattern and not self.pattern.fullmatch(value)):
            self.fail(value, path, errors)
            return None
        if self.check is not None:
            problem = self.check(value)
            if problem:
                errors.append(f"{path}: {problem}")
                return None
        return value


class Warmup(Spec):
    expected = "an integer >= 0 (steps) or a float in [0, 1) (a fraction of all steps)"

    def resolve(self, value, path, errors):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            self.fail(value, path, errors)
            return None
        if isinstance(value, int):
            ok = value >= 0
        else:
            ok = math.isfinite(value) and 0 <= value < 1
        if not ok:
            self.fail(value, path, errors)
            return None
        return value


class AnyTable(Spec):
    """A table of free-form options (passed on as keyword arguments; checked by the receiver)."""

    expected = "a table"

    def resolve(self, value, path, errors):
        if not isinstance(value, dict):
            self.fail(value, path, errors)
            return None
        return copy.deepcopy(value)

    def child(self, key, path):
        return None  # anything goes below a free-form table


class ListOf(Spec):
    def __init__(self, item: Spec, expected: str):
        self.item, self.expected = item, expected

    def resolve(self, value, path, errors):
        if not isinstance(value, list):
            self.fail(value, path, errors)
            return None
        return [self.item.resolve(v, _join(path, i), errors) for i, v in enumerate(value)]

    def child(self, key, path):
        return self.item


class MapOf(Spec):
    """A table whose keys are free (names) and whose values all follow one spec."""

    def __init__(self, value: Spec, expected: str):
        self.value, self.expected = value, expected

    def resolve(self, value, path, errors):
        if not isinstance(value, dict):
            self.fail(value, path, errors)
            return None
        return {k: self.value.resolve(v, _join(path, k), errors) for k, v in value.items()}

    def child(self, key, path):
        return self.value


class Key:
    """One key of a :class:`Table`: its spec, whether it is required, its default, its meaning."""

    def __init__(self, spec: Spec, required: bool = False, default: Any = None, nullable: bool = False,
                 doc: str = ""):
        self.spec, self.required, self.default, self.nullable, self.doc = spec, required, default, nullable, doc

    def default_for(self, table: dict) -> Any:
        return self.default(table) if callable(self.default) else copy.deepcopy(self.default)


class Table(Spec):
    """A table with fixed keys; unknown keys are errors listing the valid ones. ``open=True``: other
    keys are kept as they are (a plugin's options); ``post(resolved, given, path, errors)`` checks
    the keys together and may drop keys that do not apply."""

    def __init__(self, keys: dict, expected: str = "a table", open: bool = False,
                 post: Optional[Callable] = None):
        self.keys, self.expected, self.open, self.post = keys, expected, open, post

    def resolve(self, value, path, errors):
        if not isinstance(value, dict):
            self.fail(value, path, errors)
            return None
        out: dict = {}
        if not self.open:  # first, so a misspelt key is reported next to the "missing" it causes
            errors.extend(self.unknown(name, path) for name in value if name not in self.keys)
        for name, key in self.keys.items():
            if name in value and not (value[name] is None and key.nullable):
                out[name] = key.spec.resolve(value[name], _join(path, name), errors)
            elif name in value or not key.required:
                out[name] = None if name in value else key.default_for(value)
            else:
                errors.append(f"missing required key {_join(path, name)!r}"
                              + (f" ({key.doc})" if key.doc else ""))
        if self.open:
            out.update({name: copy.deepcopy(v) for name, v in value.items() if name not in self.keys})
        if self.post is not None:
            self.post(out, value, path, errors)
        return out

    def unknown(self, name: str, path: str) -> str:
        valid = list(self.keys)
        close = difflib.get_close_matches(str(name), valid, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        return f"unknown key {_join(path, name)!r} in {_where(path)}{hint}; valid keys there: {', '.join(valid)}"

    def child(self, key, path):
        if key in self.keys:
            return self.keys[key].spec
        if self.open:
            return None
        raise ConfigError(self.unknown(key, path))


class OneOf(Spec):
    """A string (short for ``{name = ...}``) or a named table."""

    def __init__(self, table: Table, expected: str):
        self.table, self.expected = table, expected

    def resolve(self, value, path, errors):
        if isinstance(value, str) and value:
            value = {"name": value}
        if not isinstance(value, dict):
            self.fail(value, path, errors)
            return None
        return self.table.resolve(value, path, errors)

    def child(self, key, path):
        return self.table.child(key, path)
