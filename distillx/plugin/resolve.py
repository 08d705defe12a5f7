"""Names to objects: the registries are read here, by the layers that resolve a name (the
Distiller, configs, the CLI, and users through ``distillx.method``/``distillx.transfer``), never by
the ops, methods, transfers or augmentations themselves.

    dx.method("kfd", kernel="laplacian")        # a method; option values naming registry entries resolved
    dx.transfer("select", teacher, student)     # run a weight transfer strategy by name
    dx.plugin.augmentation("mixup", alpha=0.2)  # build an augmentation by name
    dx.plugin.kernel("laplacian")               # a kernel: a built-in name, or a plugin's callable
    dx.plugin.logger("tensorboard", run_dir="runs/a")   # a metrics logger
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Optional, Union

from torch import nn

from ..augment import Augmentation
from ..kernels import BuiltinKernel
from ..loggers import check_logger
from ..ops.kernel_table import NamedKernel
from ..transfer import EnsembleMember, Transfer, TransferReport, run_strategy
from .manager import get_registries


def kernel(name: Any):
    """A kernel for the losses: a built-in name stays a name (its fused path) while the registry
    holds the built-in entry; a kernel a plugin registered (or a plugin's override of a built-in
    name) is its callable, wrapped in a :class:`~distillx.ops.kernel_table.NamedKernel` that calls it
    unchanged and carries the name, so an error about its result names it; a callable is kept. An
    unknown name lists the registered kernels."""
    if not isinstance(name, str):
        return name
    entry = get_registries().kernels.get(name)
    return name if isinstance(entry, BuiltinKernel) and entry.name == name else NamedKernel(name, entry)


def method(name: str, **options: Any):
    """Build the registered distillation method ``name`` with ``options``.

    >>> dx.method("kd", T=2.0, divergence="jsd", weight=0.5)    # doctest: +SKIP

    Options the method lists in ``registry_options`` (``{"kernel": "kernels"}``) that hold a name are
    looked up in that registry first. Raises :class:`~distillx.plugin.UnknownNameError` (a
    ``KeyError`` and ``ValueError``) listing the registered methods for an unknown ``name``, and
    ``TypeError`` naming the option and the valid ones for an unknown option.
    """
    cls = get_registries().methods.get(name)
    resolvers = {"kernels": kernel}
    for option, registry in getattr(cls, "registry_options", {}).items():
        if isinstance(options.get(option), str) and registry in resolvers:
            try:
                options[option] = resolvers[registry](options[option])
            except KeyError as exc:  # UnknownNameError: name the method and the option
                raise type(exc)(f"method {name!r}: option {option}: {exc}") from None
    return cls(**options)


def augmentation(name: str, **options: Any):
    """Build the registered augmentation ``name`` with ``options``.

    The registry entry may be an :class:`~distillx.augment.Augmentation` subclass (unknown options
    are a ``TypeError`` listing the valid ones, bad values a ``ValueError`` naming the option), an
    :class:`~distillx.augment.Augmentation` instance (returned as is, or rebuilt with ``options``
    overriding its own), or any factory ``(**options) -> callable`` whose result is called as
    ``(inputs, targets, generator) -> (inputs, targets)``. An unknown ``name`` raises
    :class:`~distillx.plugin.UnknownNameError` listing the registered augmentations.
    """
    entry = get_registries().augmentations.entry(name)
    obj = entry.obj
    if isinstance(obj, Augmentation):
        aug = type(obj)(**{**obj.config(), **options}) if options else obj
    else:
        aug = obj(**options)
    if not callable(aug):
        raise TypeError(f"augmentation {name!r} (plugin {entry.provider!r}) built a {type(aug).__name__}, which is "
                        "not callable as (inputs, targets, generator) -> (inputs, targets)")
    return aug


def resolve_augmentation(spec: Any):
    """An augmentation from a config entry: a name, ``{"name": ..., **options}``, or a callable (kept)."""
    if isinstance(spec, str):
        return augmentation(spec)
    if isinstance(spec, Mapping):
        options = dict(spec)
        if not isinstance(options.get("name"), str):
            raise ValueError(f"an augmentation given as a mapping needs a 'name' string, got {spec!r}")
        return augmentation(options.pop("name"), **options)
    if callable(spec):
        return spec
    raise TypeError(f"an augmentation must be a registered name, a mapping with 'name' and options, or a callable "
                    f"(inputs, targets, generator) -> (inputs, targets); got {type(spec).__name__}")


def logger(name: str, run_dir: Optional[str] = None, **options: Any):
    """Build the registered metrics logger ``name``: ``factory(run_dir=run_dir, **options)``.

    An unknown ``name`` raises :class:`~distillx.plugin.UnknownNameError` listing the registered
    loggers; what the factory raises (a bad option, a missing package) propagates with the logger's
    name; a result without ``log_step``/``log_epoch`` is a ``TypeError`` naming the plugin.
    """
    entry = get_registries().loggers.entry(name)
    try:
        built = entry.obj(run_dir=run_dir, **options)
    except TypeError as exc:  # an unknown option: name the logger
        raise TypeError(f"logger {name!r} (plugin {entry.provider!r}): {exc}") from None
    return check_logger(built, f"logger {name!r} (plugin {entry.provider!r})'s result")


def transfer(name: str, teacher: Optional[nn.Module] = None, student: Optional[nn.Module] = None, *,
             n: Optional[int] = None, allow_empty: bool = False, **options: Any
             ) -> Union[TransferReport, list[EnsembleMember], Transfer]:
    """Run the weight transfer ``name`` from ``teacher`` into ``student`` (``dx.transfer``).

    The strategy comes from the plugin registry (built-ins: ``direct``, ``distribution``,
    ``select``, ``layer_map``, ``head_fit``; plugins add more; ``distillx plugins`` lists them);
    :func:`distillx.transfer.run_strategy` runs it on a copy and writes into ``student`` only on success
    (``n=k``: an ensemble of ``k`` new students). Without ``teacher``/``student`` it returns a
    :class:`~distillx.transfer.Transfer`, validated now and applied later
    (``dx.Distiller(..., transfer=dx.transfer("head_fit", calibration=loader))``).

    Raises :class:`~distillx.plugin.UnknownNameError` for an unknown ``name``, ``TypeError`` for
    non-module models or unknown options, :class:`~distillx.transfer.TransferError` (a
    ``ValueError``) when the transfer cannot be done, and whatever the strategy raises.

    >>> report = dx.transfer("select", teacher, student)                   # doctest: +SKIP
    >>> students = [m.student for m in dx.transfer("distribution", teacher, student, n=4, seed=0)]  # doctest: +SKIP
    """
    strategy = get_registries().transfers.get(name)
    if teacher is None and student is None:
        return Transfer(name, strategy, dict(options), n, allow_empty)
    if teacher is None or student is None:
        raise TypeError("distillx.transfer needs both teacher and student (or neither, for a deferred Transfer)")
    return run_strategy(name, strategy, teacher, student, n=n, allow_empty=allow_empty, **options)


__all__ = ["kernel", "method", "augmentation", "resolve_augmentation", "transfer", "logger"]
