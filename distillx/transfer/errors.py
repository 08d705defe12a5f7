"""The error weight transfers raise, and the argument checks every strategy shares."""
from __future__ import annotations

import difflib
from typing import Any, Iterable

from torch import nn


class TransferError(ValueError):
    """A weight transfer cannot be done as asked: the models do not correspond, an option names a
    tensor that does not exist, the calibration data is empty, a strategy broke its contract, ...

    A ``ValueError``, so callers validating a config can catch both alike. Raised before the student
    is touched when the transfer goes through :func:`distillx.transfer`.
    """


def check_models(teacher: Any, student: Any) -> None:
    """Raise ``TypeError`` unless both arguments are ``nn.Module`` instances (not classes)."""
    for role, model in (("teacher", teacher), ("student", student)):
        if not isinstance(model, nn.Module):
            what = f"the class {model.__name__}" if isinstance(model, type) else type(model).__name__
            raise TypeError(f"{role} must be a torch.nn.Module instance, got {what}")


def check_choice(strategy: str, option: str, value: Any, choices: Iterable[Any]) -> None:
    """Raise ``ValueError`` naming the option and the valid values unless ``value`` is one of ``choices``."""
    choices = tuple(choices)
    if value not in choices:
        raise ValueError(f"weight transfer {strategy!r}: option {option}={value!r} is not one of "
                         f"{', '.join(map(repr, choices))}")


def close_names(name: str, candidates: Iterable[str], n: int = 5) -> str:
    """``" Close names: a, b."`` for an error message (or ``""`` when nothing is close).

    Dotted names differ mostly in their last parts, so the last two components are compared too.
    """
    candidates = list(candidates)
    close = difflib.get_close_matches(name, candidates, n=n, cutoff=0.6)
    if not close:
        tail = ".".join(name.split(".")[-2:])
        tails = {".".join(c.split(".")[-2:]): c for c in candidates}
        close = [tails[t] for t in difflib.get_close_matches(tail, list(tails), n=n, cutoff=0.6)]
    return f" Close names: {', '.join(close)}." if close else ""
