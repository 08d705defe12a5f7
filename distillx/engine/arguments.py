"""The Distiller's arguments turned into objects, with errors that name the argument: methods and
their weights (and their metric keys), augmentations, the weight transfer."""
from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

from torch import nn

from ..methods import Method

TASK = "task"  # metrics key of the weighted task loss


def build_augmentations(augmentations) -> list:
    if augmentations is None:
        return []
    if isinstance(augmentations, (str, bytes)) or callable(augmentations):
        augmentations = [augmentations]
    from ..augment import resolve

    out = []
    for i, a in enumerate(augmentations):
        if isinstance(a, (str, dict)):
            a = resolve(a)
        if not callable(a):
            raise TypeError(f"augmentations[{i}] must be a registered name, a {{'name': ..., **options}} mapping or a "
                            f"callable (inputs, targets, generator) -> (inputs, targets), got {type(a).__name__}")
        out.append(a)
    return out


def apply_transfer(transfer, teacher: nn.Module, student: nn.Module):
    """Run ``transfer`` (a name, a Transfer or a callable) on the models; return its report or None."""
    if transfer is None:
        return None
    from .. import transfer as transfers

    if isinstance(transfer, str):
        transfer = transfers.Transfer(transfer)
    if isinstance(transfer, transfers.Transfer) and transfer.n is not None:
        raise ValueError(f"transfer={transfer.name!r} with n={transfer.n} makes an ensemble of students; the "
                         "Distiller trains one student: drop n= (or distil each ensemble member separately)")
    if not callable(transfer):
        raise TypeError("transfer must be a strategy name, a distillx.transfer.Transfer or a callable "
                        f"(teacher, student) -> TransferReport, got {type(transfer).__name__}")
    report = transfer(teacher, student)
    if not isinstance(report, transfers.TransferReport):
        raise TypeError(f"transfer returned {type(report).__name__}, expected a TransferReport")
    return report


def check_weight(weight, name: str) -> float:
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight) or weight < 0:
        raise ValueError(f"{name} must be a finite number >= 0, got {weight!r}")
    return float(weight)


def check_methods(methods) -> list[Method]:
    if methods is None:
        return []
    if isinstance(methods, Method):
        raise TypeError("methods must be a list of methods; wrap the single method in a list: methods=[...]")
    if isinstance(methods, (str, bytes)) or not isinstance(methods, Iterable):
        raise TypeError(f"methods must be a list of distillx methods, got {type(methods).__name__}")
    methods = list(methods)
    for i, m in enumerate(methods):
        if not isinstance(m, Method):
            raise TypeError(f"methods[{i}] must be a distillx Method (build it with distillx.method(name, ...)), "
                            f"got {type(m).__name__}")
        check_weight(m.weight, f"methods[{i}].weight ({method_name(m)})")
    return methods


def method_name(method: Method) -> str:
    return getattr(method, "name", None) or type(method).__name__


def metric_keys(methods: Sequence[Method]) -> list[str]:
    """One metrics key per method: its name, suffixed ``#2``, ``#3``… when a name repeats."""
    keys, counts = [], {}
    for m in methods:
        base = method_name(m)
        counts[base] = counts.get(base, 0) + 1
        keys.append(base if counts[base] == 1 else f"{base}#{counts[base]}")
    if TASK in keys or "loss" in keys:
        raise ValueError(f"a method may not be named {TASK!r} or 'loss' (reserved metrics keys)")
    return keys
