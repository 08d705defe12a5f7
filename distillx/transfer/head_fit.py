"""The ``head_fit`` weight transfer: solve the student's output layer by ridge regression on teacher logits."""
from __future__ import annotations

import itertools
from typing import Any, Iterator, Mapping, Optional

import torch
from torch import nn

from .calibration import batches as calibration_batches
from .calibration import call
from .errors import TransferError, check_models, close_names
from .report import TransferReport
from .tensors import output_layer, transferable_tensors


class _Captured(BaseException):
    """Stops the student's forward once the head's input is captured. A BaseException, so a model
    that wraps its forward in ``except Exception`` does not swallow it."""


def _logits(output: Any) -> torch.Tensor:
    """The teacher's logits: a tensor, ``output["logits"]``, ``output.logits`` or ``output[0]``."""
    if isinstance(output, Mapping) and "logits" in output:
        output = output["logits"]
    elif not isinstance(output, torch.Tensor) and hasattr(output, "logits"):
        output = output.logits
    elif isinstance(output, (list, tuple)) and output:
        output = output[0]
    if not isinstance(output, torch.Tensor):
        raise TransferError(f"head_fit: cannot find logits in the teacher's output ({type(output).__name__}); "
                            "return a tensor, a dict with 'logits', an object with .logits or a tuple starting "
                            "with the logits")
    return output


def _head_input(student: nn.Module, head: nn.Module, path: str, batch: Any) -> torch.Tensor:
    captured = []

    def hook(module, args):
        captured.append(args[0])
        raise _Captured

    handle = head.register_forward_pre_hook(hook)
    try:
        call(student, batch, "head_fit")
    except _Captured:
        pass
    finally:
        handle.remove()
    if not captured:
        raise TransferError(f"head_fit: the student's forward never called its output layer {path!r}")
    return captured[0]


def _tensors(value: Any) -> Iterator[torch.Tensor]:
    """Every tensor in a batch (a tensor, or tuples/lists/dicts of them)."""
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, Mapping):
        for v in value.values():
            yield from _tensors(v)
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from _tensors(v)


def _non_finite(tensor: torch.Tensor) -> int:
    """Number of NaN/Inf entries (0 for integer tensors: token ids, labels)."""
    if not (tensor.is_floating_point() or tensor.is_complex()):
        return 0
    return int((~torch.isfinite(tensor)).sum())


def _non_finite_weights(model: nn.Module) -> list[str]:
    return [name for name, tensor in itertools.chain(model.named_parameters(), model.named_buffers())
            if _non_finite(tensor)]


def _check_finite(values: torch.Tensor, what: str, model: nn.Module, role: str, batch: Any, index: int) -> None:
    """Raise a TransferError naming the non-finite source of ``values`` (the teacher's logits or the
    student's features at its output layer): the calibration inputs, the model's weights, or its
    forward (an overflow). A NaN reaching the normal equations would otherwise end in a LAPACK error
    or a head full of NaN reported as fitted."""
    bad = _non_finite(values)
    if not bad:
        return
    inputs = batch[0] if isinstance(batch, (list, tuple)) and batch else batch
    if any(_non_finite(t) for t in _tensors(inputs)):
        raise TransferError(f"head_fit: the calibration inputs of batch {index} contain NaN or Inf, so {what} are "
                            f"not finite ({bad} values); clean or drop those samples")
    weights = _non_finite_weights(model)
    if weights:
        shown = ", ".join(weights[:4]) + (f", ... ({len(weights)} in all)" if len(weights) > 4 else "")
        raise TransferError(f"head_fit: the {role}'s weights are not finite (NaN or Inf in {shown}), so {what} on "
                            f"batch {index} are not finite ({bad} values); nothing was fitted")
    raise TransferError(f"head_fit: {what} on batch {index} are not finite ({bad} NaN/Inf values) although the "
                        f"calibration inputs and the {role}'s weights are: its forward overflows (half precision?)")


