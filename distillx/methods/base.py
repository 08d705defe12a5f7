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
outputs (absent for a model without logits, or when no active term reads them and a method applies
the output layer itself: :attr:`Method.uses_logits`, :meth:`Method.output_layers`), and each
:class:`FeatureRequest` from :meth:`Method.features` is captured under its ``key`` in both dicts (keys are the method's own: the Distiller namespaces them internally, so two
methods may use the same key). Teacher tensors come from ``no_grad`` and are detached.
``loss()`` returns the *unweighted* loss; the Distiller multiplies it by ``method.weight``.
``batch`` is the ``(inputs, targets)`` pair; :meth:`Method.attention_mask` reads the padding mask
of mapping inputs. :meth:`Method.bind` gets both models before :meth:`Method.features` is asked,
for what must be found in them (layers, heads, output layers).

Methods whose submodules depend on feature shapes (adapters) say so with :attr:`Method.needs_setup`;
the Distiller then calls :meth:`Method.setup` with the features of one dry forward pass before it
builds the optimizer. Shape problems are reported with :meth:`Method.feature_error`, which names the
method, the feature and its layers.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Iterable, Mapping, Optional

import torch
from torch import nn

from .._batch import attention_mask_of, check_token_mask
from .._options import Options
from ..features import PENULTIMATE, REDUCTIONS, FeatureRequest  # noqa: F401  (part of this module's API)

#: Options of the methods whose layer features may be reduced at capture time, the same way on both
#: sides: ``reduction`` (a name in :data:`distillx.features.REDUCTIONS` such as ``"masked_mean"``, or
#: a callable ``f(feature, **kwargs)``) and its ``reduction_kwargs``.
CAPTURE_OPTIONS = {"reduction": None, "reduction_kwargs": None}

# Attributes nn.Module sets on instances (e.g. "training"); an option with such a name would clobber them.
_MODULE_INSTANCE_ATTRS = frozenset(vars(nn.Module()))


class FeatureShapeError(ValueError):
    """A captured feature has a shape (or width, or value) the method cannot use; the message names
    the method, the feature key and the student/teacher layers."""


@dataclass(frozen=True)
class BatchContext:
    """What :meth:`Method.prepare_batch` gets besides the batch: both (unwrapped) models in their
    training-time modes (a method that samples from one switches it to ``eval()`` and back), the
    device, and ``generator``: a CPU ``torch.Generator`` of this process, saved in checkpoints, so
    that every draw made from it repeats on a resumed run."""

    student: nn.Module
    teacher: nn.Module
    generator: torch.Generator
    device: torch.device


