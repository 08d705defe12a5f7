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


_MATERIALISE = {
    "teacher": "load the teacher's weights first: teacher.to_empty(device='cpu') then teacher.load_state_dict(...) "
               "(or load_state_dict(..., assign=True)); a transfer copies values out of the teacher",
    "student": "materialise the student first: student.to_empty(device='cpu') (then initialise or load its "
               "weights); a transfer writes values into the student, and a meta tensor holds none",
}


def check_models(teacher: Any, student: Any) -> None:
    """Raise ``TypeError`` unless both arguments are ``nn.Module`` instances (not classes), and
    :class:`TransferError` when either has tensors on the ``meta`` device.

    A meta tensor has a shape but no data: copying out of a meta teacher fails deep inside PyTorch,
    and copying into a meta student silently does nothing (the report would claim copies the
    student does not hold). The message names the model, its meta tensors and how to materialise it.
    """
    for role, model in (("teacher", teacher), ("student", student)):
        if not isinstance(model, nn.Module):
            what = f"the class {model.__name__}" if isinstance(model, type) else type(model).__name__
            raise TypeError(f"{role} must be a torch.nn.Module instance, got {what}")
    for role, model in (("teacher", teacher), ("student", student)):
        named = list(model.named_parameters(remove_duplicate=False)) + list(model.named_buffers())
        meta = [name for name, tensor in named if tensor.is_meta]
        if meta:
            shown = ", ".join(meta[:4]) + (f", ... ({len(meta)} in all)" if len(meta) > 4 else "")
            raise TransferError(f"the {role} is on the 'meta' device (no data in: {shown}); {_MATERIALISE[role]}")


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
