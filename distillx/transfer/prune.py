r"""The ``prune`` weight transfer: the student inherits the teacher's *most important* heads, neurons
and channels, measured on calibration data (Minitron), instead of uniformly spaced ones (``select``).

S. T. Sreenivas, S. Muralidharan, R. Joshi, M. Chochowski, M. Patwary, M. Shoeybi, B. Catanzaro,
J. Kautz, P. Molchanov, "LLM Pruning and Distillation in Practice: The Minitron Approach", 2024:
rank width axes by activation magnitude on a small calibration set, prune, then distil. Here the
student's shape is given (a smaller configuration of the teacher's architecture) and ``prune``
decides which teacher coordinates fill it:

- **depth**: student layer :math:`i` reads teacher layer :math:`m_i` (``layers=``: ``"uniform"``,
  ``"every"``, ``"auto"`` -- chosen on the same calibration data, :mod:`~distillx.transfer.depth`
  -- or an explicit map, as for ``layer_map``);
- **transformers** (BERT/RoBERTa, DistilBERT, GPT-2, LLaMA-family;
  :mod:`~distillx.transfer.importance`): the attention heads of highest importance (grouped-query
  attention keeps whole key/value groups, ranked by the sum of their query heads; with as many
  key/value heads as the teacher, the best query heads inside each group), the MLP neurons of
  highest importance per layer, and the residual-stream channels of highest importance, the *same*
  channels in every tensor that reads or writes the residual stream (embeddings, projections,
  norms, the output layer's inputs);
- **CNNs and MLPs** (:mod:`~distillx.transfer.channels`): per channel space (a conv's output
  channels with its BatchNorm and the next layer's inputs; a residual stage's shared channels) the
  channels of highest activation magnitude.

Kept indices are sorted, so the order of heads, neurons and channels is the teacher's. A dimension
with no importance (another axis, an unrecognised model part) is selected uniformly, as ``select``
does, and the report says so; an output layer's rows and an embedding's rows are never pruned.
The report lists, per layer, the importance scores and what was kept (``report.importance``).
"""
from __future__ import annotations

from typing import Any, Optional

import torch
from torch import nn

from .adapt import uniform_indices
from .apply import copy_or_shrink
from .channels import channel_groups, channel_importance, channel_indices, top_channels
from . import calibration as calib
from .correspond import MappingSpec, correspond
from ..hf.layouts import attention_blocks
from .errors import TransferError, check_models
from .importance import Importance, LayerParts, hidden_size, layer_parts, measure
from .layer_map import DepthPlan, LayerMap
from .report import TransferReport

Indices = dict[tuple[str, int], tuple[str, list[int]]]  # (student tensor, dim) -> (axis, teacher indices)


def kept_heads(scores: torch.Tensor, t_heads: int, t_kv: int, s_heads: int, s_kv: int) -> tuple[list[int], list[int]]:
    """``(query heads, key/value heads)`` of the teacher that the student keeps (module docstring)."""
    if (s_heads, s_kv) == (t_heads, t_kv):
        return list(range(t_heads)), list(range(t_kv))
    rep_t, rep_s = t_heads // t_kv, s_heads // s_kv
    if rep_s == rep_t:  # whole groups (plain multi-head attention: rep = 1, one head per group)
        groups = top_channels(scores.reshape(t_kv, rep_t).sum(1), s_kv)
        return [g * rep_t + r for g in groups for r in range(rep_t)], groups
    if s_kv == t_kv and rep_s < rep_t:  # every group, its best query heads
        per_group = scores.reshape(t_kv, rep_t)
        return [g * rep_t + r for g in range(t_kv) for r in top_channels(per_group[g], rep_s)], list(range(t_kv))
    raise TransferError(f"prune: cannot map {t_heads} query / {t_kv} key-value heads onto {s_heads} / {s_kv}: keep "
                        "the heads per key/value group, or the number of key/value groups")


def _rows(heads: list[int], head_dim_t: int, head_dim_s: int) -> list[int]:
    if head_dim_s > head_dim_t:
        raise TransferError(f"prune: the student's heads are wider than the teacher's ({head_dim_s} > {head_dim_t} "
                            "dims); with a head size tied to width / heads (BERT, GPT-2), fewer heads need a "
                            "narrower model")
    inner = uniform_indices(head_dim_t, head_dim_s)
    return [h * head_dim_t + i for h in heads for i in inner]


