"""User-facing distillation losses.

Each function validates its arguments (errors name the argument and what was expected), then calls
its op family in :mod:`distillx.ops`, which runs the fused ``distillx::*`` operator when the compiled
core serves the inputs' device, else the pure-PyTorch reference in :mod:`distillx.ops.reference`
(warning once). All are differentiable w.r.t. the student side only: teacher inputs are constants.

Empty inputs, one rule for every loss: **no samples is a loss of 0 with a zero gradient; an empty
dimension within a sample is an error.** A batch without rows — N = 0 rows of logits or hidden
states, N = 0 (or M = 0) rows of features, B = 0 feature maps, no query rows (B, A or L = 0) — sums
over nothing, as a batch whose rows are all masked does (``reduction="none"`` returns an empty
tensor). An empty per-sample dimension — no classes (C = 0), a feature or hidden width of 0, no
channels or no spatial positions in a map, head width d = 0 — leaves the loss undefined: a
``ValueError`` names the argument, the dimension and its shape.

Temperatures: ``kd_loss`` and ``linear_kd_loss`` compute ``softmax(logits / T)`` and ``T²·D`` in
float32 (float64 for float64 inputs). High temperatures make both distributions nearly uniform: the
loss value loses about ε·T² of relative precision and the gradient about ε·T (measured in float32
on logits of unit spread: loss 6e-5 and gradient 9e-6 at T = 100, loss 2e-2 and gradient 9e-5 at
T = 1000, loss 2 (garbage) at T = 1e4), and T² over- or underflows at the extremes (T = 1e20 gave
NaN). So ``temperature`` must lie in :data:`TEMPERATURE_RANGE` for the computing precision, where
the loss is within about 2%; outside it is a ``ValueError`` naming the range.

Higher-order gradients are exact: a backward with ``create_graph=True`` (a Hessian-vector product, a
gradient penalty) through a compiled op recomputes that op's gradient with PyTorch operations on its
saved inputs, so autograd differentiates it again (the forward and plain backward stay fused).
``torch.func`` transforms (``grad``, ``vmap``, ``jacrev``, ``hessian``, ``jvp``) run the references,
which are made of operations they can transform.
"""
from __future__ import annotations

import torch

from . import _checks
from .ops import attention_map, attention_relation, kernel_gram, linear_divergence, logit_divergence
from .ops import reference as ref
from .ops._library import acc_dtype
from .ops.reference import DIVERGENCES, REDUCTIONS


# (lowest, highest) temperature per computing precision: float64 inputs, and every other dtype (float32).
TEMPERATURE_RANGE = {torch.float64: (1e-150, 1e7), torch.float32: (1e-18, 1e3)}


def _check_divergence_options(temperature, divergence, beta, reduction, dtype):
    _checks.positive("temperature", temperature)
    acc = acc_dtype(dtype)
    low, high = TEMPERATURE_RANGE[acc]
    if not low <= temperature <= high:
        raise ValueError(f"temperature must be in [{low:g}, {high:g}] for {str(dtype).replace('torch.', '')} inputs "
                         f"(computed in {str(acc).replace('torch.', '')}: beyond that range the divergence of "
                         f"softmax(logits / T) is lost to rounding, about {torch.finfo(acc).eps:.1e}·T² relative, "
                         f"or T² overflows); got {temperature!r}"
                         + ("; float64 inputs allow up to 1e+07" if acc == torch.float32 else ""))
    _checks.choice("divergence", divergence, DIVERGENCES)
    _checks.unit_interval("beta", beta)
    _checks.choice("reduction", reduction, REDUCTIONS)


def _nonempty(name, x, dims, what):
    """``ValueError`` when dimension ``dims`` (an int or a tuple) of ``x`` is empty (see the module docstring)."""
    for d in (dims,) if isinstance(dims, int) else dims:
        if x.shape[d] == 0:
            raise ValueError(f"{name} has an empty {what} (dimension {d % x.dim()} of shape {tuple(x.shape)}): the loss "
                             "is undefined without it; only an empty batch (no samples) is allowed, and gives 0")


