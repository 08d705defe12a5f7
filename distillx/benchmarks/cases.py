"""The benchmark cases of ``distillx bench``: one declarative row per op.

A :class:`Case` names the pure-PyTorch reference (the *eager* column; the *compile* column is
``torch.compile`` of the same function) and the fused distillx function (the *distillx* column) as
``"module:function"`` strings, so that nothing is imported until a case runs (and a subprocess can
rebuild a case from its name). Its input builder receives the resolved sizes, the dtype, the device
and a seeded generator, and returns the positional tensors in call order; every implementation is
called as ``fn(*inputs.args.values(), **inputs.kwargs, **params)``.

Adding a case: a builder ``(sizes, dtype, device, generator) -> Inputs`` and one
``register_case(Case(name=..., reference="distillx.ops.reference:...", fused="distillx.functional:...",
build=..., sizes=..., quick=..., op="<distillx op>"))``; ``mmd_rbf`` at the end of this file is a
complete example. ``op`` names the ``distillx::`` op the fused column must reach (the run reports
which backend served it).

Every size key of every case becomes a ``distillx bench --KEY`` flag automatically.

A case's ``cost(sizes, dtype, params)`` is its cost model for the floor of :mod:`.ceilings`:
``{"flops": F, "bytes": M}`` of one forward+backward, or None where no floor is meaningful. ``F``
counts GEMM FLOPs only (2·m·n·k per product; N²·D for a symmetric N×N Gram of N×D rows, whose upper
triangle suffices); elementwise work (exp, log, softmax) is not counted. ``M`` is the minimum
traffic: every input read once and every gradient written once, ``E`` bytes an element of ``dtype``;
intermediates (logits, Gram matrices) are not counted. So the floor is a lower bound of any
implementation of the case, fused or not. The formula is in each cost function's docstring.
"""
from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Mapping, Optional

import torch

from . import gkd, lm


@dataclass
class Inputs:
    """What a case's builder returns.

    ``args`` are the positional tensors in call order, keyed by a name used in reports (gradient
    checks); ``kwargs`` are keyword tensors (e.g. a mask). Leaves that need a gradient have
    ``requires_grad=True``; teacher-side tensors do not.
    """

    args: Dict[str, torch.Tensor]
    kwargs: Dict[str, Any] = field(default_factory=dict)

    def tensors(self):
        for name, value in list(self.args.items()) + list(self.kwargs.items()):
            if isinstance(value, torch.Tensor):
                yield name, value

    def grad_leaves(self):
        """``(name, tensor)`` of the inputs whose gradient the benchmark computes."""
        return [(n, t) for n, t in self.tensors() if t.requires_grad]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for _, t in self.tensors())


@dataclass(frozen=True)
class Case:
    """One benchmark case. See the module docstring."""

    name: str
    description: str
    reference: str  # "module:function": eager column, and what the compile column compiles
    fused: str  # "module:function": the distillx column
    build: Callable[[Dict[str, int], torch.dtype, torch.device, torch.Generator], Inputs]
    sizes: Mapping[str, Optional[int]]  # defaults; None = derived by ``resolve``
    quick: Mapping[str, Optional[int]]  # tiny sizes for --quick (tests, CI)
    params: Mapping[str, Any] = field(default_factory=dict)  # keyword args of every implementation
    fused_params: Mapping[str, Any] = field(default_factory=dict)  # keyword args of distillx only
    resolve: Optional[Callable[[Dict[str, Optional[int]]], Dict[str, int]]] = None  # fill derived sizes
    compile_options: Mapping[str, Any] = field(default_factory=lambda: {"dynamic": False})
    rtol: Mapping[str, float] = field(default_factory=dict)  # per-dtype override of the check tolerance
    op: Optional[str] = None  # the distillx:: operator behind ``fused``, to report which backend served it
    size_doc: Mapping[str, str] = field(default_factory=dict)  # what each size means (for --help)
    # (sizes, dtype, params) -> {"flops", "bytes"} of forward+backward, or None: no floor (module docstring)
    cost: Optional[Callable[[Dict[str, int], torch.dtype, Mapping[str, Any]], Optional[Dict[str, int]]]] = None

    def size_keys(self):
        return tuple(self.sizes)

    def resolve_sizes(self, quick: bool = False, overrides: Optional[Mapping[str, int]] = None) -> Dict[str, int]:
        """Default (or quick) sizes with ``overrides`` applied (keys this case lacks are ignored)."""
        sizes = dict(self.quick if quick else self.sizes)
        for key, value in (overrides or {}).items():
            if key in sizes:
                sizes[key] = value
        out = self.resolve(sizes) if self.resolve else dict(sizes)
        for key, value in out.items():
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{self.name}: size {key} must be a positive integer, got {value!r}")
        return out