def _layer_pairs(student_parts: dict[str, LayerParts], teacher_parts: dict[str, LayerParts],
                 plan: DepthPlan) -> list[tuple[LayerParts, LayerParts]]:
    """``(student layer, teacher layer it reads)`` for every student transformer layer."""
    pairs = []
    for path, s in student_parts.items():
        stack, _, index = path.rpartition(".")
        used = plan.used.get(stack)
        j = used[int(index)] if used is not None and index.isdigit() else int(index) if index.isdigit() else None
        t = teacher_parts.get(f"{stack}.{j}" if stack else str(j)) if j is not None else None
        if t is not None:
            pairs.append((s, t))
    return pairs


def transformer_indices(student: nn.Module, teacher: nn.Module, imp: Importance, plan: DepthPlan,
                        report: TransferReport) -> tuple[Indices, Optional[list[int]]]:
    """Explicit indices of the attention, MLP and residual tensors, and the kept residual channels."""
    out: Indices = {}
    s_parts, t_parts = layer_parts(student), layer_parts(teacher)
    for s, t in _layer_pairs(s_parts, t_parts, plan):
        sa, ta = s.attention, t.attention
        record = report.importance.setdefault("heads", {})
        if t.layer in imp.heads:
            q, kv = kept_heads(imp.heads[t.layer], ta.heads, ta.kv_heads, sa.heads, sa.kv_heads)
            record[s.layer] = {"teacher layer": t.layer, "scores": [round(float(v), 6) for v in imp.heads[t.layer]],
                               "kept query heads": q, "kept key/value heads": kv}
            q_rows, kv_rows = _rows(q, t.head_dim, s.head_dim), _rows(kv, t.head_dim, s.head_dim)
            if sa.chunks > 1:  # GPT-2's fused c_attn: [q | k | v] along its output dim
                wq, wk = ta.width("q"), ta.width("k")
                fused = q_rows + [wq + r for r in kv_rows] + [wq + wk + r for r in kv_rows]
                out[(f"{sa.q}.weight", 1)] = out[(f"{sa.q}.bias", 0)] = ("heads", fused)
            else:
                for proj, rows in (("q", q_rows), ("k", kv_rows), ("v", kv_rows)):
                    out[(f"{getattr(sa, proj)}.weight", 0)] = out[(f"{getattr(sa, proj)}.bias", 0)] = ("heads", rows)
            if s.output is not None:
                out[(f"{s.output[0]}.weight", s.output[1])] = ("heads", q_rows)
        if t.layer in imp.neurons and s.down and s.intermediate and t.intermediate:
            scores = imp.neurons[t.layer]
            kept = top_channels(scores, s.intermediate)
            report.importance.setdefault("neurons", {})[s.layer] = {
                "teacher layer": t.layer, "kept": len(kept), "of": len(scores),
                "scores": [round(float(v), 6) for v in scores], "kept neurons": kept}
            down = student.get_submodule(s.down)
            dim = 0 if type(down).__name__ == "Conv1D" else 1
            out[(f"{s.down}.weight", dim)] = ("neurons", kept)
            for name, tensor in student.get_submodule(s.layer).named_parameters():
                full = f"{s.layer}.{name}"
                for d, size in enumerate(tensor.shape):  # the up/gate projections: the intermediate width
                    if size == s.intermediate and size != hidden_size(student) and (full, d) not in out and not full.startswith(sa.path + "."):
                        out[(full, d)] = ("neurons", kept)
    channels = None
    h_s, h_t = hidden_size(student), hidden_size(teacher)
    if imp.channels is not None and h_s and h_t and h_s < h_t:
        channels = top_channels(imp.channels, h_s)
        report.importance["channels"] = {"kept": len(channels), "of": h_t,
                                         "scores": [round(float(v), 6) for v in imp.channels],
                                         "kept channels": channels}
    return out, channels


def _by_tensor(matches: list, indices: Indices, residual: Optional[tuple[int, int, list[int]]]
               ) -> dict[str, dict[int, list[int]]]:
    """``{student tensor: {dim: teacher indices}}`` for ``copy_or_shrink``: the explicit ones, and the
    kept residual channels for every other dim of the residual widths (teacher, student)."""
    out: dict[str, dict[int, list[int]]] = {}
    for (name, dim), (_, idx) in indices.items():
        out.setdefault(name, {})[dim] = idx
    if residual is not None:
        for m in matches:
            if m.teacher_tensor is None or m.teacher_tensor.dim() != m.tensor.dim():
                continue
            for dim, (dt, ds) in enumerate(zip(m.teacher_tensor.shape, m.tensor.shape)):
                if (dt, ds) == residual[:2] and dim not in out.get(m.name, {}):
                    out.setdefault(m.name, {})[dim] = residual[2]
    return out


