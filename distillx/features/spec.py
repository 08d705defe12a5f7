"""What to capture: :class:`FeatureSpec`, its string shorthand, and translation from a method's
:class:`~distillx.methods.base.FeatureRequest`."""
from __future__ import annotations

import inspect
import re
from dataclasses import dataclass, field, replace
from collections.abc import Iterable
from typing import Any, Callable, Mapping, Optional, Tuple, Union

from .paths import model_label
from .reductions import REDUCTIONS
from .request import CAPTURES

PENULTIMATE = "penultimate"
"""Pseudo-path of the penultimate feature: the input of the model's output layer, found by tracing
one forward pass (see :func:`distillx.features.find_penultimate` for the rule)."""

Selector = Union[int, str]
_INT = re.compile(r"[+-]?\d+")


def _check_selector(s: Any, what: str) -> None:
    if isinstance(s, bool) or not isinstance(s, (int, str)) or (isinstance(s, str) and not s):
        raise TypeError(f"{what} must be an int index or a non-empty field/argument name, got {s!r}")


@dataclass(frozen=True)
class FeatureSpec:
    """One feature to capture from one model.

    Args:
        path: dotted module path relative to the model (``"layer3"``,
            ``"encoder.layer.5.attention.self"``, ``"blocks.-1"``: negative indices count from the
            end of a ``ModuleList``/``Sequential``); a ``module.``/``_orig_mod.`` prefix of a
            DataParallel/DDP/``torch.compile`` wrapper may be written or left out. The special path
            ``"penultimate"`` (:data:`PENULTIMATE`) is the input of the output layer; it always
            captures an input.
        capture: ``"output"`` (forward hook) or ``"input"`` (forward pre-hook, taken before the
            module runs).
        select: which part to keep. For outputs: an int indexes a tuple/list output (or a
            ``ModelOutput``), a str picks a dict key or a namedtuple/dataclass field. For inputs:
            None is positional input 0, an int a positional input, a str a named argument (passed
            by keyword or positionally). A tuple applies its selectors in turn (nested outputs).
        reduction: None, the name of a capture-time reduction in
            :data:`~distillx.features.REDUCTIONS`, or a callable ``f(feature, **reduction_kwargs)``.
        reduction_kwargs: options of the reduction (checked against its signature here).
        key: where the feature appears in :attr:`FeatureExtractor.features`; default
            :attr:`default_key`.

    String shorthand (:meth:`parse`): ``"PATH[@input|@output][:SELECT]"``, e.g. ``"layer3"``,
    ``"encoder.layer.5.attention.self:0"``, ``"attn@input:hidden_states"``. SELECT is an int when
    it looks like one.
    """

    path: str
    capture: str = "output"
    select: Union[None, Selector, Tuple[Selector, ...]] = None
    reduction: Union[None, str, Callable[..., Any]] = None
    reduction_kwargs: Mapping[str, Any] = field(default_factory=dict, hash=False)
    key: Optional[str] = None

    def __post_init__(self):
        if not isinstance(self.path, str) or not self.path:
            raise ValueError(f"FeatureSpec.path must be a non-empty string, got {self.path!r}")
        if self.capture not in CAPTURES:
            raise ValueError(f"FeatureSpec.capture must be one of {CAPTURES}, got {self.capture!r}")
        if self.path == PENULTIMATE and self.capture != "input":
            # The penultimate feature *is* an input; FeatureRequest's default capture="output" maps here.
            object.__setattr__(self, "capture", "input")
        if isinstance(self.select, list):
            object.__setattr__(self, "select", tuple(self.select))
        if isinstance(self.select, tuple):
            if not self.select:
                raise ValueError("FeatureSpec.select must not be an empty tuple; use None")
            for s in self.select:
                _check_selector(s, "FeatureSpec.select entries")
        elif self.select is not None:
            _check_selector(self.select, "FeatureSpec.select")
        if self.key is not None and (not isinstance(self.key, str) or not self.key):
            raise ValueError(f"FeatureSpec.key must be None or a non-empty string, got {self.key!r}")
        if not isinstance(self.reduction_kwargs, Mapping):
            raise TypeError(f"FeatureSpec.reduction_kwargs must be a mapping, got {type(self.reduction_kwargs).__name__}")
        object.__setattr__(self, "reduction_kwargs", dict(self.reduction_kwargs))
        fn = self.reduction_fn
        if fn is None:
            if self.reduction_kwargs:
                raise ValueError(f"FeatureSpec {self.path!r}: reduction_kwargs given without a reduction")
            return
        try:
            inspect.signature(fn).bind(None, **self.reduction_kwargs)
        except TypeError as e:
            options = [p for p in list(inspect.signature(fn).parameters)[1:]]
            raise ValueError(f"FeatureSpec {self.path!r}: bad reduction_kwargs {self.reduction_kwargs!r} for "
                             f"reduction {self.reduction_name!r} ({e}); its options: {', '.join(options) or 'none'}"
                             ) from None
        except ValueError:  # a builtin without a signature: accept as given
            pass

    @property
    def reduction_fn(self) -> Optional[Callable[..., Any]]:
        """The reduction as a callable (None without one)."""
        if self.reduction is None or callable(self.reduction):
            return self.reduction
        if isinstance(self.reduction, str) and self.reduction in REDUCTIONS:
            return REDUCTIONS[self.reduction]
        raise ValueError(f"FeatureSpec {self.path!r}: unknown reduction {self.reduction!r}; built-in reductions: "
                         f"{', '.join(REDUCTIONS)} (or pass a callable)")

    @property
    def reduction_name(self) -> Optional[str]:
        r = self.reduction
        return r if r is None or isinstance(r, str) else getattr(r, "__name__", repr(r))

    @property
    def shorthand(self) -> str:
        """The string form ``PATH[@input][:SELECT]`` (without the reduction)."""
        text = self.path + ("@input" if self.capture == "input" and self.path != PENULTIMATE else "")
        if self.select is not None:
            sel = self.select if isinstance(self.select, tuple) else (self.select,)
            text += ":" + ":".join(map(str, sel))
        return text

    @property
    def identity(self) -> str:
        """Everything that decides the captured value, as a stable string (what a teacher cache's
        fingerprint records): path, capture, selection, reduction (a callable by module and
        qualified name) and its options; not the key."""
        r = self.reduction
        reduction = r if r is None or isinstance(r, str) else \
            f"{getattr(r, '__module__', '?')}.{getattr(r, '__qualname__', type(r).__qualname__)}"
        options = ", ".join(f"{k}={v!r}" for k, v in sorted(self.reduction_kwargs.items()))
        return f"{self.shorthand}@{self.capture} reduction={reduction}({options})"

    @property
    def default_key(self) -> str:
        """``key`` if set, else :attr:`shorthand`."""
        return self.key if self.key is not None else self.shorthand

    @classmethod
    def parse(cls, text: str, **fields: Any) -> "FeatureSpec":
        """Build a spec from the shorthand ``"PATH[@input|@output][:SELECT[:SELECT...]]"``.

        ``fields`` set the other fields (``reduction=``, ``key=``, ...); a capture or select given
        both in ``text`` and in ``fields`` must agree.
        """
        if not isinstance(text, str) or not text:
            raise ValueError(f"a feature must be a non-empty string or a FeatureSpec, got {text!r}")
        path, *sel_parts = text.split(":")
        parsed: dict[str, Any] = {}
        if "@" in path:
            path, _, capture = path.rpartition("@")
            if capture not in CAPTURES:
                raise ValueError(f"feature {text!r}: '@{capture}' must be one of "
                                 + ", ".join("@" + c for c in CAPTURES))
            parsed["capture"] = capture
        if sel_parts:
            if any(not s for s in sel_parts):
                raise ValueError(f"feature {text!r}: empty selector after ':'")
            sel = tuple(int(s) if _INT.fullmatch(s) else s for s in sel_parts)
            parsed["select"] = sel[0] if len(sel) == 1 else sel
        defaults = {"capture": "output", "select": None}
        for name, value in parsed.items():
            given = fields.get(name, defaults[name])
            if given != defaults[name] and given != value:
                raise ValueError(f"feature {text!r} says {name}={value!r} but {name}={given!r} was also given")
        return cls(path=path, **{**fields, **parsed})

    @classmethod
    def from_request(cls, request: Any, side: str) -> "FeatureSpec":
        """The ``side`` (``"student"`` or ``"teacher"``) half of a method's ``FeatureRequest``.

        The request's path may use the shorthand (``"blocks.-1:0"``). Optional request attributes
        ``select``/``reduction_kwargs`` (or per-side ``student_select``/``teacher_select``,
        ``student_reduction_kwargs``/...) are honoured when present.
        """
        if side not in ("student", "teacher"):
            raise ValueError(f"side must be 'student' or 'teacher', got {side!r}")
        path = getattr(request, side)

        def option(name, default):
            value = getattr(request, f"{side}_{name}", None)
            return value if value is not None else getattr(request, name, default)

        return cls.parse(path, capture=getattr(request, "capture", "output"), select=option("select", None),
                         reduction=getattr(request, "reduction", None),
                         reduction_kwargs=option("reduction_kwargs", None) or {}, key=request.key)

    def with_key(self, key: str) -> "FeatureSpec":
        return replace(self, key=key)