def _no_samples(x):
    """0 with a zero gradient w.r.t. ``x``, in ``x``'s dtype: the sum over no samples."""
    return x.flatten()[:0].sum()


def kd_loss(student_logits, teacher_logits, temperature=1.0, divergence="kl", beta=0.5, reduction="batchmean",
            mask=None):
    r"""Logit distillation loss between student and teacher distributions (Hinton et al., 2015).

    With p = softmax(teacher/T) and q = softmax(student/T), per row:

    * ``"kl"`` (forward KL): :math:`T^2\,\mathrm{KL}(p\|q) = T^2 \sum_c p_c(\log p_c - \log q_c)`
    * ``"reverse_kl"``: :math:`T^2\,\mathrm{KL}(q\|p)` (mode-seeking; MiniLLM, Gu et al., 2024)
    * ``"jsd"``: :math:`T^2[\beta\,\mathrm{KL}(p\|m) + (1-\beta)\,\mathrm{KL}(q\|m)]`, m = βp + (1−β)q
      (generalised JSD, GKD, Agarwal et al., 2024; β = 0.5 is the symmetric Jensen–Shannon
      divergence; β = 0 and β = 1 make it identically 0 — use "kl"/"reverse_kl" for those limits).

    Args:
        student_logits: (..., C) float tensor; leading dims are flattened to rows.
        teacher_logits: same shape; treated as a constant (no gradient flows to it). A different
            floating dtype is converted to the student's.
        temperature: T > 0; the loss is scaled by T² so gradient magnitudes do not depend on T.
        divergence: "kl", "reverse_kl" or "jsd".
        beta: JSD mixing weight in [0, 1].
        reduction: "batchmean" (sum over kept rows / number of kept rows), "sum", "mean"
            (/ kept rows·C, like ``F.kl_div(reduction="mean")``) or "none" (per-row, shape (...)).
        mask: optional bool tensor of shape (...) (or (N,)); False drops a row. With every row
            dropped the loss is 0 with a zero gradient.

    ``-inf`` logits (masked vocabulary) are allowed where the other side's probability is 0 too
    (0·log 0 = 0). The loss is returned in the student's dtype; internal math is float32 (float64
    for float64 inputs).

    Example::

        loss = distillx.functional.kd_loss(student(x), teacher(x).detach(), temperature=4.0)
    """
    s = _checks.floating_tensor("student_logits", student_logits)
    t = _checks.floating_tensor("teacher_logits", teacher_logits)
    if s.shape != t.shape:
        raise ValueError(f"teacher_logits shape {tuple(t.shape)} must match student_logits shape {tuple(s.shape)}")
    _nonempty("student_logits", s, -1, "class dimension")
    rows_shape = tuple(s.shape[:-1])
    m = None if mask is None else _checks.row_mask(mask, rows_shape)
    _checks.same_device(student_logits=s, teacher_logits=t, mask=m)
    _check_divergence_options(temperature, divergence, beta, reduction, s.dtype)
    return logit_divergence.kd_loss(s, t.detach().to(s.dtype), temperature, divergence, beta, reduction, m)