class Method(Options, nn.Module):
    """Base class of distillation methods.

    Subclasses set ``name`` (the registry name), declare their options in the class attribute
    ``options`` (name -> default; merged with those of base classes, so ``weight`` is always there),
    check option values in :meth:`validate` (with :meth:`check_number`, :meth:`check_int`,
    :meth:`check_bool`, :meth:`check_choice`), and implement :meth:`loss`; feature methods also
    override :meth:`features`. Options become attributes (``self.T``). A subclass that builds
    adapters overrides ``__init__(self, **options)``, calls ``super().__init__(**options)`` first,
    then creates its submodules.

    ``registry_options`` names options whose string values are entries of a plugin registry
    (``{"kernel": "kernels"}``): :func:`distillx.method` resolves them before the method is built.
    """

    kind: ClassVar[str] = "method"
    name: ClassVar[str] = ""
    options: ClassVar[dict[str, Any]] = {"weight": 1.0}
    registry_options: ClassVar[dict[str, str]] = {}
    #: Whether :meth:`loss` reads ``student["logits"]``/``teacher["logits"]``. A method that only reads
    #: features says False, so a step whose terms need no logits may skip an output layer (see
    #: :meth:`output_layers`); then ``"logits"`` is absent from the dicts.
    uses_logits: ClassVar[bool] = True
    #: Whether :meth:`prepare_batch` rewrites the training batch (then the teacher runs on the
    #: rewritten batch: no teacher cache; each process gets a generator that checkpoints save).
    rewrites_batch: ClassVar[bool] = False
    #: Names of the per-step statistics :meth:`batch_metrics` returns.
    metric_names: ClassVar[tuple[str, ...]] = ()

    def __init__(self, **options: Any):
        nn.Module.__init__(self)
        self._set_options(options)
        self.check_number("weight", ge=0)
        self.validate()

    # -- to override ------------------------------------------------------------------------
    def validate(self) -> None:
        """Check option values (raise ``ValueError``/``TypeError`` naming the option). Default: nothing."""

    def features(self) -> list[FeatureRequest]:
        """Intermediate features this method needs; logit methods need none."""
        return []

    def bind(self, student: nn.Module, teacher: nn.Module) -> None:
        """Resolve what depends on the models (layer paths, head counts, output layers) before
        :meth:`features` is asked. The Distiller calls it once with both models (unwrapped), before
        it hooks them; used on its own, call it yourself. Default: nothing."""

    def output_layers(self) -> dict[str, str]:
        """``{side: module path}`` of output layers this method applies itself (to the layer's captured
        input, with the layer's weights), so that the layer need not run when no term reads logits.
        Default: none."""
        return {}

    # -- methods that rewrite the training batch (on-policy distillation) ---------------------
    def prepare_batch(self, inputs: Any, targets: Any, context: "BatchContext") -> tuple[Any, Any]:
        """Rewrite a training batch before either model's forward pass: return ``(inputs,
        targets)``, the batch every term of this step then sees (``gkd`` replaces the completion by
        the student's own sample). Called only when :attr:`rewrites_batch` is True and the method's
        weight is not 0, in the methods' order, for training steps (not validation, not the dry
        forward pass of :meth:`setup`). ``context`` (:class:`BatchContext`) holds both models (the
        feature hooks are paused while this runs: calling them captures nothing) and the random
        generator to draw from. Default: the batch unchanged."""
        return inputs, targets

    def batch_metrics(self) -> dict[str, Any]:
        """Statistics of the step that just ran, ``{name: float or 0-dim tensor}`` for each name in
        :attr:`metric_names` (logged as ``<method key>/<name>``, averaged per sample over an epoch;
        a step where the method is inactive logs 0). Default: none."""
        return {}

    def epoch_metrics(self, means: Mapping[str, float]) -> dict[str, float]:
        """Further epoch metrics from the epoch means of :attr:`metric_names` (``{name: mean}``),
        for ratios such as a mean over the steps where something happened. Default: none."""
        return {}

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
        """The unweighted scalar loss from the student's and teacher's outputs (see module docstring):
        a floating-point tensor of shape () (or (1,), taken as the scalar), with a graph to the
        student's parameters while gradients are on; the Distiller checks it (:func:`checked_loss`)."""
        raise NotImplementedError(f"{type(self).__name__} must implement loss(student, teacher, batch)")

    # -- provided ---------------------------------------------------------------------------
    def forward(self, student: Mapping[str, Any], teacher: Mapping[str, Any], batch: Any = None) -> torch.Tensor:
        """Same as :meth:`loss` (unweighted), so a method can be called like any module."""
        return self.loss(student, teacher, batch)

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.config().items())

    def require(self, outputs: Mapping[str, Any], key: str, side: str) -> Any:
        """``outputs[key]``, or a ``KeyError`` saying which method needed which key from which side."""
        try:
            return outputs[key]
        except KeyError:
            have = ", ".join(map(repr, outputs)) or "nothing"
            raise KeyError(f"method {self.name!r} needs {side}[{key!r}], but the {side} outputs hold {have}") from None

    def attention_mask(self, batch: Any, shape: Optional[tuple] = None, key: str = "") -> Optional[torch.Tensor]:
        """The batch's ``attention_mask`` as a (B, L) bool tensor (True = real token), or None when the
        batch has none. With ``shape`` = (B, L) of the tokens it will mask, a mismatch is an error
        naming this method and ``key``."""
        mask = attention_mask_of(batch)
        if mask is not None and shape is not None:
            check_token_mask(mask, shape, f"method {self.label!r}, feature {key!r}")
        return mask

    def check_capture_options(self) -> None:
        """Check the :data:`CAPTURE_OPTIONS` (``reduction``, ``reduction_kwargs``)."""
        r, kw = self.reduction, self.reduction_kwargs
        if r is not None and not callable(r) and (not isinstance(r, str) or r not in REDUCTIONS):
            raise ValueError(f"method {self.label!r}: option reduction must be None, a capture-time reduction "
                             f"({', '.join(REDUCTIONS)}) or a callable, got {r!r}")
        if kw is not None and (not isinstance(kw, Mapping) or r is None):
            raise ValueError(f"method {self.label!r}: option reduction_kwargs must be None or a mapping of the "
                             f"reduction's options, given with a reduction, got {kw!r}")

    def layer_request(self, key: str, student: str, teacher: str) -> FeatureRequest:
        """A request for one layer pair, with the capture-time reduction of :data:`CAPTURE_OPTIONS` if any."""
        return FeatureRequest(key, student, teacher, reduction=getattr(self, "reduction", None),
                              reduction_kwargs=getattr(self, "reduction_kwargs", None))

    def describe_feature(self, key: str, side: str | None = None) -> str:
        """``"feature 'hint' (student layer 'layer2', teacher layer 'layer3')"`` for error messages."""
        req = next((r for r in self.features() if r.key == key), None)
        if req is None:
            return f"feature {key!r}"
        sides = ("student", "teacher") if side is None else (side,)
        return f"feature {key!r} (" + ", ".join(f"{s} layer {req.path(s)!r}" for s in sides) + ")"

    def feature_error(self, key: str, problem: str, side: str | None = None) -> FeatureShapeError:
        """A :class:`FeatureShapeError` naming this method, the feature and its layers, then ``problem``."""
        return FeatureShapeError(f"method {self.label!r}: {self.describe_feature(key, side)}: {problem}")

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


