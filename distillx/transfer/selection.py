"""The ``select`` weight transfer: Weight Selection (Xu et al., ICLR 2024)."""
from __future__ import annotations

from typing import Any, Mapping, Optional, Union

from torch import nn

from ..hf.layouts import attention_blocks
from .apply import copy_or_shrink
from .correspond import LayerRule, MappingSpec, correspond, layer_rule
from .errors import check_models
from .report import TransferReport


def select(teacher: nn.Module, student: nn.Module, *, layers: Union[str, LayerRule] = "first",
           mapping: MappingSpec = None, blocks: Optional[Mapping[str, Any]] = None) -> TransferReport:
    r"""Initialise the student with a subset of the teacher's weights (Weight Selection).

    Z. Xu, Y. Chen, K. Vishniakov, Y. Yin, Z. Shen, T. Darrell, L. Liu, Z. Liu, "Initializing
    Models with Larger Ones", ICLR 2024. The student must be the teacher's architecture at smaller
    widths and/or depth (the paper: ViT-T from ViT-S, ConvNeXt-F from ConvNeXt-T). Three steps:

    1. **layer selection** -- student layer :math:`i` of each stack of layers (``encoder.layers``,
       ``blocks``) takes teacher layer :math:`j(i)`: ``layers="first"``, :math:`j = i` (the
       paper's default, first-N selection, which it found better) or ``layers="uniform"``,
       :math:`j = \operatorname{round}(i (N_t-1)/(N_s-1))` (evenly spaced); or a callable
       ``(stack, i, n_student, n_teacher) -> j``;
    2. **component mapping** -- each student tensor reads the teacher tensor of the same name in
       the selected layer (see :mod:`distillx.transfer.correspond`; ``mapping`` overrides);
    3. **element selection** -- along every dimension the teacher tensor keeps the elements
       :math:`I(D_t, D_s) = \operatorname{round}(\operatorname{linspace}(0, D_t-1, D_s))`.
       The indices depend only on the two widths, so all tensors that meet in the residual stream
       (or a conv's output channels and the next BatchNorm, whose running statistics are selected
       too) keep the *same* coordinates: the paper's consistent selection.
       ``nn.MultiheadAttention.in_proj_weight`` (3E, E) is selected inside each of its q, k, v
       blocks; ``nn.Embedding`` is selected along the embedding dimension and its rows (the
       vocabulary) must be equal, as must the output layer's rows (classes).

    A tensor with equal shapes is copied; one the teacher cannot cover (a wider student, another
    rank, a different vocabulary) is skipped with the reason.

    Options:
        layers: ``"first"`` (default), ``"uniform"`` or a callable layer rule.
        mapping: ``{student name: teacher name}`` of tensors or modules, or a callable.
        blocks: ``{glob of student tensor names: fused blocks along dim 0}`` for fused projections
            that are not ``nn.MultiheadAttention`` (``{"*.qkv.*": 3}`` for timm-style ViTs), or
            ``{glob: {dim: blocks}}``. Transformer attention (BERT, DistilBERT, GPT-2's fused
            ``c_attn``, LLaMA with grouped-query k/v) is found and shrunk per head, per q/k/v
            (:mod:`distillx.hf.layouts`).

    Example::

        report = dx.transfer("select", vit_small, vit_tiny, layers="first")
    """
    check_models(teacher, student)
    rule = layer_rule(layers)
    report = TransferReport.for_model("select", student)
    matches = correspond(teacher, student, mapping=mapping, layers=rule)
    blocks = {**attention_blocks(teacher, student), **(blocks or {})}  # heads kept apart; given ones win
    return copy_or_shrink(student, matches, report, "select", blocks)