def linear_kd_loss(student_hidden, student_weight, teacher_hidden, teacher_weight, student_bias=None,
                   teacher_bias=None, temperature=1.0, divergence="kl", beta=0.5, reduction="batchmean", mask=None,
                   chunk_size=None):
    r""":func:`kd_loss` on the logits of two linear output layers, without materialising them.

    Computes ``kd_loss(student_hidden @ student_weight.T + student_bias,
    teacher_hidden @ teacher_weight.T + teacher_bias, ...)`` in chunks of rows, so memory is
    O(chunk_size·C) instead of O(N·C) — the LM-head case where C is a vocabulary (Liger-Kernel's
    fused linear losses do the same for cross-entropy/JSD). Gradients flow to ``student_hidden``,
    ``student_weight`` and ``student_bias``; the teacher side is constant.

    Args:
        student_hidden: (..., Hs); student_weight: (C, Hs); student_bias: (C,) or None.
        teacher_hidden: (..., Ht) with the same leading dims; teacher_weight: (C, Ht); teacher_bias: (C,) or None.
        chunk_size: rows per chunk (more than the rows there are: one chunk); None picks about 8M logits
            per chunk.
        temperature, divergence, beta, reduction, mask: as in :func:`kd_loss`.

    Example::

        loss = linear_kd_loss(h_s, student.lm_head.weight, h_t, teacher.lm_head.weight, temperature=2.0)
    """
    hs = _checks.floating_tensor("student_hidden", student_hidden)
    ht = _checks.floating_tensor("teacher_hidden", teacher_hidden)
    ws = _checks.floating_tensor("student_weight", student_weight, min_dim=2)
    wt = _checks.floating_tensor("teacher_weight", teacher_weight, min_dim=2)
    for name, w, h in (("student_weight", ws, hs), ("teacher_weight", wt, ht)):
        if w.dim() != 2 or w.shape[1] != h.shape[-1]:
            raise ValueError(f"{name} must have shape (C, {h.shape[-1]}) to match the hidden width, got {tuple(w.shape)}")
    if wt.shape[0] != ws.shape[0]:
        raise ValueError(f"teacher_weight has {wt.shape[0]} classes but student_weight has {ws.shape[0]}; they must agree")
    if hs.shape[:-1] != ht.shape[:-1]:
        raise ValueError(f"teacher_hidden leading shape {tuple(ht.shape[:-1])} must match student_hidden's {tuple(hs.shape[:-1])}")
    _nonempty("student_hidden", hs, -1, "hidden width")
    _nonempty("teacher_hidden", ht, -1, "hidden width")
    _nonempty("student_weight", ws, 0, "class dimension")
    C = ws.shape[0]
    for name, b, w in (("student_bias", student_bias, ws), ("teacher_bias", teacher_bias, wt)):
        if b is not None:
            _checks.floating_tensor(name, b)
            if tuple(b.shape) != (C,):
                raise ValueError(f"{name} must have shape ({C},), got {tuple(b.shape)}")
    if chunk_size is not None:
        _checks.integer("chunk_size", chunk_size, ge=1)
    rows_shape = tuple(hs.shape[:-1])
    m = None if mask is None else _checks.row_mask(mask, rows_shape)
    _checks.same_device(student_hidden=hs, student_weight=ws, student_bias=student_bias, teacher_hidden=ht,
                        teacher_weight=wt, teacher_bias=teacher_bias, mask=m)
    _check_divergence_options(temperature, divergence, beta, reduction, hs.dtype)
    dtype = hs.dtype
    ws, bs = ws.to(dtype), None if student_bias is None else student_bias.to(dtype)
    wt = wt.detach()
    bt = None if teacher_bias is None else teacher_bias.detach().to(wt.dtype)
    return linear_divergence.linear_kd_loss(hs, ws, ht.detach().to(wt.dtype), wt, bs, bt, temperature, divergence,
                                            beta, reduction, m, chunk_size)


# --- feature distillation --------------------------------------------------------------------

def _rows(name, x):
    x = _checks.floating_tensor(name, x, min_dim=2)
    _nonempty(name, x, tuple(range(1, x.dim())), "feature dimension")
    return x.flatten(1)


