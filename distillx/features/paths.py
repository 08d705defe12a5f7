"""Dotted module paths: unwrapping DataParallel/DDP/``torch.compile`` wrappers and resolving
``layer3``, ``encoder.layer.5.attention.self``, ``blocks.-1`` to modules, with helpful errors."""
from __future__ import annotations

import difflib
from typing import Optional

from torch import nn

# Attribute under which a wrapper keeps the wrapped model: DataParallel/DDP ("module"),
# torch.compile's OptimizedModule ("_orig_mod"), FSDP1 and activation checkpointing wrappers.
WRAPPER_ATTRS = ("module", "_orig_mod", "_fsdp_wrapped_module", "_checkpoint_wrapped_module")
# PEFT: a PeftModel keeps its tuner under "base_model", the tuner (LoraModel, ...) the user's model
# under "model". Recognised by the class's package (peft is never imported here): the inner model
# also gets a ``peft_config`` attribute, so that attribute cannot tell the wrapper apart.
PEFT_PACKAGE = "peft."
PEFT_ATTRS = ("base_model", "model")


class FeaturePathError(LookupError, ValueError):
    """A feature path names no module of the model (message lists the closest existing paths)."""

    def __str__(self) -> str:  # LookupError/KeyError-style repr quoting would hide the newlines
        return str(self.args[0]) if self.args else ""


def model_label(name: Optional[str]) -> str:
    return f"{name} model" if name else "model"


