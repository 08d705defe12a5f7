"""FeatureExtractor: forward (pre-)hooks that capture, select and reduce intermediate features."""
from __future__ import annotations

import contextlib
import inspect
from collections.abc import Iterable, Mapping
from typing import Any, Callable, Iterator, Optional, Union

import torch
from torch import nn
from torch.utils._pytree import tree_map_only

from .paths import model_label, resolve_module, unwrap_chain
from .penultimate import Probe, tensors_in
from .spec import PENULTIMATE, FeatureSpec, normalize_requests

Request = Union[str, FeatureSpec, Any]  # Any: a FeatureRequest-like object (key/student/teacher/...)


class FeatureCaptureError(RuntimeError):
    """A hook could not select or reduce the captured value, or the value changed after capture."""


class MissingFeatureError(KeyError):
    """A requested feature was not captured in the last forward pass (the message says why it may be)."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class _PerDevice(dict):
    """device index -> chunk, for multi-GPU DataParallel whose replicas each run the hooks."""


def _describe(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return f"a Tensor of shape {tuple(value.shape)}"
    if isinstance(value, tuple) and hasattr(value, "_fields"):
        return f"a {type(value).__name__} (namedtuple) with fields {', '.join(value._fields)}"
    if isinstance(value, (tuple, list)):
        return f"a {type(value).__name__} of length {len(value)} ({', '.join(type(v).__name__ for v in value)})"
    if isinstance(value, Mapping):
        return f"a {type(value).__name__} with keys {', '.join(map(repr, value.keys()))}"
    fields = getattr(value, "__dataclass_fields__", None)
    if fields:
        return f"a {type(value).__name__} with fields {', '.join(fields)}"
    return f"a {type(value).__name__}"


def _select(value: Any, selectors: tuple, context: Callable[[], str]) -> Any:
    for s in selectors:
        if isinstance(value, torch.Tensor):
            raise FeatureCaptureError(f"{context()}: cannot apply select={s!r} to {_describe(value)} "
                                      "(select picks an element of a tuple/dict/dataclass output; it never "
                                      "indexes a tensor)")
        try:
            if isinstance(s, int) or isinstance(value, Mapping):
                value = value[s]
            elif s in (getattr(value, "_fields", None) or getattr(value, "__dataclass_fields__", None) or ()):
                value = getattr(value, s)  # a namedtuple or dataclass field, never a method like tuple.count
            else:
                raise KeyError(s)
        except (IndexError, KeyError, TypeError):
            raise FeatureCaptureError(f"{context()}: cannot apply select={s!r} to {_describe(value)}") from None
    return value


def _positional_names(module: nn.Module) -> dict[str, int]:
    try:
        params = inspect.signature(module.forward).parameters.values()
    except (TypeError, ValueError):
        return {}
    names = {}
    for i, p in enumerate(params):
        if p.kind not in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD):
            break
        names[p.name] = i
    return names


class _Capture:
    """One spec bound to one module: how to turn a hook's arguments into the stored value."""

    __slots__ = ("key", "spec", "module", "path", "label", "selectors", "reduce", "reduce_kwargs", "arg_index")

    def __init__(self, key: str, spec: FeatureSpec, module: Optional[nn.Module], path: Optional[str], label: str):
        self.key, self.spec, self.module, self.path, self.label = key, spec, module, path, label
        sel = spec.select
        self.selectors = () if sel is None else sel if isinstance(sel, tuple) else (sel,)
        self.reduce = spec.reduction_fn
        self.reduce_kwargs = dict(spec.reduction_kwargs)
        self.arg_index = _positional_names(module) if module is not None and spec.capture == "input" else {}

    def where(self) -> str:
        if self.spec.path == PENULTIMATE:
            target = PENULTIMATE if self.path is None else f"{PENULTIMATE} = input of {self.path or '(the model)'!r}"
        else:
            target = f"{self.spec.capture} of {self.path!r}"
        return f"feature {self.key!r} ({target})"

    def context(self) -> str:
        return f"{self.label}: {self.where()}"