CASES: Dict[str, Case] = {}


def register_case(case: Case) -> Case:
    """Add ``case`` to the table; a duplicate name is an error (no silent overwrite)."""
    if case.name in CASES:
        raise ValueError(f"benchmark case {case.name!r} is already registered")
    missing = [k for k in case.sizes if k not in case.quick]
    if missing:
        raise ValueError(f"benchmark case {case.name!r}: quick sizes lack {missing}")
    CASES[case.name] = case
    return case


def get_case(name: str) -> Case:
    try:
        return CASES[name]
    except KeyError:
        raise ValueError(f"unknown benchmark case {name!r}; known: {', '.join(CASES)}") from None


def load_callable(path: str) -> Callable:
    """Import ``"package.module:function"``."""
    module, _, attr = path.partition(":")
    obj = importlib.import_module(module)
    for part in attr.split("."):
        obj = getattr(obj, part)
    return obj


def sizes_label(sizes: Mapping[str, int]) -> str:
    return " ".join(f"{k}={v}" for k, v in sizes.items())


def _randn(shape, dtype, device, gen, scale=1.0, requires_grad=False):
    x = torch.randn(shape, generator=gen, device=device, dtype=dtype)
    if scale != 1.0:
        x.mul_(scale)
    return x.requires_grad_(requires_grad)


# ---------------------------------------------------------------------------------------------
# logit_kd: divergence of (N, C) logits
# ---------------------------------------------------------------------------------------------

def _build_logit_kd(sizes, dtype, device, gen):
    N, C = sizes["N"], sizes["C"]
    # Logits with a realistic spread (std 2) so the softmax is neither flat nor one-hot.
    return Inputs(args={
        "student_logits": _randn((N, C), dtype, device, gen, 2.0, requires_grad=True),
        "teacher_logits": _randn((N, C), dtype, device, gen, 2.0),
    })


def cost_logit_kd(sizes, dtype, params):
    """No GEMM; reads student and teacher logits, writes the student's gradient:
    ``flops = 0``, ``bytes = 3·N·C·E``."""
    return {"flops": 0, "bytes": 3 * sizes["N"] * sizes["C"] * dtype.itemsize}


register_case(Case(
    name="logit_kd",
    description="logit divergence T^2*D(softmax(t/T) || softmax(s/T)) of (N, C) logits, batchmean",
    reference="distillx.ops.reference:kd_loss_reference",
    fused="distillx.functional:kd_loss",
    build=_build_logit_kd,
    sizes={"N": 2048, "C": 32000},
    quick={"N": 64, "C": 512},
    params={"temperature": 2.0, "divergence": "kl", "beta": 0.5, "reduction": "batchmean"},
    op="logit_divergence",
    size_doc={"N": "rows", "C": "classes (vocabulary)"},
    cost=cost_logit_kd,
))


# ---------------------------------------------------------------------------------------------
# linear_kd: the same divergence on hidden @ W^T, fused with the output projection
# ---------------------------------------------------------------------------------------------

def _resolve_linear_kd(sizes):
    H = sizes["H"]
    return {"N": sizes["N"], "Hs": sizes.get("Hs") or H, "Ht": sizes.get("Ht") or H, "C": sizes["C"]}


def _build_linear_kd(sizes, dtype, device, gen):
    N, Hs, Ht, C = sizes["N"], sizes["Hs"], sizes["Ht"], sizes["C"]
    # Unit-variance hidden states and 1/sqrt(H)-scaled heads give logits of std ~2 after the x2.
    return Inputs(args={
        "student_hidden": _randn((N, Hs), dtype, device, gen, 1.0, requires_grad=True),
        "student_weight": _randn((C, Hs), dtype, device, gen, 2.0 / math.sqrt(Hs), requires_grad=True),
        "teacher_hidden": _randn((N, Ht), dtype, device, gen, 1.0),
        "teacher_weight": _randn((C, Ht), dtype, device, gen, 2.0 / math.sqrt(Ht)),
    })