def _wrapped(module: nn.Module) -> Optional[nn.Module]:
    """The model inside ``module`` if ``module`` is a wrapper, else None.

    Known wrappers (DataParallel, DistributedDataParallel, OptimizedModule, PEFT's ``PeftModel``
    and its tuner model, so ``PeftModel -> LoraModel -> the user's model``) and any module whose
    only child sits under one of :data:`WRAPPER_ATTRS` and which owns no parameters of its own
    (a DDP-like wrapper with ``.module``).
    """
    children = [(n, c) for n, c in module._modules.items() if c is not None]
    if len(children) == 1 and children[0][0] in WRAPPER_ATTRS and not module._parameters:
        return children[0][1]
    # DataParallel/DDP/OptimizedModule even if they grew other children
    if isinstance(module, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
        return module._modules.get("module")
    if type(module).__name__ == "OptimizedModule":  # checked by name: importing torch._dynamo is slow
        return module._modules.get("_orig_mod")
    if is_peft_model(module):
        return next((module._modules[a] for a in PEFT_ATTRS if module._modules.get(a) is not None), None)
    return None


def is_peft_model(model: object) -> bool:
    """Whether ``model`` is a PEFT wrapper (``PeftModel`` and its subclasses, or a tuner model such
    as ``LoraModel``), seen by its class's package, so peft is never imported for the check."""
    return isinstance(model, nn.Module) and type(model).__module__.startswith(PEFT_PACKAGE) \
        and any(model._modules.get(a) is not None for a in PEFT_ATTRS)


def unwrap_chain(model: nn.Module) -> list[nn.Module]:
    """``[model, inner, inner_of_inner, ...]`` through nested wrappers (e.g. DDP(compile(net)))."""
    chain = [model]
    while (inner := _wrapped(chain[-1])) is not None and all(inner is not m for m in chain):
        chain.append(inner)
    return chain


def unwrap_model(model: nn.Module) -> nn.Module:
    """The innermost model under DataParallel/DDP/``torch.compile``/FSDP1/PEFT wrappers."""
    return unwrap_chain(model)[-1]


def _is_index(seg: str) -> bool:
    return seg.lstrip("+-").isdigit()


def _indexable(module: nn.Module, names: list[str]) -> bool:
    return isinstance(module, (nn.Sequential, nn.ModuleList)) or names == [str(i) for i in range(len(names))]


class _Step(Exception):
    def __init__(self, message: str):
        self.message = message


def _child(module: nn.Module, seg: str, parent_path: str) -> tuple[nn.Module, str]:
    mods = module._modules
    child = mods.get(seg)
    if child is not None:
        return child, seg
    names = [n for n, c in mods.items() if c is not None]
    where = f"{parent_path!r}" if parent_path else "the model"
    kind = type(module).__name__
    if _is_index(seg) and _indexable(module, names):
        i, n = int(seg), len(names)
        if -n <= i < n:
            name = names[i]
            return mods[name], name
        valid = f"valid indices 0..{n - 1} or -{n}..-1" if n else "it is empty"
        raise _Step(f"index {i} is out of range for {where} ({kind} of length {n}; {valid})")
    if seg in module._parameters or seg in module._buffers:
        what = "a parameter" if seg in module._parameters else "a buffer"
        raise _Step(f"{seg!r} is {what} of {where}, not a module; hook the module {parent_path or '(the model)'!r}"
                    " itself")
    shown = ", ".join(names[:12]) + (f", ... ({len(names)} in all)" if len(names) > 12 else "")
    raise _Step(f"{where} ({kind}) has no submodule {seg!r}; its submodules: {shown or 'none'}")


def _walk(root: nn.Module, segments: list[str], stop_at: nn.Module) -> tuple[nn.Module, list[str]]:
    """Follow ``segments`` from ``root``; the returned names restart whenever ``stop_at`` is reached
    (so paths written through a wrapper come back relative to the innermost model)."""
    module, names = root, []
    for seg in segments:
        module, name = _child(module, seg, ".".join(names))
        names = [] if module is stop_at else names + [name]
    return module, names


def resolve_module(model: nn.Module, path: str, *, name: Optional[str] = None) -> tuple[nn.Module, str]:
    """The module at dotted ``path`` and its canonical path (relative to the unwrapped model, indices
    made non-negative), or :class:`FeaturePathError`.

    The path is tried against the innermost model first, then with its leading wrapper attributes
    (:data:`WRAPPER_ATTRS`) dropped, then against each enclosing wrapper, so ``"layer3"``,
    ``"module.layer3"`` and ``"module._orig_mod.layer3"`` all work on ``DDP(torch.compile(net))``, and ``"model.layers.-1"``
    and ``"base_model.model.model.layers.-1"`` on a ``PeftModel``. ``""`` is the model itself. ``name`` ("student"/"teacher") labels errors.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"{model_label(name)} must be an nn.Module, got {type(model).__name__}")
    if not isinstance(path, str):
        raise TypeError(f"a module path must be a string, got {type(path).__name__}")
    chain = unwrap_chain(model)
    base = chain[-1]
    if path == "":
        return base, ""
    segments = path.split(".")
    attempts = [(base, segments)]
    if len(chain) > 1:  # "module.x" / "module._orig_mod.x" / "_orig_mod.x" -> "x", whatever the wrapper nesting
        k = 0
        while k < len(segments) and segments[k] in WRAPPER_ATTRS:
            k += 1
        if k:
            attempts.append((base, segments[k:]))
        attempts += [(root, segments) for root in reversed(chain[:-1])]
    first_error = None
    for root, segs in attempts:
        try:
            module, names = _walk(root, segs, base)
            return module, ".".join(names)
        except _Step as e:
            first_error = first_error or e.message
    candidates = [n for n, _ in base.named_modules() if n]
    close = difflib.get_close_matches(path, candidates, n=5, cutoff=0.5)
    if not close:  # also compare the last few segments (the user may have the prefix right but not the tail)
        tail = ".".join(segments[-2:])
        close = difflib.get_close_matches(tail, candidates, n=5, cutoff=0.6)
    hint = f"\n  closest existing paths: {', '.join(close)}" if close else ""
    raise FeaturePathError(f"{model_label(name)}: no module at path {path!r}: {first_error}{hint}")


__all__ = ["FeaturePathError", "resolve_module", "unwrap_model", "unwrap_chain", "is_peft_model", "WRAPPER_ATTRS"]
