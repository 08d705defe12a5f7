"""The one template every op family follows on the Python side, and the dispatcher facts it uses.

An op family is a module ``distillx/ops/<family>.py`` that, at import,

1. registers each of its ``distillx::*`` schemas with :func:`register` (fake kernel for
   ``torch.compile``/``opcheck``, autograd formula), which does nothing when the compiled core did not
   define the schema (no build: the family serves its reference instead);
2. exposes a wrapper per user-facing loss that takes inputs :mod:`distillx.functional` already
   validated, asks :func:`use_kernel` whether the compiled core serves the device, and calls either
   ``torch.ops.distillx.<op>`` or the reference in :mod:`distillx.ops.reference`.

Which ops exist and which devices have kernels is read from PyTorch's dispatcher
(:func:`library_ops`, :func:`has_kernel`), never from a hand-kept list, so an op added to
``csrc/distillx.cpp`` is known everywhere at once; :func:`missing_python_side` names schemas that no
family registered (the test suite fails on them).
"""
from __future__ import annotations

import warnings
from typing import Callable, Optional, Sequence

import torch

from .. import _ext

NAMESPACE = "distillx"
# Divergence codes of the C++ kernels (csrc/include/distillx/logit_divergence.h).
DIVERGENCE_CODES = {"kl": 0, "reverse_kl": 1, "jsd": 2}
DIVERGENCE_NAMES = {code: name for name, code in DIVERGENCE_CODES.items()}
_DEVICE_KEYS = (("cpu", "CPU"), ("cuda", "CUDA"))


def library_ops() -> tuple[str, ...]:
    """Every ``distillx::*`` operator the loaded compiled core defines (bare names, sorted)."""
    if not _ext.available():
        return ()
    prefix = NAMESPACE + "::"
    return tuple(sorted({name[len(prefix):].split(".")[0] for name in torch._C._dispatch_get_all_op_names()
                         if name.startswith(prefix)}))


def _kernel_table() -> dict:
    # Read once: the dispatcher query is not traceable by torch.compile, a dict lookup is.
    return {(op, dev): torch._C._dispatch_has_kernel_for_dispatch_key(f"{NAMESPACE}::{op}", key)
            for op in library_ops() for dev, key in _DEVICE_KEYS}


_KERNELS = _kernel_table()
_REGISTERED: set = set()
_FALLBACK_WARNED: set = set()


def has_kernel(op: str, device_type: str) -> bool:
    """True when ``distillx::op`` has a compiled kernel for ``device_type`` ("cpu", "cuda", ...)."""
    return _KERNELS.get((op, device_type), False)


def backend(op: str, device_type: str) -> str:
    """Which implementation serves ``op`` on ``device_type``: "compiled" or "reference"."""
    return "compiled" if has_kernel(op, device_type) else "reference"


def use_kernel(op: str, device: torch.device) -> bool:
    """Whether the family wrapper should call the compiled op; warns once per (op, device) when not.

    Under a ``torch.func`` transform (``grad``, ``vmap``, ``jacrev``, ``hessian``, ...) the answer is
    False, silently: the reference is made of PyTorch operations those transforms differentiate and
    batch, while an op with a Python autograd formula cannot be transformed."""
    if torch._C._are_functorch_transforms_active():
        return False
    if has_kernel(op, device.type):
        return True
    if not _ext.available():
        _ext.warn_missing_once()
    elif (op, device.type) not in _FALLBACK_WARNED:
        _FALLBACK_WARNED.add((op, device.type))
        why = f" ({_ext.cpu_error()})" if device.type == "cpu" and _ext.cpu_error() else ""
        warnings.warn(f"distillx::{op} has no compiled kernel for {device.type}{why}; running the reference",
                      RuntimeWarning, stacklevel=4)
    return False


def register(op: str, fake: Callable, backward: Optional[Callable] = None,
             setup_context: Optional[Callable] = None) -> bool:
    """Register the fake kernel (and the autograd formula) of ``distillx::op``; False when the
    compiled core does not define it. A backward op (no autograd of its own) passes only ``fake``."""
    if op not in library_ops():
        return False
    qualname = f"{NAMESPACE}::{op}"
    torch.library.register_fake(qualname)(fake)
    if backward is not None:
        torch.library.register_autograd(qualname, backward, setup_context=setup_context)
    _REGISTERED.add(op)
    return True


def registered() -> frozenset:
    """Ops whose Python side (fake kernel, autograd) a family registered."""
    return frozenset(_REGISTERED)


