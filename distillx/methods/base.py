"""The interface every distillation method implements.

A method turns the outputs of one student and one teacher forward pass into a scalar loss::

    class LogitMSE(Method):
        '''Mean squared error between student and teacher logits.'''

        name = "logit_mse"
        options = {"scale": 1.0}          # option name -> default; `weight` is inherited

        def validate(self):
            self.check_number("scale", gt=0)

        def loss(self, student, teacher, batch=None):
            s = self.require(student, "logits", "student")
            t = self.require(teacher, "logits", "teacher")
            return self.scale * torch.nn.functional.mse_loss(s, t.detach())

    m = LogitMSE(scale=2.0, weight=0.5)    # unknown or invalid options fail here, not mid-training

Why an ``nn.Module``: methods with learned adapters (FitNets hints, width-changing projections)
hold them as submodules, so ``parameters()`` yields exactly the extra trainable parameters (none
for logit methods), ``.to(device)`` moves them and ``state_dict()`` checkpoints them with the
student.

Contract with the Distiller: ``student["logits"]`` and ``teacher["logits"]`` hold the two models'
outputs, and each :class:`FeatureRequest` from :meth:`Method.features` is captured under its
``key`` in both dicts. Teacher tensors come from ``no_grad``. ``loss()`` returns the *unweighted*
loss; the Distiller multiplies it by ``method.weight``.
"""
from __future__ import annotations

import copy
import math
import numbers
from dataclasses import dataclass
from typing import Any, ClassVar, Iterable, Mapping

import torch
from torch import nn

CAPTURES = ("output", "input")
# Attributes nn.Module sets on instances (e.g. "training"); an option with such a name would clobber them.
_MODULE_INSTANCE_ATTRS = frozenset(vars(nn.Module()))


@dataclass(frozen=True)
class FeatureRequest:
    """An intermediate feature a method needs from both models.

    ``key``: where the captured tensors appear in the ``student``/``teacher`` dicts given to
    ``loss``. ``student``/``teacher``: dotted module paths (``"layer3"``, ``"blocks.-1"``).
    ``capture``: the module's ``"output"`` or its ``"input"``. ``reduction``: name of a
    capture-time reduction (e.g. an attention map) applied before the tensor is kept, or None.
    """

    key: str
    student: str
    teacher: str
    capture: str = "output"
    reduction: str | None = None

    def __post_init__(self):
        for field in ("key", "student", "teacher"):
            value = getattr(self, field)
            if not isinstance(value, str) or not value:
                raise ValueError(f"FeatureRequest.{field} must be a non-empty string, got {value!r}")
        if self.capture not in CAPTURES:
            raise ValueError(f"FeatureRequest.capture must be one of {CAPTURES}, got {self.capture!r}")
        if self.reduction is not None and (not isinstance(self.reduction, str) or not self.reduction):
            raise ValueError(f"FeatureRequest.reduction must be None or a non-empty string, got {self.reduction!r}")