def cost_linear_kd(sizes, dtype, params):
    """Four GEMMs (``distillx::linear_divergence``): student logits h_s W_sᵀ (2·N·C·Hs), teacher
    logits h_t W_tᵀ (2·N·C·Ht), ∂h_s = G W_s and ∂W_s = Gᵀ h_s (2·N·C·Hs each), G the (N, C) logit
    gradient: ``flops = 2·N·C·(3·Hs + Ht)``. Reads h_s, W_s, h_t, W_t, writes ∂h_s, ∂W_s:
    ``bytes = (2·(N + C)·Hs + (N + C)·Ht)·E``."""
    N, C, Hs, Ht = sizes["N"], sizes["C"], sizes["Hs"], sizes["Ht"]
    return {"flops": 2 * N * C * (3 * Hs + Ht), "bytes": (2 * (N + C) * Hs + (N + C) * Ht) * dtype.itemsize}


register_case(Case(
    name="linear_kd",
    description="fused linear divergence: the logit divergence of hidden_s @ W_s^T vs hidden_t @ W_t^T",
    reference="distillx.ops.reference:linear_kd_loss_reference",
    fused="distillx.functional:linear_kd_loss",
    build=_build_linear_kd,
    # H sets both widths; --Hs / --Ht override one side.
    sizes={"N": 4096, "H": 512, "Hs": None, "Ht": None, "C": 32000},
    quick={"N": 64, "H": 32, "Hs": None, "Ht": None, "C": 512},
    params={"temperature": 2.0, "divergence": "kl", "beta": 0.5, "reduction": "batchmean"},
    fused_params={"chunk_size": None},
    resolve=_resolve_linear_kd,
    op="linear_divergence",
    size_doc={"N": "rows", "C": "classes (vocabulary)", "H": "hidden width of student and teacher",
              "Hs": "student hidden width (default: H)", "Ht": "teacher hidden width (default: H)"},
    cost=cost_linear_kd,
))


# ---------------------------------------------------------------------------------------------
# feature distillation: kernel Gram matching (KFD), attention transfer (AT), MiniLM relations
# ---------------------------------------------------------------------------------------------

def _build_gram(sizes, dtype, device, gen):
    N, Ds, Dt = sizes["N"], sizes["Ds"], sizes["Dt"]
    return Inputs(args={
        "s": _randn((N, Ds), dtype, device, gen, 1.0, requires_grad=True),
        "t": _randn((N, Dt), dtype, device, gen, 1.0),
    })


GRAM_KERNELS = ("rbf", "polynomial")  # kernels on <x_i, x_j> (and norms) of the raw rows


def cost_gram(sizes, dtype, params):
    """Symmetric Grams S Sᵀ (N²·Ds) and T Tᵀ (N²·Dt), and the gradient ∂s = diag(M1) S − M S of
    the (N, N) symmetric coefficient matrix M (2·N²·Ds): ``flops = N²·(3·Ds + Dt)``, with or
    without ``normalize_rows`` (the same products; distillx's two sweeps recompute the Grams, which
    the floor does not count). Reads s, t, writes ∂s: ``bytes = N·(2·Ds + Dt)·E``. None for kernels
    other than rbf / polynomial (the linear / cosine forms are O(N·D²), chebyshev widens the rows)."""
    if params.get("kernel") not in GRAM_KERNELS:
        return None
    N, Ds, Dt = sizes["N"], sizes["Ds"], sizes["Dt"]
    return {"flops": N * N * (3 * Ds + Dt), "bytes": N * (2 * Ds + Dt) * dtype.itemsize}


GRAM_RBF = register_case(Case(
    name="gram_rbf",
    description="kernel Gram matching mean_ij (k(s_i,s_j) - k(t_i,t_j))^2, RBF kernel, mean-distance bandwidth",
    reference="distillx.ops.reference:kernel_gram_loss_reference",
    fused="distillx.functional:kernel_gram_loss",
    build=_build_gram,
    sizes={"N": 4096, "Ds": 128, "Dt": 512},
    quick={"N": 48, "Ds": 8, "Dt": 12},
    params={"kernel": "rbf"},
    op="kernel_gram",
    size_doc={"N": "rows (samples)", "Ds": "student width", "Dt": "teacher width"},
    cost=cost_gram,
))


register_case(dataclasses.replace(
    GRAM_RBF, name="sp_rbf",
    description="row-normalised kernel Gram matching (SP-KD with any kernel), RBF kernel: two sweeps",
    params={"kernel": "rbf", "normalize_rows": True}))


