"""Token-sequence augmentation: ``token_mask``."""
from __future__ import annotations

from collections.abc import Mapping

import torch

from .base import Augmentation


class TokenMask(Augmentation):
    """Replace each ordinary token by ``mask_id`` with probability ``p``, independently.

    For integer token ids x (N, L): ``out[n, l] = mask_id`` if u_nl < p and token (n, l) is not
    spared, else x[n, l], with u_nl ~ U[0, 1). The masking noise of BERT's masked language modelling
    (Devlin et al., NAACL 2019), used here as input corruption that teacher and student both see, as
    in data-augmented distillation of language models (e.g. TinyBERT, Jiao et al. 2020). Targets
    are unchanged.

    Inputs: a tensor of ids, or a mapping batch (what a tokenizer returns), whose ``input_ids`` are
    masked and returned in a copy of the mapping. Spared: padding (``attention_mask`` 0 in a
    mapping, or ids equal to ``pad_id``), special tokens (``special_tokens_mask`` 1 in a mapping,
    e.g. from ``tokenizer(..., return_special_tokens_mask=True)``, or ids in ``special_ids``).

    ``mask_id`` is required (e.g. ``tokenizer.mask_token_id``); ``pad_id`` (e.g.
    ``tokenizer.pad_token_id``) and ``special_ids`` (e.g. ``tokenizer.all_special_ids``) are optional.
    """

    name = "token_mask"
    options = {"p": 0.15, "mask_id": None, "pad_id": None, "special_ids": ()}

    def validate(self) -> None:
        self.check_number("p", ge=0, le=1)
        if self.mask_id is None:
            raise ValueError(f"augmentation {self.label!r}: option mask_id is required (the id of the mask token, "
                             "e.g. tokenizer.mask_token_id)")
        self.check_int("mask_id")
        self.check_int("pad_id", optional=True)
        ids = self.special_ids
        if not isinstance(ids, (list, tuple)) or any(isinstance(i, bool) or not isinstance(i, int) for i in ids):
            raise ValueError(f"augmentation {self.label!r}: option special_ids must be a list of token ids, got {ids!r}")

    def apply(self, inputs, targets, generator):
        batch = inputs if isinstance(inputs, Mapping) else None
        if batch is not None and "input_ids" not in batch:
            raise self.batch_error(f"a mapping batch needs 'input_ids' to mask, got keys {sorted(map(str, batch))}")
        x = self.require_tensor(batch["input_ids"] if batch is not None else inputs,
                                "input_ids" if batch is not None else "inputs", "(N, L) integer token ids",
                                integer=True, ndim=2)
        info = torch.iinfo(x.dtype)
        if not info.min <= self.mask_id <= info.max:
            raise self.batch_error(f"option mask_id={self.mask_id} does not fit the inputs' dtype {x.dtype}")
        hit = self.uniform(tuple(x.shape), generator, x.device) < self.p
        if self.pad_id is not None:
            hit &= x != self.pad_id
        if self.special_ids:
            hit &= ~torch.isin(x, torch.tensor(list(self.special_ids), dtype=x.dtype, device=x.device))
        if batch is not None:
            for key, spare_when in (("attention_mask", 0), ("special_tokens_mask", 1)):
                m = batch.get(key)
                if m is not None:
                    if not isinstance(m, torch.Tensor) or tuple(m.shape) != tuple(x.shape):
                        raise self.batch_error(f"{key} must be a tensor of the shape of input_ids {tuple(x.shape)}, "
                                               f"got {tuple(m.shape) if isinstance(m, torch.Tensor) else type(m).__name__}")
                    hit &= m != spare_when
        out = x.masked_fill(hit, self.mask_id)
        return ({**batch, "input_ids": out} if batch is not None else out), targets


__all__ = ["TokenMask"]