def cnn_indices(teacher: nn.Module, student: nn.Module, matches: list, calibration: Any, max_batches: Optional[int],
                report: TransferReport) -> tuple[list, dict[str, dict[int, list[int]]]]:
    """The channels a CNN/MLP student keeps (:mod:`~distillx.transfer.channels`): ``(matches left,
    indices)``; tensors whose channels cannot be chosen are recorded as skipped."""
    first = next(iter(calib.batches(calibration, "prune", 1)), None)
    calib.require_rows(0 if first is None else 1, "prune")
    example = calib.model_inputs(first, "prune")
    t_plan, s_plan = channel_groups(teacher, example), channel_groups(student, example)
    if not t_plan.prunable:
        raise TransferError(f"prune: found nothing to rank in the {type(teacher).__name__}: no attention heads and "
                            "no channel space of a conv or linear layer that may change its width")
    scores = channel_importance(teacher, t_plan, calibration, max_batches=max_batches)
    chosen = channel_indices(t_plan, s_plan, scores, mapping={m.name: m.teacher_name for m in matches if m.teacher_name})
    spaces = report.importance.setdefault("channels", {})
    for space in t_plan.prunable:
        kept = sorted({tuple(v) for (n, d), v in chosen.indices.items() if (n, d) in space.members}, key=len)
        spaces[space.name] = {"scores": [round(float(v), 6) for v in scores[space.index]],
                              "kept channels": list(kept[0]) if kept else None}
    left = []
    for m in matches:
        if m.name in chosen.skipped and m.teacher_tensor is not None and m.teacher_tensor.shape != m.tensor.shape:
            report.skipped(m.name, tuple(m.tensor.shape), chosen.skipped[m.name])
        else:
            left.append(m)
    return left, chosen.by_tensor()


def prune(teacher: nn.Module, student: nn.Module, *, calibration: Any = None, layers: LayerMap = None,
          max_batches: Optional[int] = None, mapping: MappingSpec = None) -> TransferReport:
    """Initialise ``student`` with the teacher's most important heads, neurons and channels.

    Options:
        calibration: batches the teacher runs on (a DataLoader, a list of ``(inputs, targets)``
            or tokenizer outputs); required: one pass measures the importance (a progress bar shows
            it), and ``layers="auto"`` makes one more per candidate map.
        layers: which teacher layer each student layer reads, as ``layer_map``'s ``map``:
            ``None`` (its data-free default), ``"uniform"``, ``"every"``, ``"auto"`` or a list/dict.
        max_batches: use at most this many calibration batches.
        mapping: ``{student name: teacher name}`` as for the other strategies.

    Example::

        report = dx.transfer("prune", teacher, student, calibration=loader, layers="auto")
        print(report.importance["heads"])        # per layer: scores and the heads kept
    """
    check_models(teacher, student)
    if calibration is None:
        raise TransferError("prune needs calibration=: batches the teacher runs on to rank its heads, neurons and "
                            "channels (a DataLoader, a list of (inputs, targets) or tokenizer outputs)")
    plan = DepthPlan("prune", teacher, student, layers, calibration if layers == "auto" else None, max_batches
                     if layers == "auto" else None, data_needed=True)
    report = TransferReport.for_model("prune", student)
    matches = correspond(teacher, student, mapping=mapping, layers=plan.layers)
    plan.describe(report)
    if layer_parts(teacher):
        imp = measure(teacher, calibration, "prune", max_batches)
        explicit, channels = transformer_indices(student, teacher, imp, plan, report)
        residual = (hidden_size(teacher), hidden_size(student), channels) if channels is not None else None
        indices = _by_tensor(matches, explicit, residual)
    else:
        matches, indices = cnn_indices(teacher, student, matches, calibration, max_batches, report)
    # uniform selection (heads kept apart) where no importance applies; the report says which dims
    return copy_or_shrink(student, matches, report, "select", attention_blocks(teacher, student), indices=indices)
