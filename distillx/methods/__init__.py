"""Built-in distillation methods.

The plugin manager registers :data:`BUILTIN_METHODS` as the built-in plugin ``distillx.methods``
(:mod:`distillx.plugin.builtins`) before any third-party plugin, through the same
``distillx_register_methods`` hook a third-party plugin uses. Importing this package registers nothing.

==================  =====================================================================
``kd``              Hinton logit distillation (:class:`KD`)
``sld``             FitNets hints through a learned adapter, MSE (:class:`SLD`)
``kfd``             kernel Gram matching (:class:`KFD`)
``sp``              Similarity-Preserving KD, row-normalised linear Gram (:class:`SP`)
``nst``             Neuron Selectivity Transfer, kernel MMD (:class:`NST`)
``at``              attention transfer on feature maps (:class:`AT`)
``minilm``          MiniLM attention distributions + value relation (:class:`MiniLM`)
``minilmv2``        MiniLMv2 Q-Q/K-K/V-V relations (:class:`MiniLMv2`)
``tinybert_attn``   TinyBERT attention-score MSE (:class:`TinyBERTAttention`)
``lm_kd``           LM distillation through the output layers, no (tokens × vocab) logits (:class:`LMKD`)
``gkd``             on-policy distillation of causal LMs on the student's own samples (:class:`GKD`)
==================  =====================================================================
"""
from __future__ import annotations

from .at import AT
from .base import BatchContext, FeatureRequest, FeatureShapeError, Method
from .gkd import GKD
from .kd import KD
from .kfd import KFD, NST, SP
from .lm_kd import LMKD
from .minilm import MiniLM, MiniLMv2, TinyBERTAttention
from .sld import SLD

BUILTIN_METHODS = (KD, SLD, KFD, SP, NST, AT, MiniLM, MiniLMv2, TinyBERTAttention, LMKD, GKD)


__all__ = ["Method", "BatchContext", "FeatureRequest", "FeatureShapeError", "KD", "SLD", "KFD", "SP", "NST", "AT", "MiniLM",
           "MiniLMv2", "TinyBERTAttention", "LMKD", "GKD", "BUILTIN_METHODS"]
