"""The hooks a distillx plugin may implement (pluggy project ``distillx``).

A plugin is any object (usually a module) with functions named after these hooks and decorated with
:data:`hookimpl`. Third-party packages expose theirs through the ``distillx`` entry-point group::

    # pyproject.toml
    [project.entry-points.distillx]
    myplugin = "my_package.distillx_plugin"

    # my_package/distillx_plugin.py
    from distillx.plugin import hookimpl

    @hookimpl
    def distillx_register_methods(registry):
        registry.add(MyMethod.name, MyMethod)

Plugins implement any subset of the hooks and may accept fewer arguments than the spec names.
The specs below only document the hooks; pluggy checks implementations against them.
"""
from __future__ import annotations

import pluggy

PROJECT = "distillx"

hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


# -- registration hooks ----------------------------------------------------------------------
# All five are historic and work the same way: each runs once per plugin, when that plugin is
# registered (before or after the manager was built), with the provider of every entry set to that
# plugin's name. If it raises, everything the plugin added is withdrawn and the plugin is
# reported as failed; the other plugins are unaffected.


@hookspec(historic=True)
def distillx_register_methods(registry):
    """Add distillation methods to ``registry`` (a :class:`distillx.plugin.Registry`).

    Call ``registry.add(name, cls)`` with a subclass of :class:`distillx.methods.Method` whose
    ``name`` attribute equals ``name``; users then build it with ``distillx.method(name, **options)``.
    A name that is already taken is an error unless you pass ``override=True``.

    Historic: plugins registered after the plugin manager was built still get this call.
    """


@hookspec(historic=True)
def distillx_register_weight_transfers(registry):
    """Add weight-transfer strategies to ``registry``.

    A strategy is a callable ``(teacher, student, **options) -> TransferReport`` that moves teacher
    parameters into the student and reports what it copied, adapted, sampled and skipped, and why.

    Historic: plugins registered after the plugin manager was built still get this call.
    """


@hookspec(historic=True)
def distillx_register_kernels(registry):
    """Add kernel functions (for kernel-function distillation and MMD) to ``registry``.

    A kernel is a callable ``(x, z) -> Tensor`` returning the (N, M) kernel matrix of the rows of
    ``x`` (N, D) and ``z`` (M, D). Third-party kernels run on the pure-PyTorch path; each result is
    checked (a floating-point tensor of shape (N, M), else an error naming the kernel by its name).

    Historic: plugins registered after the plugin manager was built still get this call.
    """


@hookspec(historic=True)
def distillx_register_augmentations(registry):
    """Add data augmentations applied to batches during distillation to ``registry``.

    An augmentation is an :class:`distillx.augment.Augmentation` subclass, or any factory
    ``(**options) -> callable(inputs, targets, generator) -> (inputs, targets)``.

    Historic: plugins registered after the plugin manager was built still get this call.
    """


@hookspec(historic=True)
def distillx_register_loggers(registry):
    """Add metrics loggers (W&B, MLflow, ...) to ``registry``, used by name in
    ``Distiller(loggers=[...])`` and ``[logging]`` of run configs.

    An entry is a factory ``(run_dir=None, **options) -> logger``: ``run_dir`` is the Distiller's
    ``checkpoint_dir`` (None without one), the options are the user's. A logger has
    ``log_step(phase, step, values)`` and ``log_epoch(phase, epoch, values)`` (optionally ``flush()``
    and ``close()``; see :class:`distillx.loggers.Logger`); it is built and called on rank 0 only. A
    logger that raises while logging is dropped with a warning naming it; training goes on.

    Historic: plugins registered after the plugin manager was built still get this call.
    """


# -- training events -------------------------------------------------------------------------
# Called by the Distiller through ``get_plugin_manager().hook`` for every registered plugin, for
# loggers and callbacks. Return values are ignored. An exception propagates and stops training:
# a callback that fails should not be silently skipped.


@hookspec
def distillx_on_fit_start(distiller):
    """Called once when ``distiller.fit()`` starts, before the first batch.

    ``distiller`` is the :class:`distillx.Distiller`; its teacher, student, methods and settings
    are readable. Do not replace its models here.
    """


@hookspec
def distillx_on_epoch_end(distiller, epoch, metrics):
    """Called after each epoch, including its evaluation, and after its checkpoint is written (with
    ``checkpoint_dir``): a hook that raises stops the run, and ``fit(resume=...)`` continues after
    this epoch.

    ``epoch`` is the index of the epoch that just finished, counting from 0. ``metrics`` is a
    ``dict[str, float]`` of that epoch's results (e.g. total loss, each method's weighted loss,
    validation accuracy); treat it as read-only.
    """


@hookspec
def distillx_on_fit_end(distiller, metrics):
    """Called once when ``distiller.fit()`` finishes normally.

    ``metrics`` is the ``dict[str, float]`` of final results (the last epoch's metrics plus any
    final evaluation); treat it as read-only.
    """