class Method(nn.Module):
    """Base class of distillation methods.

    Subclasses set ``name`` (the registry name), declare their options in the class attribute
    ``options`` (name -> default; merged with those of base classes, so ``weight`` is always there),
    check option values in :meth:`validate`, and implement :meth:`loss`; feature methods also
    override :meth:`features`. Options become attributes (``self.T``). A subclass that builds
    adapters overrides ``__init__(self, **options)``, calls ``super().__init__(**options)`` first,
    then creates its submodules.
    """

    name: ClassVar[str] = ""
    options: ClassVar[dict[str, Any]] = {"weight": 1.0}
    _defaults: ClassVar[dict[str, Any]] = {"weight": 1.0}

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        merged: dict[str, Any] = {}
        for klass in reversed(cls.__mro__):
            merged.update(klass.__dict__.get("options", {}))
        # An option named like a Module/Method attribute would shadow it (e.g. "training", "loss").
        reserved = (set(dir(Method)) | _MODULE_INSTANCE_ATTRS) - set(Method._defaults)
        for option in merged:
            if not isinstance(option, str) or not option.isidentifier() or option.startswith("_"):
                raise TypeError(f"{cls.__name__}.options: option names must be public identifiers, got {option!r}")
            if option in reserved:
                raise TypeError(f"{cls.__name__}.options: option {option!r} would shadow Method.{option}")
        cls._defaults = merged

    def __init__(self, **options: Any):
        super().__init__()
        label = self.name or type(self).__name__
        unknown = [k for k in options if k not in self._defaults]
        if unknown:
            valid = ", ".join(sorted(self._defaults))
            raise TypeError(f"method {label!r} got an unknown option {unknown[0]!r}; valid options: {valid}")
        # Defaults are copied so a mutable default (a list of layers, say) is never shared by instances.
        for option, value in {**copy.deepcopy(self._defaults), **options}.items():
            setattr(self, option, value)
        self.check_number("weight", ge=0)
        self.validate()

    # -- to override ------------------------------------------------------------------------
    def validate(self) -> None:
        """Check option values (raise ``ValueError``/``TypeError`` naming the option). Default: nothing."""

    def features(self) -> list[FeatureRequest]:
        """Intermediate features this method needs; logit methods need none."""
        return []

    def loss(self, student: Mapping[str, Any], teacher: Mapping[str, Any], batch: Any = None) -> torch.Tensor:
        """The unweighted scalar loss from the student's and teacher's outputs (see module docstring)."""
        raise NotImplementedError(f"{type(self).__name__} must implement loss(student, teacher, batch)")

    # -- provided ---------------------------------------------------------------------------
    def forward(self, student: Mapping[str, Any], teacher: Mapping[str, Any], batch: Any = None) -> torch.Tensor:
        """Same as :meth:`loss` (unweighted), so a method can be called like any module."""
        return self.loss(student, teacher, batch)

    @classmethod
    def default_options(cls) -> dict[str, Any]:
        """Every option with its default, ``weight`` included."""
        return dict(cls._defaults)

    def config(self) -> dict[str, Any]:
        """The current option values; ``type(self)(**m.config())`` rebuilds an equivalent method."""
        return {option: getattr(self, option) for option in self._defaults}

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.config().items())

    def require(self, outputs: Mapping[str, Any], key: str, side: str) -> Any:
        """``outputs[key]``, or a ``KeyError`` saying which method needed which key from which side."""
        try:
            return outputs[key]
        except KeyError:
            have = ", ".join(map(repr, outputs)) or "nothing"
            raise KeyError(f"method {self.name!r} needs {side}[{key!r}], but the {side} outputs hold {have}") from None

    def check_number(self, option: str, *, gt: float | None = None, ge: float | None = None,
                     lt: float | None = None, le: float | None = None) -> None:
        """Raise unless option ``option`` is a finite real number within the given bounds."""
        value = getattr(self, option)
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
            raise ValueError(f"method {self.name!r}: option {option} must be a finite number, got {value!r}")
        failed = ((gt is not None and not value > gt and f"> {gt}")
                  or (ge is not None and not value >= ge and f">= {ge}")
                  or (lt is not None and not value < lt and f"< {lt}")
                  or (le is not None and not value <= le and f"<= {le}"))
        if failed:
            raise ValueError(f"method {self.name!r}: option {option} must be {failed}, got {value!r}")

    def check_choice(self, option: str, choices: Iterable[Any]) -> None:
        """Raise unless option ``option`` is one of ``choices``."""
        value, choices = getattr(self, option), tuple(choices)
        if value not in choices:
            raise ValueError(f"method {self.name!r}: option {option} must be one of {choices}, got {value!r}")


def check_method_class(name: str, obj: Any) -> None:
    """Registry check for methods: a :class:`Method` subclass whose ``name`` is the registered name."""
    if not (isinstance(obj, type) and issubclass(obj, Method)):
        raise TypeError(f"method {name!r} must be a subclass of distillx.methods.Method, got {obj!r}")
    if obj.name != name:
        raise ValueError(f"method class {obj.__qualname__} has name {obj.name!r} but is registered as {name!r}; "
                         "they must agree")