def _build_attention_map(sizes, dtype, device, gen):
    B, Cs, Ct, H, W = sizes["B"], sizes["Cs"], sizes["Ct"], sizes["H"], sizes["W"]
    return Inputs(args={
        "f_s": _randn((B, Cs, H, W), dtype, device, gen, 1.0, requires_grad=True),
        "f_t": _randn((B, Ct, H, W), dtype, device, gen, 1.0),
    })


def cost_attention_map(sizes, dtype, params):
    """No GEMM (channel reductions of |F|^p); reads f_s and f_t, writes ∂f_s:
    ``flops = 0``, ``bytes = B·H·W·(2·Cs + Ct)·E``."""
    B, Cs, Ct, H, W = sizes["B"], sizes["Cs"], sizes["Ct"], sizes["H"], sizes["W"]
    return {"flops": 0, "bytes": B * H * W * (2 * Cs + Ct) * dtype.itemsize}


register_case(Case(
    name="attention_map",
    description="attention transfer mean_{b,k}(a_s - a_t)^2, a = normalize(mean_c |F|^2), feature maps",
    reference="distillx.ops.reference:attention_map_loss_reference",
    fused="distillx.functional:attention_map_loss",
    build=_build_attention_map,
    sizes={"B": 64, "Cs": 128, "Ct": 512, "H": 32, "W": 32},
    quick={"B": 4, "Cs": 3, "Ct": 5, "H": 6, "W": 6},
    params={"p": 2.0},
    op="attention_map",
    size_doc={"B": "batch", "Cs": "student channels", "Ct": "teacher channels", "H": "height", "W": "width"},
    cost=cost_attention_map,
))


def _build_relation(sizes, dtype, device, gen):
    BA, L, ds, dt = sizes["BA"], sizes["L"], sizes["ds"], sizes["dt"]
    q_s = _randn((BA, 1, L, ds), dtype, device, gen, 1.0, requires_grad=True)
    k_s = _randn((BA, 1, L, ds), dtype, device, gen, 1.0, requires_grad=True)
    q_t = _randn((BA, 1, L, dt), dtype, device, gen, 1.0)
    k_t = _randn((BA, 1, L, dt), dtype, device, gen, 1.0)
    return Inputs(args={"q_s": q_s, "k_s": k_s, "q_t": q_t, "k_t": k_t})


def cost_attention_relation(sizes, dtype, params):
    """Per batch·head, the relation logits q_s k_sᵀ (2·L²·ds) and q_t k_tᵀ (2·L²·dt), and the
    gradients ∂q_s = G k_s, ∂k_s = Gᵀ q_s (2·L²·ds each), G the (L, L) logit gradient:
    ``flops = 2·BA·L²·(3·ds + dt)``. Reads q_s, k_s, q_t, k_t, writes ∂q_s, ∂k_s:
    ``bytes = BA·L·(4·ds + 2·dt)·E``."""
    BA, L, ds, dt = sizes["BA"], sizes["L"], sizes["ds"], sizes["dt"]
    return {"flops": 2 * BA * L * L * (3 * ds + dt), "bytes": BA * L * (4 * ds + 2 * dt) * dtype.itemsize}


register_case(Case(
    name="attention_relation",
    description="MiniLM relation KL(softmax(q_t k_t^T/sqrt(dt)) || softmax(q_s k_s^T/sqrt(ds))) per query row",
    reference="distillx.ops.reference:attention_relation_loss_reference",
    fused="distillx.functional:attention_relation_loss",
    build=_build_relation,
    sizes={"BA": 48, "L": 512, "ds": 32, "dt": 64},
    quick={"BA": 3, "L": 17, "ds": 4, "dt": 8},
    op="attention_relation",
    size_doc={"BA": "batch x heads", "L": "sequence length", "ds": "student head width", "dt": "teacher head width"},
    cost=cost_attention_relation,
))


def _build_mmd(sizes, dtype, device, gen):
    N, M, D = sizes["N"], sizes["M"], sizes["D"]
    # Two different distributions: MMD of identical ones is a float32 cancellation of O(1) terms.
    return Inputs(args={
        "s": _randn((N, D), dtype, device, gen, 1.0, requires_grad=True),
        "t": _randn((M, D), dtype, device, gen, 0.5).add_(0.2),
    })