def normalize_requests(requests: Any, name: Optional[str]) -> dict[str, "FeatureSpec"]:
    """What a :class:`~distillx.features.FeatureExtractor` was asked for, as ``{key: FeatureSpec}``."""
    if requests is None:
        raise TypeError("requests must be a feature path, a FeatureSpec, or a list/dict of them, got None")
    if isinstance(requests, Mapping):
        items = [(key, value) for key, value in requests.items()]
    else:
        if isinstance(requests, (str, FeatureSpec)) or is_request(requests):
            requests = [requests]
        if not isinstance(requests, Iterable):
            raise TypeError(f"requests must be a feature path, a FeatureSpec, or a list/dict of them, "
                            f"got {type(requests).__name__}")
        items = [(None, value) for value in requests]
    specs: dict[str, FeatureSpec] = {}
    for key, value in items:
        if isinstance(value, str):
            spec = FeatureSpec.parse(value)
            default = value
        elif isinstance(value, FeatureSpec):
            spec, default = value, value.default_key
        elif is_request(value):
            if name not in ("student", "teacher"):
                raise TypeError(f"FeatureRequest {value.key!r} names a student and a teacher path; give the "
                                "extractor name='student' or name='teacher' to pick one")
            spec = FeatureSpec.from_request(value, name)
            default = spec.key
        else:
            raise TypeError(f"a feature request must be a string, a FeatureSpec or a FeatureRequest, got "
                            f"{type(value).__name__}")
        if key is not None and not (isinstance(key, str) and key):
            raise TypeError(f"feature keys must be non-empty strings, got {key!r}")
        key = key if key is not None else default
        if key in specs:
            raise ValueError(f"{model_label(name)}: two features share the key {key!r}; give them distinct keys "
                             "(FeatureSpec(key=...) or a dict of requests)")
        specs[key] = spec if spec.key == key else spec.with_key(key)
    return specs


def is_request(value: Any) -> bool:
    return all(hasattr(value, a) for a in ("key", "student", "teacher")) and not isinstance(value, (str, FeatureSpec))


__all__ = ["FeatureSpec", "PENULTIMATE"]
