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
``key`` in both dicts (keys are the method's own: the Distiller namespaces them internally, so two
methods may use the same key). Teacher tensors come from ``no_grad`` and are detached.
``loss()`` returns the *unweighted* loss; the Distiller multiplies it by ``method.weight``.

Methods whose submodules depend on feature shapes (adapters) say so with :attr:`Method.needs_setup`;
the Distiller then calls :meth:`Method.setup` with the features of one dry forward pass before it
builds the optimizer. Shape problems are reported with :meth:`Method.feature_error`, which names the
method, the feature and its layers.
"""
from __future__ import annotations

import copy
import math
import numbers
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Iterable, Mapping, Optional, Tuple, Union

import torch
from torch import nn

CAPTURES = ("output", "input")
#: The penultimate pseudo-path (same value as :data:`distillx.features.PENULTIMATE`; defined here too
#: because distillx.features imports this module).
PENULTIMATE = "penultimate"
# Attributes nn.Module sets on instances (e.g. "training"); an option with such a name would clobber them.
_MODULE_INSTANCE_ATTRS = frozenset(vars(nn.Module()))


Selector = Union[int, str]
SelectSpec = Union[None, Selector, Tuple[Selector, ...]]


class FeatureShapeError(ValueError):
    """A captured feature has a shape (or width, or value) the method cannot use; the message names
    the method, the feature key and the student/teacher layers."""


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

    @property
    def needs_setup(self) -> bool:
        """True while the method still has to see real features before training (e.g. adapters that
        are built from the observed widths). The Distiller then runs :meth:`setup` on one dry forward
        pass *before* it builds the optimizer, so the new parameters are optimised. Default: False."""
        return False

    def setup(self, student: Mapping[str, Any], teacher: Mapping[str, Any]) -> None:
        """Build shape-dependent parts (adapters) from one forward pass's features.

        ``student``/``teacher`` are the same dicts :meth:`loss` receives (captured without
        gradient, both models in ``eval()`` mode). Create submodules on the features' device.
        Raise :class:`FeatureShapeError` (see :meth:`feature_error`) for shapes the method cannot
        use. Default: nothing.
        """

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

    def describe_feature(self, key: str, side: str | None = None) -> str:
        """``"feature 'hint' (student layer 'layer2', teacher layer 'layer3')"`` for error messages."""
        req = next((r for r in self.features() if r.key == key), None)
        if req is None:
            return f"feature {key!r}"
        sides = ("student", "teacher") if side is None else (side,)
        return f"feature {key!r} (" + ", ".join(f"{s} layer {req.path(s)!r}" for s in sides) + ")"

    def feature_error(self, key: str, problem: str, side: str | None = None) -> FeatureShapeError:
        """A :class:`FeatureShapeError` naming this method, the feature and its layers, then ``problem``."""
        return FeatureShapeError(f"method {self.name!r}: {self.describe_feature(key, side)}: {problem}")

    def require_feature(self, outputs: Mapping[str, Any], key: str, side: str, *, ndim: Iterable[int] | None = None,
                        what: str = "") -> torch.Tensor:
        """``outputs[key]`` checked to be a floating-point tensor (with ``ndim`` dims when given)."""
        x = self.require(outputs, key, side)
        if not isinstance(x, torch.Tensor) or not x.is_floating_point():
            got = f"a {x.dtype} tensor" if isinstance(x, torch.Tensor) else f"a {type(x).__name__}"
            raise self.feature_error(key, f"the {side} feature must be a floating-point tensor, got {got} "
                                          "(pick a tensor of a tuple/dict output with 'path:index')", side)
        if ndim is not None and x.dim() not in tuple(ndim):
            raise self.feature_error(key, f"the {side} feature has shape {tuple(x.shape)}; this method needs "
                                          f"{what or ' or '.join(f'{n}-D' for n in ndim)}", side)
        return x

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


def layer_pairs(method: str, student: Any, teacher: Any) -> list[tuple[str, str]]:
    """Pair the ``student`` and ``teacher`` layer options of a method.

    Each is a path string or a list/tuple of path strings of the same length (pairs by position).
    Raises ``ValueError`` naming the method and the option.
    """
    def as_list(option: str, value: Any) -> list[str]:
        if value is None:
            raise ValueError(f"method {method!r}: option {option} is required (a layer path such as 'layer3', "
                             "or a list of them)")
        values = [value] if isinstance(value, str) else list(value) if isinstance(value, (list, tuple)) else None
        if not values or any(not isinstance(v, str) or not v for v in values):
            raise ValueError(f"method {method!r}: option {option} must be a non-empty layer path or a non-empty "
                             f"list of them, got {value!r}")
        return values

    s, t = as_list("student", student), as_list("teacher", teacher)
    if len(s) != len(t):
        raise ValueError(f"method {method!r}: options student and teacher must list the same number of layers "
                         f"(they are paired by position), got {len(s)} and {len(t)}")
    return list(zip(s, t))
