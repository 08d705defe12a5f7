"""The package imports downward only (docs/architecture.md, "Layers").

Every module under ``distillx/`` is parsed; each ``distillx`` import (absolute or relative, at module
level or inside a function) must point to the importer's own layer or a lower one, and an import
inside a function must not name a ``distillx`` module at all (function-level imports are only for
heavy optional dependencies, never to dodge a cycle). Then one fresh interpreter imports every
module, so a cycle that only shows at import time fails too.
"""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "distillx"

# Bottom to top; a module may import its own layer and those before it. The most specific prefix wins.
LAYERS = [
    ("base", ["distillx._checks", "distillx._ext", "distillx._atomic", "distillx._options", "distillx._version",
              "distillx._batch", "distillx._C", "distillx.data", "distillx.reporting.progress"]),
    ("ops", ["distillx.ops"]),
    ("functional", ["distillx.functional"]),
    ("features", ["distillx.features"]),
    ("components", ["distillx.methods", "distillx.transfer", "distillx.augment", "distillx.kernels",
                    "distillx.compose", "distillx.hf", "distillx.loggers"]),
    ("plugin", ["distillx.plugin"]),
    ("engine", ["distillx.engine", "distillx.teacher_cache", "distillx.reporting"]),
    ("distiller", ["distillx.distiller"]),
    ("apps", ["distillx.config", "distillx.cli", "distillx.demo", "distillx.benchmarks", "distillx.experiments",
              "distillx.testing", "distillx", "distillx.hf.trainer"]),
]
# The one upward reference allowed: a package re-exporting, by name and on first attribute access
# (importlib.import_module in a module __getattr__), a module of a higher layer that lives inside it.
# Nothing at import time points upward, so no cycle can form. (importer, target)
LAZY_REEXPORTS = {("distillx.hf", "distillx.hf.trainer")}
RANK = {prefix: i for i, (_, prefixes) in enumerate(LAYERS) for prefix in prefixes}


def layer_of(module: str) -> int:
    """The layer index of a dotted module name (its longest listed prefix)."""
    parts = module.split(".")
    for n in range(len(parts), 0, -1):
        prefix = ".".join(parts[:n])
        if prefix in RANK:
            return RANK[prefix]
    raise KeyError(f"{module} is in no layer of tests/test_layers.py: add it to LAYERS (and docs/architecture.md)")


def module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _absolute(node: ast.ImportFrom, module: str, is_package: bool) -> list[str]:
    if node.level == 0:
        base = node.module or ""
    else:
        package = module.split(".") if is_package else module.split(".")[:-1]
        package = package[: len(package) - (node.level - 1)]
        base = ".".join(package + ([node.module] if node.module else []))
    # "from . import x" names submodule x; "from .m import y" names module m.
    return [f"{base}.{a.name}" for a in node.names] if node.module is None else [base]


def violations(source: str, module: str, is_package: bool = False) -> list[str]:
    """Upward or function-level ``distillx`` imports in ``source`` (the text of ``module``)."""
    tree = ast.parse(source)
    own = layer_of(module)
    found = []
    function_nodes = {id(n) for f in ast.walk(tree) if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))
                      for n in ast.walk(f)}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            targets = _absolute(node, module, is_package)
        else:
            continue
        for target in targets:
            if target != "distillx" and not target.startswith("distillx."):
                continue
            if id(node) in function_nodes:
                found.append(f"{module}:{node.lineno} imports {target} inside a function")
            elif layer_of(target) > own:
                found.append(f"{module}:{node.lineno} imports {target} ({LAYERS[layer_of(target)][0]}) from "
                             f"layer {LAYERS[own][0]}")
    # importlib.import_module("distillx...") is an import too: upward only as a declared lazy re-export
    for node in ast.walk(tree):
        if (isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", None)) == "import_module"
                and node.args and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)
                and node.args[0].value.startswith("distillx") and layer_of(node.args[0].value) > own
                and (module, node.args[0].value) not in LAZY_REEXPORTS):
            found.append(f"{module}:{node.lineno} imports {node.args[0].value} with import_module (not a declared "
                         "lazy re-export)")
    return found


def modules() -> list[Path]:
    return sorted(p for p in PACKAGE.rglob("*.py") if "__pycache__" not in p.parts)


def test_every_module_imports_downward_only():
    found = []
    for path in modules():
        found += violations(path.read_text(), module_name(path), path.name == "__init__.py")
    assert not found, "imports against the layer order:\n" + "\n".join(found)


@pytest.mark.parametrize("module, source, expected", [
    ("distillx.ops.kernel_gram", "from ..plugin import get_registries\n", "imports distillx.plugin (plugin) from layer ops"),
    ("distillx.methods.kfd", "import distillx.engine.step\n", "imports distillx.engine.step (engine) from layer components"),
    ("distillx.features.spec", "def f():\n    from ..methods import Method\n", "imports distillx.methods inside a function"),
    ("distillx.methods", "import importlib\ndef __getattr__(n):\n    return importlib.import_module('distillx.distiller')\n",
     "imports distillx.distiller with import_module (not a declared lazy re-export)"),
])
def test_the_check_fails_on_an_upward_import(module, source, expected):
    found = violations(source, module)
    assert len(found) == 1 and expected in found[0], found


def test_downward_and_same_layer_imports_pass():
    assert violations("from .. import _checks\nfrom . import reference\nimport torch\n", "distillx.ops.kernel_gram") == []
    assert violations("from ..ops import kernel_gram\nfrom ..features import PENULTIMATE\n",
                      "distillx.methods.kfd") == []
    assert violations("from . import a\n", "distillx.plugin", is_package=True) == []


def test_every_module_imports_in_a_fresh_interpreter():
    names = [module_name(p) for p in modules() if p.name != "__main__.py"]  # __main__ runs the command
    script = ("import importlib, sys\nfailed = []\nfor name in sys.argv[1:]:\n    try:\n"
              "        importlib.import_module(name)\n    except Exception as exc:\n"
              "        failed.append(f'{name}: {type(exc).__name__}: {exc}')\nprint('\\n'.join(failed))\n"
              "sys.exit(1 if failed else 0)\n")
    done = subprocess.run([sys.executable, "-c", script, *names], capture_output=True, text=True, cwd=ROOT,
                          timeout=600)
    assert done.returncode == 0, f"modules that do not import:\n{done.stdout}{done.stderr[-3000:]}"
