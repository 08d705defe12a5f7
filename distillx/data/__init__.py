"""Datasets bundled with distillx (no download, no third-party dependency)."""
from .digits import DigitsSplit, digits_loaders, digits_split, load_digits, tensor_loader

__all__ = ["DigitsSplit", "digits_loaders", "digits_split", "load_digits", "tensor_loader"]
