"""``distillx plugins [--json]``: every registered method, weight transfer, kernel, augmentation and logger
with the plugin that provides it, and the plugins that failed to load.

Exit status 1 when some plugin failed to load, so CI can check that plugins install cleanly.
"""
from __future__ import annotations

import argparse
import json
from typing import Any

from ..plugin import get_plugin_manager, provenance
from ..plugin.manager import DISABLE_ENV
from ..plugin.registry import Registries

TITLES = {"methods": "methods", "transfers": "weight transfers", "kernels": "kernels", "augmentations": "augmentations",
          "loggers": "loggers"}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="distillx plugins",
        description="List every registered method, weight transfer, kernel, augmentation and logger with the plugin "
                    f"that provides it, and plugins that failed to load. {DISABLE_ENV}=1 skips entry points.")
    parser.add_argument("--json", action="store_true", help="print machine-readable JSON")
    args = parser.parse_args(argv)
    report = get_plugin_manager().describe()
    print(json.dumps(report, indent=2) if args.json else format_report(report))
    return 1 if report["failed"] else 0


def format_report(report: dict[str, Any]) -> str:
    def entry(item: dict[str, Any]) -> str:
        text = f"{item['provider']} ({provenance(item['source'], item['distribution'], item['version'])})"
        return text + (f", overrides {item['overrides']}" if item["overrides"] else "")

    lines = ["plugins:"]
    for p in report["plugins"]:
        target = f"  [{p['target']}]" if p["source"] == "entrypoint" else ""
        lines.append(f"  {p['name']:<24} {provenance(p['source'], p['distribution'], p['version'])}{target}")
    for kind in Registries.KINDS:
        lines.append(f"{TITLES[kind]}:")
        items = report[kind]
        width = max((len(i["name"]) for i in items), default=0)
        lines += [f"  {i['name']:<{width}}  {entry(i)}" for i in items] or ["  (none)"]
    if report["disabled"]:
        lines.append(f"disabled by {DISABLE_ENV}: " + ", ".join(report["disabled"]))
    if report["failed"]:
        lines.append("failed to load:")
        for f in report["failed"]:
            dist = f" ({f['distribution']} {f['version']})" if f["distribution"] else ""
            lines.append(f"  {f['name']}{dist}: {f['stage']}: {f['error']}")
    return "\n".join(lines)
