"""Token-sequence augmentation: ``token_mask``."""
from __future__ import annotations

import torch

from .base import Augmentation


class TokenMask(Augmentation):
    """Replace each non-padding token by ``mask_id`` with probability ``p``, independently.

    For integer token ids x (N, L): ``out[n, l] = mask_id`` if u_nl < p and x[n, l] != pad_id, else
    x[n, l], with u_nl ~ U[0, 1). The masking noise of BERT's masked language modelling (Devlin et
    al., NAACL 2019), used here as input corruption that teacher and student both see, as in
    data-augmented distillation of language models (e.g. TinyBERT, Jiao et al. 2020). Targets are
    unchanged.

    ``mask_id`` is required (e.g. ``tokenizer.mask_token_id``); ``pad_id`` (e.g.
    ``tokenizer.pad_token_id``), when given, marks tokens that are never masked.
    """

    name = "token_mask"
    options = {"p": 0.15, "mask_id": None, "pad_id": None}

    def validate(self) -> None:
        self.check_number("p", ge=0, le=1)
        if self.mask_id is None:
            raise ValueError(f"augmentation {self.label!r}: option mask_id is required (the id of the mask token, "
                             "e.g. tokenizer.mask_token_id)")
        self.check_int("mask_id")
        self.check_int("pad_id", optional=True)

    def apply(self, inputs, targets, generator):
        x = self.require_tensor(inputs, "inputs", "(N, L) integer token ids", integer=True, ndim=2)
        info = torch.iinfo(x.dtype)
        if not info.min <= self.mask_id <= info.max:
            raise self.batch_error(f"option mask_id={self.mask_id} does not fit the inputs' dtype {x.dtype}")
        hit = self.uniform(tuple(x.shape), generator, x.device) < self.p
        if self.pad_id is not None:
            hit &= x != self.pad_id
        return x.masked_fill(hit, self.mask_id), targets


__all__ = ["TokenMask"]