def kernel_gram_loss(s, t, kernel="rbf", normalize_rows=False, **kernel_params):
    r"""Kernel-function distillation by Gram matching: ``mean_ij (k(s_i,s_j) − k(t_i,t_j))²``.

    The batch's kernel matrices of student and teacher features must agree; rows are samples, every
    further dimension is flattened, and the widths of ``s`` (N, Ds…) and ``t`` (N, Dt…) may differ (no
    adapter needed). Kernels: ``"linear"``, ``"polynomial"`` (degree=2, coef0=1: (⟨x,z⟩/D + c)^d),
    ``"rbf"`` (sigma2=None: the mean pairwise squared distance per side), ``"chebyshev"`` (order=3,
    eps=1e-3, scale=None: max|x|; Ozer et al. 2011) and ``"cosine"`` (:mod:`distillx.ops.kernel_table`),
    or any callable ``k(x, z) -> (N, M)`` (reference path; a kernel a plugin registered is
    ``distillx.plugin.kernel(name)``). ``normalize_rows=True`` L2-normalises each Gram
    row first; with the linear kernel that is Similarity-Preserving KD (Tung & Mori, ICCV 2019).

    Example::

        loss = kernel_gram_loss(h_s, h_t, kernel="rbf")              # KFD with the RBF kernel
        loss = kernel_gram_loss(f_s, f_t, "linear", normalize_rows=True)   # SP
    """
    s2, t2 = _rows("s", s), _rows("t", t)
    if s2.shape[0] != t2.shape[0]:
        raise ValueError(f"t has {t2.shape[0]} rows (samples) but s has {s2.shape[0]}; they must agree")
    _checks.same_device(s=s2, t=t2)
    _checks.boolean("normalize_rows", normalize_rows)
    if s2.shape[0] == 0:
        kernel_gram.resolve(kernel, dict(kernel_params))  # the kernel and its parameters are still checked
        return _no_samples(s2)
    return kernel_gram.kernel_gram_loss(s2, t2.detach(), kernel, normalize_rows, kernel_params)


def mmd_loss(s, t, kernel="polynomial", **kernel_params):
    r"""Squared kernel MMD between the rows of ``s`` (N, D) and ``t`` (M, D) (Neuron Selectivity
    Transfer, Huang & Wang 2017): ``mean k(s,s') + mean k(t,t') − 2 mean k(s,t)``.

    NST's default is the polynomial kernel; any kernel of :func:`kernel_gram_loss` works. Both sets
    need the same width D.

    Example (NST on one image's channels, each normalised over its H·W positions)::

        loss = mmd_loss(F.normalize(f_s[i].flatten(1), dim=1), F.normalize(f_t[i].flatten(1), dim=1))
    """
    s2, t2 = _rows("s", s), _rows("t", t)
    if s2.shape[1] != t2.shape[1]:
        raise ValueError(f"t has width {t2.shape[1]} but s has {s2.shape[1]}; MMD needs equal widths")
    _checks.same_device(s=s2, t=t2)
    if s2.shape[0] == 0 or t2.shape[0] == 0:
        kernel_gram.resolve(kernel, dict(kernel_params))
        return _no_samples(s2)
    return kernel_gram.mmd_loss(s2, t2.detach(), kernel, kernel_params)


def attention_map_loss(f_s, f_t, p=2.0):
    r"""Attention transfer (Zagoruyko & Komodakis, ICLR 2017): ``mean_{b,k} (a_s − a_t)²`` with
    ``a(F) = normalize(vec(mean_c |F|^p))`` per sample.

    ``f_s`` (B, Cs, H, W) and ``f_t`` (B, Ct, H', W'): channel counts may differ; the larger attention
    map is adaptive-average-pooled to the smaller size. Any ``p > 0`` works: each sample is computed
    on ``F / max|F|``, which leaves its normalised map unchanged and keeps ``|F|^p`` finite (p = 200
    on features of magnitude 2 overflowed float32 before); a sample of subnormal magnitude (|F| ~ 1e-39
    in float32) is divided by its max, never multiplied by ``1/max`` (which overflows to inf).

    Example::

        loss = attention_map_loss(student_layer3_out, teacher_layer3_out, p=2)
    """
    fs = _checks.floating_tensor("f_s", f_s, min_dim=4)
    ft = _checks.floating_tensor("f_t", f_t, min_dim=4)
    if fs.dim() != 4 or ft.dim() != 4:
        raise ValueError(f"f_s and f_t must be (B, C, H, W) feature maps, got {tuple(fs.shape)} and {tuple(ft.shape)}")
    if fs.shape[0] != ft.shape[0]:
        raise ValueError(f"f_t has batch {ft.shape[0]} but f_s has {fs.shape[0]}")
    _checks.positive("p", p)
    _checks.same_device(f_s=fs, f_t=ft)
    _nonempty("f_s", fs, (1, 2, 3), "channel or spatial dimension")
    _nonempty("f_t", ft, (1, 2, 3), "channel or spatial dimension")
    if fs.shape[0] == 0:
        return _no_samples(fs)
    return attention_map.attention_map_loss(fs, ft.detach(), float(p))