def _check_untied(student: nn.Module, layer: nn.Linear, path: str) -> None:
    """A head tied to another tensor (``head.weight is emb.weight``) cannot be fitted on its own:
    writing it rewrites the embedding, which changes the very features it was fitted to."""
    own = {id(t) for t in (layer.weight, layer.bias) if t is not None}
    others = [name for name, (t, _) in transferable_tensors(student, aliases=True).items()
              if id(t) in own and name.rpartition(".")[0] != path]
    if others:
        raise TransferError(f"head_fit: the student's output layer {path!r} is tied to {', '.join(others)} (the same "
                            f"tensor); fitting it would rewrite that too and change the features it is fitted on. "
                            f"Untie the head first, or use another strategy")


def solve(xtx: torch.Tensor, xty: torch.Tensor, lam: float, bias: bool) -> torch.Tensor:
    r"""Solve :math:`(X^\top X + \lambda D)\,\Theta = X^\top Y` (float64).

    :math:`D` is the identity except a 0 for the bias column: the intercept is not shrunk. With
    :math:`\lambda = 0` the minimum-norm least-squares solution (a rank-deficient :math:`X` is fine).
    """
    if lam > 0:
        diag = torch.ones(xtx.shape[0], dtype=xtx.dtype, device=xtx.device)
        if bias:
            diag[-1] = 0
        try:
            return torch.linalg.solve(xtx + lam * torch.diag(diag), xty)
        except RuntimeError:  # numerically singular despite the ridge: fall through to least squares
            pass
    return torch.linalg.lstsq(xtx.cpu(), xty.cpu(), driver="gelsd").solution.to(xtx.device)