class FeatureExtractor:
    """Capture intermediate features of ``model`` with hooks on modules named by dotted path.

    ::

        with FeatureExtractor(model, ["layer3", FeatureSpec("layer4", reduction="attention_map")]) as ex:
            logits = model(x)
            feats = ex.features                  # {"layer3": Tensor, "layer4": Tensor (B, H*W)}

    Args:
        model: the model, possibly wrapped in DataParallel/DDP/``torch.compile`` (paths resolve with
            or without the ``module.``/``_orig_mod.`` prefix; hooks go on the wrapped modules).
        requests: features to capture: an iterable of strings (shorthand, keyed by the string
            itself), :class:`FeatureSpec` (keyed by ``spec.default_key``) or method
            ``FeatureRequest``s (keyed by ``request.key``; needs ``name`` = ``"student"``/``"teacher"``
            to pick the path); or a mapping ``key -> string | FeatureSpec``.
        name: the model's side, ``"student"``/``"teacher"`` (used in error messages and to read
            ``FeatureRequest`` paths).
        detach: store detached tensors; the reduction then builds no autograd graph. Use it (or its
            alias ``no_grad=True``) for the teacher.
        clone: store a copy of unreduced tensors (needed when the model later modifies the captured
            tensor in place, which is otherwise detected and reported on read).
        clear_on_forward: clear captured features at the start of every forward pass of ``model``,
            so a module that did not run leaves no stale feature.

    Reading (``features``, :meth:`collect`, ``ex[key]``) checks that an unreduced, uncloned tensor was
    not modified in place after capture, and turns tensors captured under ``torch.inference_mode()``
    into normal tensors (one copy, on the first read outside inference mode), since inference
    tensors cannot enter a loss that is differentiated.

    Lifecycle: hooks are registered by ``attach()``/``with`` and all removed by ``close()``/the
    end of the outermost ``with`` (nesting is counted; the object is reusable). Features stay
    readable after exit until the next attach or :meth:`clear`.

    ``torch.compile``: attach before the compiled model's first call (hooks are compiled in; the
    features come out as usual). Compiled code does not see hooks added to modules that had none
    when it was compiled (``torch._dynamo.config.skip_nnmodule_hook_guards``): features then go
    missing and :meth:`collect`/``ex[key]`` say so; ``torch.compiler.reset()`` after attaching
    fixes it. Removing hooks is always seen.
    """

    def __init__(self, model: nn.Module, requests: Union[Request, Iterable[Request], Mapping[str, Request]], *,
                 name: Optional[str] = None, detach: bool = False, no_grad: bool = False, clone: bool = False,
                 clear_on_forward: bool = True):
        if not isinstance(model, nn.Module):
            raise TypeError(f"{model_label(name)} must be an nn.Module, got {type(model).__name__}")
        if name is not None and not isinstance(name, str):
            raise TypeError(f"name must be None or a string, got {name!r}")
        self.model = model
        self.name = name
        self.detach = bool(detach or no_grad)
        self.clone = bool(clone)
        self.clear_on_forward = bool(clear_on_forward)
        self.specs: dict[str, FeatureSpec] = normalize_requests(requests, name)
        self._captures: dict[str, _Capture] = {}
        self._penultimate: Optional[tuple[nn.Module, str]] = None
        self._probe: Optional[Probe] = None
        self._probe_handle = None
        self._handles: list = []
        self._depth = 0
        self._paused = False  # hooks capture nothing while set (see paused())
        self._captured: dict[str, Any] = {}
        self._versions: dict[str, int] = {}
        self._resolve()  # fail fast on bad paths

    @classmethod
    def from_requests(cls, model: nn.Module, requests: Iterable[Any], side: str, **kwargs: Any) -> "FeatureExtractor":
        """One side of a method's ``FeatureRequest``s; the teacher side is detached unless told otherwise."""
        if side not in ("student", "teacher"):
            raise ValueError(f"side must be 'student' or 'teacher', got {side!r}")
        kwargs.setdefault("detach", side == "teacher")
        return cls(model, list(requests), name=side, **kwargs)

    # -- resolution and hooks ---------------------------------------------------------------
    def _resolve(self) -> None:
        captures = {}
        for key, spec in self.specs.items():
            if spec.path == PENULTIMATE:
                module, path = self._penultimate if self._penultimate is not None else (None, None)
            else:
                module, path = resolve_module(self.model, spec.path, name=self.name)
            captures[key] = _Capture(key, spec, module, path, model_label(self.name))
        self._captures = captures
        self._wants_mask = any(getattr(c.reduce, "takes_attention_mask", False) for c in captures.values())
        self._model_args = _positional_names(unwrap_chain(self.model)[-1]) if self._wants_mask else {}
        self._mask = None
        chain = unwrap_chain(self.model)
        dp = next((m for m in chain if isinstance(m, nn.DataParallel)), None)
        self._gather = (dp.dim, list(dp.device_ids), dp.output_device) \
            if dp is not None and len(dp.device_ids) > 1 else None
        self._compiled = any(type(m).__name__ == "OptimizedModule" or getattr(m, "_compiled_call_impl", None)
                             is not None for m in chain)

    def _register(self, cap: _Capture) -> None:
        if cap.spec.capture == "input":
            def pre_hook(module, args, kwargs):
                self._store(cap, self._pick_input(cap, args, kwargs))
            self._handles.append(cap.module.register_forward_pre_hook(pre_hook, with_kwargs=True))
        else:
            def hook(module, args, output):
                self._store(cap, _select(output, cap.selectors, cap.context))
            self._handles.append(cap.module.register_forward_hook(hook))

    def attach(self) -> "FeatureExtractor":
        """Register the hooks (a no-op besides counting if already attached); returns ``self``."""
        if self._depth == 0:
            self._resolve()
            self.clear()
            try:
                for cap in self._captures.values():
                    if cap.module is not None:
                        self._register(cap)
                if any(cap.module is None for cap in self._captures.values()):
                    self._probe = Probe(self.model)
                    self._probe_handle = self.model.register_forward_hook(self._after_probe)
                if self.clear_on_forward or self._wants_mask:  # prepended: before any capture hook on the model
                    self._handles.append(self.model.register_forward_pre_hook(self._on_model_call, prepend=True,
                                                                              with_kwargs=True))
            except BaseException:
                self._remove_hooks()
                raise
        self._depth += 1
        return self

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """While active, the hooks capture nothing and the captured features stay as they are: for a
        model called for another purpose between two captures (sampling a completion from it)."""
        before, self._paused = self._paused, True
        try:
            yield
        finally:
            self._paused = before

    def _on_model_call(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        if self._paused:
            return
        if self.clear_on_forward:
            self.clear()
        if self._wants_mask:  # the batch's attention mask, for reductions that leave padding out
            mask = kwargs.get("attention_mask")
            index = self._model_args.get("attention_mask")
            if mask is None and index is not None and index < len(args):
                mask = args[index]
            self._mask = mask

    def close(self) -> None:
        """Remove every hook this extractor registered (captured features stay readable)."""
        self._remove_hooks()
        self._depth = 0

    def _remove_hooks(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        if self._probe is not None:
            self._probe.remove()
            self._probe = None
        if self._probe_handle is not None:
            self._probe_handle.remove()
            self._probe_handle = None

    def __enter__(self) -> "FeatureExtractor":
        return self.attach()

    def __exit__(self, *exc: Any) -> None:
        self._depth -= 1
        if self._depth <= 0:
            self.close()

    @property
    def attached(self) -> bool:
        return self._depth > 0

    # -- the penultimate feature ------------------------------------------------------------
    def _after_probe(self, module: nn.Module, args: Any, output: Any) -> None:
        probe = self._probe
        if probe is None or self._paused:
            return
        rec = probe.choose(output, self.name)
        records = [rec] if self._gather is None else [r for r in probe.records if r.path == rec.path]
        probe.remove()
        self._probe = None
        self._probe_handle.remove()  # safe: torch iterates over a snapshot of the hooks
        self._probe_handle = None
        # by path, not rec.module: under multi-GPU DataParallel the record holds a per-pass replica
        module, path = resolve_module(self.model, rec.path, name=self.name)
        self._penultimate = (module, path)
        for key, cap in list(self._captures.items()):
            if cap.module is None:
                cap = self._captures[key] = _Capture(key, cap.spec, module, path, cap.label)
                for r in records:
                    self._store(cap, self._pick_input(cap, r.args, r.kwargs))
                self._register(cap)  # later passes hook the output layer directly

    @property
    def paths(self) -> dict[str, Optional[str]]:
        """key -> canonical module path ('' is the model; None: penultimate not yet found)."""
        return {key: cap.path for key, cap in self._captures.items()}

    # -- capture ----------------------------------------------------------------------------
    def _pick_input(self, cap: _Capture, args: tuple, kwargs: dict) -> Any:
        head, rest = (cap.selectors[0], cap.selectors[1:]) if cap.selectors else (0, ())
        if isinstance(head, int):
            if -len(args) <= head < len(args):
                return _select(args[head], rest, cap.context)
        elif head in kwargs:
            return _select(kwargs[head], rest, cap.context)
        elif cap.arg_index.get(head, len(args)) < len(args):
            return _select(args[cap.arg_index[head]], rest, cap.context)
        kw = ", ".join(map(repr, kwargs)) or "none"
        why = (f"argument {head!r} was not passed (its default applies)" if head in cap.arg_index
               else f"there is no input {head!r}")
        raise FeatureCaptureError(f"{cap.context()}: the module was called with "
                                  f"{len(args)} positional input(s) and keyword inputs {kw}; {why} "
                                  "(choose an input with select=<index or argument name>)")

    def _store(self, cap: _Capture, value: Any) -> None:
        if self._paused:
            return
        if self.detach:
            value = tree_map_only(torch.Tensor, torch.Tensor.detach, value)
        if cap.reduce is not None:
            try:
                if self._wants_mask and getattr(cap.reduce, "takes_attention_mask", False):
                    value = cap.reduce(value, **cap.reduce_kwargs, attention_mask=self._mask)
                else:
                    value = cap.reduce(value, **cap.reduce_kwargs)
            except (TypeError, ValueError) as e:
                hint = (" (pick a tensor with select= or the 'path:index' shorthand)"
                        if not isinstance(value, torch.Tensor) else "")
                raise FeatureCaptureError(f"{cap.context()}: reduction "
                                          f"{cap.spec.reduction_name!r} failed on {_describe(value)}: {e}{hint}"
                                          ) from e
        elif self.clone:
            value = tree_map_only(torch.Tensor, torch.Tensor.clone, value)
        elif (isinstance(value, torch.Tensor) and self._gather is None and not torch.compiler.is_compiling()
              and not value.is_inference()):
            self._versions[cap.key] = value._version
        if self._gather is None:
            self._captured[cap.key] = value
        else:  # each DataParallel replica stores its chunk; merged on read
            device = next(iter(tensors_in(value)), torch.empty(0)).device
            self._captured.setdefault(cap.key, _PerDevice())[device.index] = value

    def clear(self) -> None:
        """Forget the captured features."""
        self._captured.clear()
        self._versions.clear()
        if self._probe is not None:  # a pass that failed midway must not leave records behind
            self._probe.records.clear()

    # -- reading ----------------------------------------------------------------------------
    def _read(self, key: str) -> Any:
        value = self._captured[key]
        if isinstance(value, _PerDevice):
            value = self._merge(key, value)
        version = self._versions.get(key)
        if version is not None and not value.is_inference() and value._version != version:
            raise FeatureCaptureError(
                f"{self._captures[key].context()} was modified in place after it was "
                "captured (e.g. by a later ReLU(inplace=True) or '+='), so it no longer holds what the module "
                "produced; pass clone=True, add a reduction, or capture a module after the in-place op")
        if not torch.is_inference_mode_enabled() and any(t.is_inference() for t in tensors_in(value)):
            # Inference tensors cannot be saved for backward, so a student loss could not use them:
            # copy once into normal tensors (cached, so repeated reads return the same objects).
            value = tree_map_only(torch.Tensor, lambda t: t.clone() if t.is_inference() else t, value)
            self._captured[key] = value
            self._versions.pop(key, None)
        return value

    def _merge(self, key: str, chunks: _PerDevice) -> Any:
        dim, order, output_device = self._gather
        parts = [chunks[d] for d in order if d in chunks]
        if len(parts) == 1:
            return parts[0]
        if not all(isinstance(p, torch.Tensor) for p in parts):
            raise FeatureCaptureError(f"{self._captures[key].context()} was captured on "
                                      f"{len(parts)} DataParallel replicas as {_describe(parts[0])}; only tensor "
                                      "features can be gathered (use DistributedDataParallel)")
        target = parts[0].device if output_device is None else torch.device("cuda", output_device)
        return torch.cat([p.to(target) for p in parts], dim=dim)

    @property
    def features(self) -> dict[str, Any]:
        """key -> captured value for every feature captured since the last clear (a new dict)."""
        return {key: self._read(key) for key in list(self._captured)}

    def collect(self, strict: bool = True) -> dict[str, Any]:
        """The captured features; with ``strict``, every requested key or :class:`MissingFeatureError`."""
        if strict:
            missing = [k for k in self.specs if k not in self._captured]
            if missing:
                raise self._missing(missing)
        return self.features

    def __getitem__(self, key: str) -> Any:
        if key not in self.specs:
            raise KeyError(f"{model_label(self.name)}: no feature {key!r} was requested; requested: "
                           f"{', '.join(map(repr, self.specs)) or 'none'}")
        if key not in self._captured:
            raise self._missing([key])
        return self._read(key)

    def _missing(self, keys: list[str]) -> MissingFeatureError:
        what = "; ".join(self._captures[k].where() for k in keys)
        if not self.attached:
            why = "the extractor is not attached (use `with extractor:` or extractor.attach() before the forward)"
        else:
            why = "the module did not run in the last forward pass of the model"
            if self._compiled:
                why += (", or the torch.compile'd model ran before the hooks were attached and its compiled code "
                        "does not see them: attach before the first compiled call, or call torch.compiler.reset() "
                        "after attaching")
        return MissingFeatureError(f"{model_label(self.name)}: not captured: {what}. Reason: {why}")

    def __repr__(self) -> str:
        keys = ", ".join(f"{k!r}: {cap.path if cap.path is not None else PENULTIMATE!r}"
                         for k, cap in self._captures.items())
        return (f"FeatureExtractor({model_label(self.name)}, {{{keys}}}, detach={self.detach}, "
                f"attached={self.attached})")


__all__ = ["FeatureExtractor", "FeatureCaptureError", "MissingFeatureError"]