def missing_python_side() -> list[str]:
    """Schemas of the compiled core that no op family registered: they would have no fake kernel
    (``torch.compile`` fails) and no autograd (wrong gradients)."""
    return [op for op in library_ops() if op not in _REGISTERED]


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """The accumulation dtype of every kernel: float64 for float64 inputs, float32 otherwise."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def non_differentiable(ctx, *outputs) -> None:
    """Mark gradient outputs non-differentiable without autograd materialising zero gradients for
    them in backward (for logit_divergence an (N, C) zeros tensor, costlier than the kernel)."""
    ctx.mark_non_differentiable(*outputs)
    ctx._materialize_non_diff_grads = False  # the switch AOTAutograd uses for the same purpose


def building_graph() -> bool:
    """Inside a backward formula: whether autograd is building a graph of the gradient
    (``create_graph=True``: a Hessian-vector product, a gradient penalty). The engine runs backward
    formulas with grad mode equal to ``create_graph``."""
    return torch.is_grad_enabled()


def differentiable_grads(reference: Callable, inputs: Sequence, wrt: Sequence[int], grad_outputs) -> list:
    """For a ``create_graph`` backward: the gradients of ``reference(*inputs)`` (the op's outputs,
    recomputed with PyTorch operations) w.r.t. ``inputs[i]`` for ``i`` in ``wrt``, weighted by
    ``grad_outputs``, themselves differentiable (so the op's second derivative is not dropped).
    An input given twice (``k is q``) is differentiated once; its gradient comes back at its first
    position, None at the others (autograd adds the positions up)."""
    positions, seen = [], []
    for i in wrt:
        if all(inputs[i] is not inputs[j] for j in seen):
            positions.append(i)
        seen.append(i)
    with torch.enable_grad():
        outputs = reference(*inputs)
    outputs = outputs if isinstance(outputs, (tuple, list)) else (outputs,)
    grad_outputs = grad_outputs if isinstance(grad_outputs, (tuple, list)) else (grad_outputs,)
    pairs = [(o, g) for o, g in zip(outputs, grad_outputs) if g is not None]
    found = torch.autograd.grad([o for o, _ in pairs], [inputs[i] for i in positions], [g for _, g in pairs],
                                create_graph=True, allow_unused=True)
    grads = {i: g for i, g in zip(positions, found)}
    return [grads.get(i) for i in wrt]


def graph_is_freed_after_this_backward() -> bool:
    """Inside a backward: the autograd graph is freed once it finishes (no ``retain_graph``), so
    tensors saved only for it may be reused in place."""
    keep_graph = getattr(torch._C._autograd, "_get_current_graph_task_keep_graph", None)
    return keep_graph is not None and not keep_graph()


def register_scalar_loss(op: str, fake: Callable, num_args: int, grad_args: Sequence[int],
                         compute_grad_arg: int, reference: Callable) -> bool:
    """Register an op that returns ``(loss, grad_for_args[grad_args[0]], …)`` when its
    ``compute_grad`` argument (position ``compute_grad_arg``) is true: the kernel computes the
    gradient in the same pass as the scalar loss (as Liger-Kernel does), so backward only scales the
    saved gradients by the upstream scalar. ``reference(*inputs) -> loss`` (PyTorch operations)
    serves a ``create_graph`` backward: the op keeps its tensor inputs for it."""

    def setup(ctx, inputs, output):
        ctx.compute_grad = inputs[compute_grad_arg]
        ctx.set_materialize_grads(False)
        ctx.inputs = [None if isinstance(x, torch.Tensor) else x for x in inputs]
        ctx.tensor_at = [i for i, x in enumerate(inputs) if isinstance(x, torch.Tensor)]
        ctx.grads = len(output) - 1
        ctx.save_for_backward(*output[1:], *(inputs[i] for i in ctx.tensor_at))
        non_differentiable(ctx, *output[1:])

    def backward(ctx, grad_loss, *_):
        grads = [None] * num_args
        if grad_loss is None:
            return tuple(grads)
        saved = ctx.saved_tensors
        if building_graph():
            inputs = list(ctx.inputs)
            for i, x in zip(ctx.tensor_at, saved[ctx.grads:]):
                inputs[i] = x
            wrt = [i for i in grad_args if ctx.needs_input_grad[i]]
            for i, g in zip(wrt, differentiable_grads(reference, inputs, wrt, grad_loss)):
                grads[i] = g
            return tuple(grads)
        if not ctx.compute_grad:
            raise RuntimeError(f"distillx::{op} was called with compute_grad=False; call it with "
                               "compute_grad=True to differentiate it")
        in_place = graph_is_freed_after_this_backward()
        for position, grad in zip(grad_args, saved[:ctx.grads]):
            # The saved gradient is the op's own and dies with the graph: scale it in place rather
            # than hold a second copy at the peak (retain_graph, gradcheck and compile stay functional).
            grads[position] = grad.mul_(grad_loss) if in_place and type(grad) is torch.Tensor else grad * grad_loss
        return tuple(grads)

    return register(op, fake, backward, setup)


def reduce_total(total: torch.Tensor, kept, reduction: str, num_classes: int) -> torch.Tensor:
    """Turn the sum of kept row losses into the scalar ``reduction`` (0 when no row is kept):
    "sum", "batchmean" (/ kept rows) or "mean" (/ kept rows · classes)."""
    if reduction == "sum":
        return total
    denom = kept * num_classes if reduction == "mean" else kept
    if isinstance(denom, torch.Tensor):
        return total / denom.clamp(min=1)
    return total / max(denom, 1)