@torch.no_grad()
def head_fit(teacher: nn.Module, student: nn.Module, *, calibration: Any = None, head: Optional[str] = None,
             ridge: float = 1e-3, max_batches: Optional[int] = None) -> TransferReport:
    r"""Solve the student's output layer so its logits match the teacher's (ridge regression).

    On the calibration data, :math:`X` holds the inputs of the student's output layer (captured by
    a forward pre-hook; the student's forward stops there), one row per position, with a column of
    ones when the layer has a bias, and :math:`Y` the teacher's logits. Accumulating
    :math:`X^\top X` and :math:`X^\top Y` in float64 over the batches, it solves

    .. math:: (X^\top X + \lambda D)\,[W \mid b]^\top = X^\top Y,
       \qquad \lambda = \text{ridge}\cdot\operatorname{tr}(X_f^\top X_f)/H

    (:math:`X_f`: the feature columns, :math:`H` their number, :math:`D`: identity without the bias
    entry), so ``ridge`` is relative to the mean feature energy and does not depend on the
    features' scale. ``ridge=0`` gives the minimum-norm least-squares fit, which reproduces the
    teacher's logits exactly whenever the student's features can. This is the closed-form
    "linear probe" onto the teacher's logit space, the least-squares counterpart of fitting the
    head with a logit-matching loss (Ba & Caruana, "Do Deep Nets Really Need to be Deep?",
    NeurIPS 2014, regress logits with L2); the report gives the fit's :math:`R^2`.

    Both models run in ``eval()`` mode under ``no_grad`` (their modes are restored); inputs are
    moved to each model's device.

    Options:
        calibration: iterable of batches: tensors, ``(inputs, targets, ...)`` tuples (``inputs``
            may be a dict of keyword arguments) or dicts of keyword arguments; a single tensor is one
            batch. The teacher's output may be a tensor, a dict with ``"logits"``, an object with
            ``.logits`` or a tuple starting with the logits.
        head: dotted path of the student's output ``nn.Linear`` (default: its last ``nn.Linear``).
        ridge: relative ridge :math:`\ge 0` (default 1e-3).
        max_batches: use at most this many batches (default: all).
    """
    check_models(teacher, student)
    if isinstance(ridge, bool) or not isinstance(ridge, (int, float)) or not ridge >= 0:
        raise ValueError(f"head_fit: ridge must be a number >= 0, got {ridge!r}")
    path = head if head is not None else output_layer(student)
    if path is None:
        raise TransferError("head_fit: the student has no nn.Linear output layer; name it with head=")
    try:
        layer = student.get_submodule(path)
    except AttributeError:
        raise TransferError(f"head_fit: the student has no module {path!r}."
                            + close_names(path, [p for p, _ in student.named_modules() if p])) from None
    if not isinstance(layer, nn.Linear):
        raise TransferError(f"head_fit: {path!r} is a {type(layer).__name__}, not an nn.Linear")
    bias = layer.bias is not None
    n_in, n_out = layer.in_features, layer.out_features
    _check_untied(student, layer, path)

    data = calibration_batches(calibration, "head_fit", max_batches, progress=True)
    modes = [(m, m.training) for m in (teacher, student)]
    teacher.eval()
    student.eval()
    xtx = xty = None
    yy, ysum, rows, batches = 0.0, None, 0, 0
    try:
        for batch in data:
            x = _head_input(student, layer, path, batch)
            _check_finite(x, f"the student's features at {path!r}", student, "student", batch, batches)
            y = _logits(call(teacher, batch, "head_fit"))
            _check_finite(y, "the teacher's logits", teacher, "teacher", batch, batches)
            if y.shape[-1] != n_out:
                raise TransferError(f"head_fit: the teacher's logits have {y.shape[-1]} outputs but the student's "
                                    f"output layer {path!r} has {n_out}")
            x = x.reshape(-1, n_in).to(device=layer.weight.device, dtype=torch.float64)
            y = y.reshape(-1, n_out).to(device=layer.weight.device, dtype=torch.float64)
            if x.shape[0] != y.shape[0]:
                raise TransferError(f"head_fit: a batch gave {x.shape[0]} student feature rows but {y.shape[0]} "
                                    f"teacher logit rows")
            if bias:
                x = torch.cat([x, x.new_ones(x.shape[0], 1)], dim=1)
            xtx = x.T @ x if xtx is None else xtx + x.T @ x
            xty = x.T @ y if xty is None else xty + x.T @ y
            yy += float((y * y).sum())
            ysum = y.sum(0) if ysum is None else ysum + y.sum(0)
            rows += x.shape[0]
            batches += 1
    finally:
        for model, training in modes:
            model.train(training)
    if rows == 0:
        raise TransferError("head_fit: the calibration data yielded no rows (an empty loader?)")

    if not (torch.isfinite(xtx).all() and torch.isfinite(xty).all()):
        raise TransferError("head_fit: the normal equations overflowed float64 (the student's features or the "
                            "teacher's logits are finite but too large); rescale the calibration inputs")
    lam = float(ridge) * float(torch.trace(xtx[:n_in, :n_in])) / n_in
    theta = solve(xtx, xty, lam, bias)  # (n_in [+1], n_out)
    if not torch.isfinite(theta).all():
        raise TransferError("head_fit: the ridge solution is not finite (the features are too ill-conditioned); "
                            "raise ridge=")
    sse = max(yy - 2 * float((theta * xty).sum()) + float((theta * (xtx @ theta)).sum()), 0.0)
    sst = yy - float((ysum * ysum).sum()) / rows
    r2 = 1.0 - sse / sst if sst > 0 else float("nan")

    layer.weight.copy_(theta[:n_in].T)
    if bias:
        layer.bias.copy_(theta[n_in])
    how = f"ridge (lambda={lam:.3g})" if lam > 0 else "least-squares"
    why = f"fitted to the teacher's logits on {rows} rows from {batches} batches, R^2={r2:.6f}"
    report = TransferReport.for_model("head_fit", student)
    for name, (tensor, _) in transferable_tensors(student).items():
        if name.rpartition(".")[0] == path:
            report.fitted(name, tuple(tensor.shape), "teacher logits", how, why)
        else:
            report.skipped(name, tuple(tensor.shape), f"head_fit solves only the output layer {path!r}")
    report.notes.append(why)
    return report
