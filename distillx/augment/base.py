"""The interface every data augmentation implements.

An augmentation transforms one training batch, the batch both the teacher and the student see::

    class Invert(Augmentation):
        '''Replace images x in [0, 1] by 1 - x with probability p, per sample.'''

        name = "invert"
        options = {"p": 0.5}              # option name -> default

        def validate(self):
            self.check_number("p", ge=0, le=1)

        def apply(self, inputs, targets, generator):
            x = self.require_tensor(inputs, "inputs", "(N, ...) floating-point", floating=True, min_ndim=1)
            hit = self.uniform((x.shape[0],), generator, x.device) < self.p
            return torch.where(hit.view(-1, *[1] * (x.dim() - 1)), 1 - x, x), targets

    aug = Invert(p=0.3)                    # unknown or invalid options fail here, not mid-training
    inputs, targets = aug(inputs, targets, generator)

Contract (what the Distiller relies on):

* ``aug(inputs, targets, generator) -> (inputs, targets)``. ``inputs`` is the model input tensor,
  ``targets`` the labels (passed through untouched, possibly ``None``, by augmentations that do not
  mix them).
* **All randomness comes from** ``generator`` (a :class:`torch.Generator`), never from the global
  RNG, so restoring a checkpointed generator state replays the same augmentations bit for bit.
  Random numbers are drawn on the generator's device (normally the CPU) and then moved to the
  inputs' device; the result therefore does not depend on where the batch lives. (A generator on
  the inputs' CUDA device also works and avoids the small host-to-device copies, at the price of a
  device-specific stream of random numbers.)
* Inputs and targets are never modified in place; augmentations return new tensors (targets an
  augmentation does not change are returned as they came).
* :attr:`Augmentation.changes_inputs`: whether the inputs the models see differ from the dataset's
  (true for every built-in); the Distiller refuses to cache teacher outputs when any augmentation
  changes inputs. :attr:`Augmentation.mixes_targets`: whether the targets become soft ``(N, C)``
  class-probability rows (mixup, cutmix).
"""
from __future__ import annotations

from typing import Any, ClassVar, Sequence

import torch

from .._options import Options


class Augmentation(Options):
    """Base class of data augmentations (a plain callable, not an ``nn.Module``: no parameters).

    Subclasses set ``name`` (the registry name), declare their options in the class attribute
    ``options`` (name -> default; merged with those of base classes), check option values in
    :meth:`validate` (``check_number``, ``check_int``, ``check_bool``, ``check_choice``), and
    implement :meth:`apply`. Options become attributes (``self.alpha``).
    """

    kind: ClassVar[str] = "augmentation"
    #: The inputs the models see differ from the dataset's (teacher outputs cannot be cached).
    changes_inputs: ClassVar[bool] = True
    #: The returned targets are soft (N, C) class-probability rows.
    mixes_targets: ClassVar[bool] = False

    def __init__(self, **options: Any):
        self._set_options(options)
        self.validate()

    # -- to override ------------------------------------------------------------------------
    def validate(self) -> None:
        """Check option values (raise ``ValueError``/``TypeError`` naming the option). Default: nothing."""

    def apply(self, inputs: Any, targets: Any, generator: torch.Generator) -> tuple[Any, Any]:
        """Return the augmented ``(inputs, targets)`` (see the module docstring for the contract)."""
        raise NotImplementedError(f"{type(self).__name__} must implement apply(inputs, targets, generator)")

    # -- provided ---------------------------------------------------------------------------
    def __call__(self, inputs: Any, targets: Any, generator: torch.Generator) -> tuple[Any, Any]:
        """Augment one batch: ``(inputs, targets, generator) -> (inputs, targets)``."""
        if not isinstance(generator, torch.Generator):
            raise TypeError(f"augmentation {self.label!r}: generator must be a torch.Generator (all randomness "
                            f"comes from it, so runs resume exactly), got {type(generator).__name__}")
        return self.apply(inputs, targets, generator)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(" + ", ".join(f"{k}={v!r}" for k, v in self.config().items()) + ")"

    # -- batch checks and random draws ------------------------------------------------------
    def batch_error(self, problem: str) -> ValueError:
        """A ``ValueError`` naming this augmentation, then ``problem``."""
        return ValueError(f"augmentation {self.label!r}: {problem}")

    def require_tensor(self, value: Any, what: str, expected: str, *, floating: bool = False,
                       integer: bool = False, ndim: int | None = None, min_ndim: int | None = None) -> torch.Tensor:
        """``value`` checked to be a tensor of the right kind and rank; the error names ``expected``.

        ``floating``: a floating-point dtype; ``integer``: an integer dtype (not bool); neither: any
        dtype but bool and complex. ``ndim``/``min_ndim``: exact/minimum number of dimensions.
        """
        if not isinstance(value, torch.Tensor):
            raise self.batch_error(f"{what} must be a tensor of shape {expected}, got a {type(value).__name__}")
        dtype = value.dtype
        if floating:
            bad_dtype = not dtype.is_floating_point
        elif integer:
            bad_dtype = dtype.is_floating_point or dtype.is_complex or dtype == torch.bool
        else:
            bad_dtype = dtype.is_complex or dtype == torch.bool
        bad_rank = (ndim is not None and value.dim() != ndim) or (min_ndim is not None and value.dim() < min_ndim)
        if bad_dtype or bad_rank:
            raise self.batch_error(f"{what} must be a tensor of shape {expected}, got a {dtype} tensor of shape "
                                   f"{tuple(value.shape)}")
        return value

    @staticmethod
    def uniform(size: Sequence[int], generator: torch.Generator, device: torch.device | str | None = None,
                dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """U[0, 1) numbers drawn from ``generator`` on its own device, then moved to ``device``."""
        u = torch.rand(tuple(size), generator=generator, device=generator.device, dtype=dtype)
        return u if device is None else u.to(device)

    @staticmethod
    def randint(high: int, size: Sequence[int], generator: torch.Generator,
                device: torch.device | str | None = None) -> torch.Tensor:
        """Integers in ``[0, high)`` drawn from ``generator`` on its own device, then moved to ``device``."""
        r = torch.randint(0, high, tuple(size), generator=generator, device=generator.device)
        return r if device is None else r.to(device)

    @staticmethod
    def randperm(n: int, generator: torch.Generator, device: torch.device | str | None = None) -> torch.Tensor:
        """A random permutation of ``range(n)`` drawn from ``generator``, then moved to ``device``."""
        p = torch.randperm(n, generator=generator, device=generator.device)
        return p if device is None else p.to(device)


Augmentation._root = Augmentation