Method._root = Method
Method._reserved = _MODULE_INSTANCE_ATTRS


def checked_loss(method: "Method", key: str, value: Any, need_graph: bool) -> torch.Tensor:
    """``value`` (what ``method.loss()`` returned) as a 0-dim tensor, checked: a floating-point tensor of
    shape () or (1,) (one element, as ``torch.stack`` of a single term gives), which must require grad
    when ``need_graph`` (gradients on and a student with trainable parameters; under ``no_grad`` or for a
    frozen student a loss without a graph is legitimate). Anything else is a ``TypeError`` (not a
    floating-point tensor) or ``ValueError`` (shape, graph) naming the method (``key``, its class) and
    what it returned against what was expected: a float, a vector or a detached tensor would otherwise
    fail later with a raw error, or train nothing."""
    expected = "expected a floating-point scalar tensor (shape () or (1,))"
    if need_graph:
        expected += (" that requires grad (gradients are enabled and the student has trainable parameters: the loss"
                     " must be computed from the student's outputs)")
    if not isinstance(value, torch.Tensor):
        found, error = ("None" if value is None else f"a {type(value).__name__}"
                        + (f" ({value!r})" if isinstance(value, (int, float)) else "")), TypeError
    elif not value.is_floating_point():
        found, error = f"a tensor of dtype {value.dtype} (shape {tuple(value.shape)})", TypeError
    elif value.dim() > 1 or value.numel() != 1:
        found, error = f"a tensor of shape {tuple(value.shape)} (reduce it to a scalar, e.g. .mean())", ValueError
    elif need_graph and not value.requires_grad:
        found, error = ("a tensor that does not require grad (no graph to the student: computed under torch.no_grad, "
                        "detached, .item() turned back into a tensor, or from the teacher's outputs alone)"), ValueError
    else:
        return value.reshape(())
    raise error(f"method {key!r} ({type(method).__qualname__}).loss() returned {found}; {expected}")


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