def attention_relation_loss(q_s, k_s, q_t, k_t, key_padding_mask=None):
    r"""MiniLM attention-relation loss: ``Σ KL(softmax(q_t k_tᵀ/√dt) ‖ softmax(q_s k_sᵀ/√ds))`` over valid
    query rows, divided by their number (B·A·valid rows).

    Inputs (B, A, L, d): A heads (or MiniLMv2 relation heads from :func:`split_relation_heads`), the
    student width ds and teacher width dt may differ. ``key_padding_mask`` (B, L) bool, True for real
    tokens. Pass ``k is q`` for the Q-Q, K-K and V-V self-relations (MiniLM value relation: q = k = V).
    (Wang et al., MiniLM, NeurIPS 2020; MiniLMv2, ACL Findings 2021.)

    Example::

        loss = attention_relation_loss(q_s, k_s, q_t, k_t, key_padding_mask=attention_mask.bool())
    """
    names = ("q_s", "k_s", "q_t", "k_t")
    xs = [_checks.floating_tensor(n, x, min_dim=4) for n, x in zip(names, (q_s, k_s, q_t, k_t))]
    for n, x in zip(names, xs):
        if x.dim() != 4:
            raise ValueError(f"{n} must be (B, A, L, d), got {tuple(x.shape)}")
    if xs[0].shape != xs[1].shape:
        raise ValueError(f"k_s shape {tuple(xs[1].shape)} must match q_s shape {tuple(xs[0].shape)}")
    if xs[2].shape != xs[3].shape:
        raise ValueError(f"k_t shape {tuple(xs[3].shape)} must match q_t shape {tuple(xs[2].shape)}")
    if xs[0].shape[:3] != xs[2].shape[:3]:
        raise ValueError(f"q_t (B, A, L) = {tuple(xs[2].shape[:3])} must match q_s's {tuple(xs[0].shape[:3])}")
    _checks.same_device(q_s=xs[0], k_s=xs[1], q_t=xs[2], k_t=xs[3], key_padding_mask=key_padding_mask)
    if key_padding_mask is not None:
        B, _, L, _ = xs[0].shape
        if not isinstance(key_padding_mask, torch.Tensor) or key_padding_mask.dtype != torch.bool:
            raise TypeError("key_padding_mask must be a bool tensor (True = real token)")
        if tuple(key_padding_mask.shape) != (B, L):
            raise ValueError(f"key_padding_mask must have shape ({B}, {L}), got {tuple(key_padding_mask.shape)}")
    _nonempty("q_s", xs[0], 3, "head width")
    _nonempty("q_t", xs[2], 3, "head width")
    if xs[0].shape[:3].numel() == 0:  # no query rows: B, A or L is 0
        return _no_samples(xs[0]) + _no_samples(xs[1])
    return attention_relation.attention_relation_loss(xs[0], xs[1], xs[2].detach(), xs[3].detach(), key_padding_mask)


def split_relation_heads(x, num_heads):
    """(B, L, H) → (B, A, L, H/A) relation heads (MiniLMv2), so models with different head counts pair up."""
    x = _checks.floating_tensor("x", x, min_dim=3)
    if x.dim() != 3:
        raise ValueError(f"x must be (B, L, H) projections, got shape {tuple(x.shape)}")
    _checks.integer("num_heads", num_heads, ge=1)
    return ref.split_relation_heads(x, num_heads)
