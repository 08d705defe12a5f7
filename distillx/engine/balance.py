r"""Loss terms that balance themselves: ``Distiller(balance="auto")``.

A distillation step sums weighted terms, :math:`\sum_i w_i L_i` (the task loss and every method's,
``w_i`` the user's ``weight=`` or its schedule). With ``balance="auto"`` one term is the *primary*
one and every other active term :math:`a` gets a factor :math:`f_a` on top of its weight, from its
gradient on the student's parameters :math:`\theta` and the primary's,
:math:`g_p = \nabla_\theta (w_p L_p)` and :math:`g_a = \nabla_\theta L_a`:

.. math:: \mathcal{L} = w_p L_p + \sum_{a \ne p} f_a\, w_a L_a,\qquad
          f_a = \max\big(0, \cos(g_p, g_a)\big)\cdot\min\Big(1, \frac{\|g_p\|}{\|g_a\|}\Big)

- the **direction** part is gradient-similarity weighting (the weighted rule of Y. Du,
  W. M. Czarnecki, S. M. Jayakumar, M. Farajtabar, R. Pascanu, B. Lakshminarayanan, "Adapting
  Auxiliary Losses Using Gradient Similarity", arXiv:1812.02224, 2018): a term whose gradient
  conflicts with the primary's (cosine <= 0) is switched off, an aligned one counts in proportion
  to its alignment;
- the **cap**: an auxiliary gradient larger than the primary's is scaled down to the primary's norm
  (never up: a small term stays as the user weighted it). Without it, a term whose gradient is
  orders of magnitude larger (MiniLMv2's relations next to a pooled-embedding MSE) still dominates
  the update, and Adam's second moments remember even a few such steps. This is the one-sided half
  of matching gradient norms (GradNorm, Z. Chen et al., ICML 2018).

The factor is computed from the auxiliary term's gradient *before* its weight, so ``weight=`` stays
a relative preference on top: the term counts :math:`f_a w_a L_a`, and its push after the factor is
at most :math:`w_a \cos\cdot \|g_p\|`. The primary's factor is 1.

- **Primary term**: ``primary=`` (``"task"`` or a method's key: ``"kd"``, ``"kd#2"``); default the
  first method that can be active (a weight > 0 or a schedule), else the task term.
- **When**: the factors are measured on the first step and then every ``every`` steps, held in
  between (Du et al. measure every step). On such a step each active term is backpropagated on its
  own (``torch.autograd.grad``, the graph kept between them), the factors are computed from those
  gradients, and the step's gradient is their combination with the new factors: the same update one
  backward pass of the re-weighted sum would give. A measurement with ``N`` active terms thus costs
  ``N - 1`` backward passes more than a plain step; the default ``every`` is ``10 * (N - 1)``: at
  most one extra backward pass per 10 steps. Nothing is allocated but one gradient per term (no
  (batch, batch) or (tokens, vocabulary) tensor).
- **Which parameters**: the cosines and norms are taken over the student's trainable parameters
  (what every term shares); a method's own adapter gets its gradient, scaled by its term's factor,
  but takes no part in them.
- **No information**: a step where the primary term is inactive (weight 0), its gradient is zero, or
  a statistic is not finite keeps the factors as they are; so does an auxiliary term with a zero
  gradient. With fewer than two active terms nothing is measured: balancing is a no-op.
- **Distributed** (DDP): a measuring step runs its forward pass under ``no_sync``; the per-term
  gradients are averaged over the processes, so every process computes the same factors from the
  same gradients, and rank 0's are broadcast to make sure. FSDP is refused.
- **State**: factors and step count are in :meth:`Balancer.state_dict`, saved in every checkpoint,
  so a resumed run measures on the same steps with the same factors (bitwise). The factors are
  logged per step as ``weight/<term>`` (metrics, progress bar, ``metrics.json``, the plot).

Chosen by measurement against the rules it is made of and their neighbours (README, "Loss terms that
balance themselves"): the cosine alone, the cosine's sign alone (Du et al.'s unweighted rule), norm
equalisation (GradNorm-like, up and down), and the sign with the cap.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch

from .. import _checks
from ..reporting.metrics import WEIGHT_PREFIX
from .distributed import DistContext

MODES = (None, "auto")
PREFIX = WEIGHT_PREFIX  # metrics key of a term's factor: weight/<term>
EVERY_PER_EXTRA_PASS = 10  # the default interval: 10 steps per extra backward pass of a measurement


def check_balance(balance, primary, every, terms: Sequence[str], candidates: Sequence[str],
                  strategy: str = "ddp") -> Optional[dict]:
    """The Distiller's ``balance``, ``balance_primary`` and ``balance_every`` checked against the loss
    terms (``terms``: every key; ``candidates``: the ones that can be active), as
    ``{"mode", "primary", "every"}`` (``every`` None: the default for the number of active terms), or
    None without balancing. Errors name the argument."""
    if balance not in MODES:
        raise ValueError(f"balance must be None (the fixed weights as given) or 'auto', got {balance!r}")
    if balance is None:
        for name, value in (("balance_primary", primary), ("balance_every", every)):
            if value is not None:
                raise ValueError(f"{name}={value!r} is set but balance is None: set balance='auto' to use it")
        return None
    if strategy == "fsdp":
        raise ValueError("balance='auto' is not supported with strategy='fsdp' (it needs each term's gradient on "
                         "the whole student); use strategy='ddp' or balance=None")
    _checks.integer("balance_every", every, ge=1, optional=True)
    if primary is None:
        methods = [k for k in candidates if k != "task"]
        primary = methods[0] if methods else "task"
    elif not isinstance(primary, str) or primary not in terms:
        raise ValueError(f"balance_primary must be one of the loss terms {', '.join(map(repr, terms))}, "
                         f"got {primary!r}")
    elif primary not in candidates:
        raise ValueError(f"balance_primary={primary!r} is never active (its weight is 0 and it has no schedule): "
                         "the other terms would have nothing to align with")
    return {"mode": balance, "primary": primary, "every": every}


class Balancer:
    """The factors of the loss terms ``keys`` and when to measure them (see the module docstring).

    ``logged``: the terms whose factors are logged (those that can be active). The loop calls
    :meth:`backward` in place of ``loss.backward()``; the step sums the terms with :meth:`total`.
    """

    mode = "auto"

    def __init__(self, keys: Sequence[str], primary: str, every: Optional[int] = None,
                 logged: Optional[Sequence[str]] = None, ctx: DistContext = DistContext()):
        self.keys, self.primary, self.every, self.ctx = list(keys), primary, every, ctx
        self.logged_keys = list(self.keys if logged is None else logged)
        self.factors = {k: 1.0 for k in self.keys}
        self.steps = 0  # training steps taken (measured or not)
        self.extra_backward_passes = 0  # the cost so far: N - 1 per measurement of N active terms

    # -- schedule ----------------------------------------------------------------------------------
    def interval(self) -> int:
        """Steps between measurements: ``every``, or 10 x (active terms - 1)."""
        if self.every is not None:
            return self.every
        return EVERY_PER_EXTRA_PASS * max(1, len(self.logged_keys) - 1)

    def due(self) -> bool:
        """Whether the coming step measures (its forward pass runs under DDP's ``no_sync``)."""
        return self.steps % self.interval() == 0

    # -- the step's sum and its log ----------------------------------------------------------------
    def total(self, terms: dict) -> torch.Tensor:
        """:math:`\\sum_i f_i\\, \\text{term}_i` with the current factors."""
        return sum(t if self.factors[k] == 1.0 else self.factors[k] * t for k, t in terms.items())

    def logged(self, device) -> dict[str, torch.Tensor]:
        return {PREFIX + k: torch.tensor(self.factors[k], dtype=torch.float64, device=device)
                for k in self.logged_keys}

    # -- the backward pass -------------------------------------------------------------------------
    def backward(self, losses: dict, shared: Sequence[torch.nn.Parameter], params: Sequence[torch.nn.Parameter],
                 scaler=None, weights: Optional[dict] = None) -> None:
        """Backpropagate ``losses["loss"]`` (a step's output), or on a measuring step each active term
        on its own, update the factors and set every ``params``' gradient to the re-weighted sum.
        ``shared``: the parameters the statistics are taken over (the student's); ``weights``: each
        term's weight in this step (the terms in ``losses`` are weighted; default 1)."""
        due = self.due()
        self.steps += 1
        active = [k for k in self.keys if losses[k].requires_grad]
        if not due or len(active) < 2 or self.primary not in active:
            (scaler.scale(losses["loss"]) if scaler is not None else losses["loss"]).backward()
            return
        params = list(params)
        self.extra_backward_passes += len(active) - 1
        grads = {}
        for n, k in enumerate(active):
            term = scaler.scale(losses[k]) if scaler is not None else losses[k]
            grads[k] = list(torch.autograd.grad(term, params, retain_graph=n < len(active) - 1, allow_unused=True))
        if self.ctx.enabled:
            self._average(grads, params)
        ids = {id(p) for p in shared}
        on_shared = [i for i, p in enumerate(params) if id(p) in ids]
        self.factors.update(self.measure({k: [grads[k][i] for i in on_shared] for k in active}, weights or {}))
        if self.ctx.enabled:  # the same factors on every process, whatever the float reductions did
            values = torch.tensor([self.factors[k] for k in self.keys], dtype=torch.float64,
                                  device=self.ctx_device(params))
            self.ctx.broadcast_(values)
            self.factors = dict(zip(self.keys, values.tolist()))
        for i, p in enumerate(params):
            parts = [(self.factors[k], grads[k][i]) for k in active if grads[k][i] is not None]
            p.grad = None if not parts else sum(g if f == 1.0 else f * g for f, g in parts)
        with torch.no_grad():  # what the step logs: the sum it took and its factors
            losses["loss"] = self.total({k: losses[k].detach() for k in self.keys})
            losses.update(self.logged(losses["loss"].device))

    def measure(self, grads: dict[str, list], weights: dict) -> dict[str, float]:
        """New factors of the auxiliary terms from the gradients of the weighted terms (lists of
        per-parameter tensors, None where a term does not reach a parameter) and their ``weights``
        (the module docstring's formula); the terms that give no information are left out."""
        g_p = grads[self.primary]
        primary = math.sqrt(_dot(g_p, g_p))
        if not (primary > 0 and math.isfinite(primary)):
            return {}
        out = {}
        for k, g in grads.items():
            if k == self.primary:
                continue
            norm = math.sqrt(_dot(g, g)) / weights.get(k, 1.0)  # the gradient before the term's weight
            cos = _dot(g_p, g) / (primary * norm * weights.get(k, 1.0)) if norm > 0 else math.nan
            factor = max(0.0, min(1.0, cos)) * min(1.0, primary / norm) if math.isfinite(cos) else math.nan
            if math.isfinite(factor):
                out[k] = factor
        return out

    def _average(self, grads: dict, params: list) -> None:
        """Every term's gradients averaged over the processes (one all-reduce of a (terms, numel) buffer)."""
        keys = list(grads)
        flat = torch.stack([torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1)
                                       for g, p in zip(grads[k], params)]) for k in keys])
        self.ctx.all_reduce_sum(flat)
        flat /= self.ctx.world_size
        for row, k in zip(flat, keys):
            pieces = row.split([p.numel() for p in params])
            grads[k] = [None if g is None and not bool(x.any()) else x.view_as(p)
                        for g, x, p in zip(grads[k], pieces, params)]

    @staticmethod
    def ctx_device(params: Sequence[torch.Tensor]) -> torch.device:
        return params[0].device if params else torch.device("cpu")

    # -- checkpoints -------------------------------------------------------------------------------
    def config(self) -> dict:
        return {"mode": self.mode, "primary": self.primary, "every": self.every}

    def state_dict(self) -> dict:
        return {**self.config(), "factors": {k: float(v) for k, v in self.factors.items()}, "steps": self.steps,
                "extra_backward_passes": self.extra_backward_passes}

    def load_state_dict(self, state: dict) -> None:
        factors, steps = state["factors"], state["steps"]
        if sorted(factors) != sorted(self.keys):
            raise ValueError(f"the saved factors are for the terms {sorted(factors)}, this run has {sorted(self.keys)}")
        if not all(isinstance(v, float) and math.isfinite(v) and v >= 0 for v in factors.values()):
            raise ValueError(f"the saved factors are not finite floats >= 0: {factors}")
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
            raise ValueError(f"the saved step count is {steps!r}, not an int >= 0")
        self.factors, self.steps = {k: factors[k] for k in self.keys}, steps
        self.extra_backward_passes = int(state.get("extra_backward_passes", 0))


def _dot(a: Sequence[Optional[torch.Tensor]], b: Sequence[Optional[torch.Tensor]]) -> float:
    """:math:`\\sum_q \\langle a_q, b_q\\rangle` over the parameters both reach, in float64."""
    total = None
    for x, y in zip(a, b):
        if x is not None and y is not None:
            d = torch.dot(x.reshape(-1).double(), y.reshape(-1).double())
            total = d if total is None else total + d
    return 0.0 if total is None else float(total)