def cost_mmd(sizes, dtype, params):
    """Symmetric Grams S Sᵀ (N²·D) and T Tᵀ (M²·D), the cross products S Tᵀ (2·N·M·D), and the
    gradient from the student pairs (2·N²·D) and the cross pairs (2·N·M·D):
    ``flops = D·(3·N² + M² + 4·N·M)``. Reads s, t, writes ∂s: ``bytes = (2·N + M)·D·E``.
    None for kernels other than rbf / polynomial."""
    if params.get("kernel") not in GRAM_KERNELS:
        return None
    N, M, D = sizes["N"], sizes["M"], sizes["D"]
    return {"flops": D * (3 * N * N + M * M + 4 * N * M), "bytes": (2 * N + M) * D * dtype.itemsize}


register_case(Case(
    name="mmd_rbf",
    description="kernel MMD mean k(s,s') + mean k(t,t') - 2 mean k(s,t), RBF kernel (NST)",
    reference="distillx.ops.reference:mmd_loss_reference",
    fused="distillx.functional:mmd_loss",
    build=_build_mmd,
    sizes={"N": 4096, "M": 4096, "D": 128},
    quick={"N": 40, "M": 24, "D": 8},
    params={"kernel": "rbf"},
    op="kernel_mmd",
    size_doc={"N": "student rows", "M": "teacher rows", "D": "width"},
    cost=cost_mmd,
))


# ---------------------------------------------------------------------------------------------
# lm_kd: a whole LM distillation step, full logits + kd (eager/compile) vs lm_kd (distillx)
# ---------------------------------------------------------------------------------------------
# No cost model (no floor) for lm_kd and the gkd cases: their timed step includes both models' bodies
# (and, for gkd, sampling), whose work the loss's formula does not cover, so a loss-only floor would
# be no bound of the step. The loss part's floor is linear_kd's at N = B·L (--cases linear_kd).

def _resolve_lm(sizes):
    return {k: sizes[k] for k in ("B", "L", "C", "Hs", "Ht")}


def _build_lm(sizes, dtype, device, gen):
    args, kwargs = lm.build(sizes, dtype, device, gen)
    return Inputs(args=args, kwargs=kwargs)


if importlib.util.find_spec("transformers") is not None:  # the hf extra: LLaMA-style models from configs
    register_case(Case(
        name="lm_kd",
        description="LLaMA-style LM pair, forward+backward of the distillation loss: full logits + kd vs lm_kd",
        reference="distillx.benchmarks.lm:kd_full_logits",
        fused="distillx.benchmarks.lm:lm_kd_step",
        build=_build_lm,
        sizes={"B": 8, "L": 512, "C": 32000, "Hs": 256, "Ht": 512},
        quick={"B": 2, "L": 16, "C": 512, "Hs": 32, "Ht": 64},
        params={"temperature": 1.0, "divergence": "kl"},
        resolve=_resolve_lm,
        op="linear_divergence",
        size_doc={"B": "batch", "L": "sequence length", "C": "vocabulary", "Hs": "student hidden width",
                  "Ht": "teacher hidden width"},
    ))

# ---------------------------------------------------------------------------------------------
# gkd: a whole on-policy step (sampling, teacher scoring, loss, backward) at two vocabularies
# ---------------------------------------------------------------------------------------------

def _resolve_gkd(sizes):
    return {k: sizes[k] for k in ("B", "P", "G", "C", "Hs", "Ht")}


def _build_gkd(sizes, dtype, device, gen):
    args, kwargs = gkd.build(sizes, dtype, device, gen)
    return Inputs(args=args, kwargs=kwargs)


if importlib.util.find_spec("transformers") is not None:
    for _name, _vocab in (("gkd", 32000), ("gkd_128k", 128256)):
        register_case(Case(
            name=_name,
            description=f"on-policy step of a LLaMA-style pair at vocabulary {_vocab}: student samples, teacher "
                        "scores, JSD: full logits (TRL-style) vs gkd",
            reference="distillx.benchmarks.gkd:gkd_full_logits",
            fused="distillx.benchmarks.gkd:gkd_step",
            build=_build_gkd,
            sizes={"B": 4, "P": 64, "G": 32, "C": _vocab, "Hs": 256, "Ht": 512},
            quick={"B": 2, "P": 6, "G": 3, "C": 512, "Hs": 32, "Ht": 64},
            params={"temperature": 1.0},
            resolve=_resolve_gkd,
            op="linear_divergence",
            size_doc={"B": "batch", "P": "prompt length", "G": "sampled tokens", "C": "vocabulary",
                      "Hs": "student hidden width", "Ht": "teacher hidden width"},
        ))
