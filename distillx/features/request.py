"""What a distillation method asks the feature extractors for: :class:`FeatureRequest`, the same
layer feature from both models (each side may capture differently)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Optional, Tuple, Union

CAPTURES = ("output", "input")
"""What a hook keeps: the module's output, or its input (taken before the module runs)."""

Selector = Union[int, str]
SelectSpec = Union[None, Selector, Tuple[Selector, ...]]


def _check_select(value: Any, field_name: str) -> Any:
    if value is None:
        return None
    items = tuple(value) if isinstance(value, (tuple, list)) else (value,)
    if not items or any(isinstance(s, bool) or not isinstance(s, (int, str)) or s == "" for s in items):
        raise ValueError(f"FeatureRequest.{field_name} must be None, an int index, a non-empty name, or a "
                         f"non-empty tuple of them, got {value!r}")
    return items if isinstance(value, (tuple, list)) else value


@dataclass(frozen=True)
class FeatureRequest:
    """An intermediate feature a method needs from both models.

    ``key``: where the captured tensors appear in the ``student``/``teacher`` dicts given to
    ``loss``. ``student``/``teacher``: dotted module paths (``"layer3"``, ``"blocks.-1"``,
    ``"penultimate"``), optionally in the shorthand ``"PATH[@input][:SELECT]"`` of
    :class:`distillx.features.FeatureSpec`, so each side may capture differently.
    ``capture``: the module's ``"output"`` or its ``"input"``. ``reduction``: name of a
    capture-time reduction (:data:`distillx.features.REDUCTIONS`, e.g. ``"attention_map"``) or a
    callable ``f(feature, **reduction_kwargs)``, applied before the tensor is kept, or None.

    ``select``: which part of a tuple/dict/dataclass output (or which input) to keep, for both
    sides (an int index, a field/argument name, or a tuple of them applied in turn);
    ``student_select``/``teacher_select`` override it for one side. ``reduction_kwargs``: options
    of the reduction (``{"p": 2}``); ``student_reduction_kwargs``/``teacher_reduction_kwargs``
    override them for one side. All four are optional, so ``FeatureRequest(key, student, teacher)``
    and the positional ``(key, student, teacher, capture, reduction)`` form keep working.
    """

    key: str
    student: str
    teacher: str
    capture: str = "output"
    reduction: Union[None, str, Callable[..., Any]] = None
    select: SelectSpec = None
    reduction_kwargs: Optional[Mapping[str, Any]] = field(default=None, hash=False)
    student_select: SelectSpec = None
    teacher_select: SelectSpec = None
    student_reduction_kwargs: Optional[Mapping[str, Any]] = field(default=None, hash=False)
    teacher_reduction_kwargs: Optional[Mapping[str, Any]] = field(default=None, hash=False)

    def __post_init__(self):
        for name in ("key", "student", "teacher"):
            value = getattr(self, name)
            if not isinstance(value, str) or not value:
                raise ValueError(f"FeatureRequest.{name} must be a non-empty string, got {value!r}")
        if self.capture not in CAPTURES:
            raise ValueError(f"FeatureRequest.capture must be one of {CAPTURES}, got {self.capture!r}")
        if self.reduction is not None and not callable(self.reduction) and (
                not isinstance(self.reduction, str) or not self.reduction):
            raise ValueError(f"FeatureRequest.reduction must be None, a non-empty string or a callable, "
                             f"got {self.reduction!r}")
        for name in ("select", "student_select", "teacher_select"):
            object.__setattr__(self, name, _check_select(getattr(self, name), name))
        for name in ("reduction_kwargs", "student_reduction_kwargs", "teacher_reduction_kwargs"):
            value = getattr(self, name)
            if value is None:
                continue
            if not isinstance(value, Mapping):
                raise ValueError(f"FeatureRequest.{name} must be None or a mapping, got {type(value).__name__}")
            if self.reduction is None:
                raise ValueError(f"FeatureRequest.{name} given without a reduction")
            object.__setattr__(self, name, dict(value))

    def path(self, side: str) -> str:
        """The ``student`` or ``teacher`` path."""
        if side not in ("student", "teacher"):
            raise ValueError(f"side must be 'student' or 'teacher', got {side!r}")
        return getattr(self, side)


__all__ = ["CAPTURES", "FeatureRequest"]
