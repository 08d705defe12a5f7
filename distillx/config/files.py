"""Reading a run config: a ``.toml``/``.json`` file or a bundled config by name, parsed, with
``--set KEY=VALUE`` overrides applied, validated against :mod:`distillx.config.schema`."""
from __future__ import annotations

import json
import os
from importlib import resources
from typing import Any

from .schema import ConfigError, check_path, describe, validate

FORMATS = {".toml": "toml", ".json": "json"}


# -- reading ---------------------------------------------------------------------------------------
def toml_module():
    """``tomllib`` (Python >= 3.11) or ``tomli``; a ConfigError saying what to do otherwise."""
    try:
        import tomllib  # type: ignore[import-not-found]
        return tomllib
    except ImportError:
        pass
    try:
        import tomli  # type: ignore[import-not-found]
        return tomli
    except ImportError:
        raise ConfigError("reading TOML needs Python >= 3.11 (tomllib) or the tomli package (pip install tomli); "
                          "or write the config as JSON") from None


def _bundled_files() -> dict:
    root = resources.files("distillx").joinpath("configs")
    if not root.is_dir():
        return {}
    return {e.name: e for e in root.iterdir() if os.path.splitext(e.name)[1] in FORMATS}


def bundled_configs() -> dict:
    """name -> resource of every config shipped in ``distillx/configs``; where a name has both, the TOML
    one (the JSON one when no TOML reader is installed: Python < 3.11 without tomli)."""
    try:
        toml_module()
        toml_first = True
    except ConfigError:
        toml_first = False
    found: dict = {}
    for filename, entry in sorted(_bundled_files().items(),
                                  key=lambda kv: (kv[0].endswith(".json") == toml_first, kv[0])):
        found.setdefault(os.path.splitext(filename)[0], entry)
    return found


def read_config(config: str) -> tuple[str, dict]:
    """``(source, document)`` for a config path, or a bundled config's name (``digits``) or file name
    (``digits.json``)."""
    if os.path.exists(config):
        if os.path.isdir(config):
            raise ConfigError(f"config {config!r} is a directory, not a .toml or .json file")
        ext = os.path.splitext(config)[1].lower()
        if ext not in FORMATS:
            raise ConfigError(f"config {config!r}: unsupported file type {ext or '(none)'!r}; use .toml or .json")
        with open(config, encoding="utf-8") as f:
            text = f.read()
        return config, parse_config(text, FORMATS[ext], config)
    entry = _bundled_files().get(config) or bundled_configs().get(config)
    if entry is None:
        raise ConfigError(f"config {config!r}: no such file, and no bundled config of that name (bundled: "
                          f"{', '.join(sorted(bundled_configs())) or 'none'})")
    source = f"bundled config {entry.name!r}"
    return source, parse_config(entry.read_text(encoding="utf-8"), FORMATS[os.path.splitext(entry.name)[1]], source)


def parse_config(text: str, fmt: str, source: str) -> dict:
    if fmt == "toml":
        toml = toml_module()
        try:
            return toml.loads(text)
        except toml.TOMLDecodeError as exc:
            raise ConfigError(f"invalid TOML: {exc}", source) from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"invalid JSON: {exc}", source) from None


def load(config: str, overrides=()) -> dict:
    """The resolved config of ``config`` (a path or a bundled name) with ``overrides`` (``"key=value"``
    strings, as for ``--set``) applied; :class:`ConfigError` for any problem."""
    source, raw = read_config(config)
    for item in overrides:
        apply_override(raw, item)
    return validate(raw, source)


# -- --set overrides -----------------------------------------------------------------------------
def _plain(value: Any) -> bool:
    if isinstance(value, (str, bool, int, float)):
        return True
    if isinstance(value, list):
        return all(_plain(v) for v in value)
    if isinstance(value, dict):
        return all(isinstance(k, str) and _plain(v) for k, v in value.items())
    return False


def parse_value(text: str) -> Any:
    """A ``--set`` value: JSON (``4``, ``1e-3``, ``true``, ``[64, 32, 10]``, ``{"a": 1}``), else a TOML
    value (``'x'``, ``{a = 1}``, ``nan``), else the text itself as a string."""
    try:
        return json.loads(text)
    except ValueError:
        pass
    try:
        toml = toml_module()
        value = toml.loads(f"v = {text}")["v"]
        if _plain(value):  # not a TOML date or time: keep those as the string they were
            return value
    except Exception:
        pass
    return text


def apply_override(raw: dict, item: str) -> None:
    """Apply one ``KEY=VALUE`` override to the parsed document ``raw`` (in place)."""
    key, sep, text = item.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"--set expects KEY=VALUE (e.g. student.epochs=5), got {item!r}")
    parts = key.split(".")
    if any(not p for p in parts):
        raise ConfigError(f"--set {key}: empty key in the dotted path")
    try:
        check_path(parts, raw)
    except ConfigError as exc:
        raise ConfigError(f"--set {key}: {exc}") from None
    value = parse_value(text.strip())
    node: Any = raw
    for i, part in enumerate(parts):
        here = ".".join(parts[:i]) or "the config"
        last = i == len(parts) - 1
        if isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                raise ConfigError(f"--set {key}: {here} has {len(node)} item(s); index {part} is out of range "
                                  f"(set the whole array with --set {here}=[...])")
            if last:
                node[int(part)] = value
            else:
                node = node[int(part)]
        elif isinstance(node, dict):
            if last:
                node[part] = value
            else:
                if node.get(part) is None:
                    if parts[i + 1].isdigit():
                        raise ConfigError(f"--set {key}: the config has no {'.'.join(parts[:i + 1])} array to "
                                          f"index; set it whole with --set {'.'.join(parts[:i + 1])}=[...]")
                    node[part] = {}  # a table the config left out (its defaults apply to the rest)
                node = node[part]
        else:
            raise ConfigError(f"--set {key}: {here} is {describe(node)}, not a table or an array")


