"""``Distiller(balance="auto")``: the gradient-similarity rule against a hand-written reference on a
tiny model, terms with a zero gradient, a NaN term, a single term (a no-op), the teacher phase
(untouched), checkpoints, metrics and the argument checks."""
from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import distillx as dx
from distillx.engine import CheckpointError, NonFiniteLossError
from distillx.engine import checkpoint as ckpt
from distillx.engine.balance import Balancer
from distillx.methods import Method
from distillx.testing import data, loader, same, state

T = 2.0


class Direction(Method):
    """``mean_b <student logits_b, d>`` for a direction ``d`` drawn from ``seed``: a term whose gradient
    may point anywhere relative to kd's. ``kd_scale``: that multiple of the kd loss instead (-1: a
    term that always conflicts with kd; 10: one aligned with it, ten times as large); ``zero``: a
    term that reaches the student with a zero gradient; ``nan_at``: the call that returns NaN."""

    name = "direction"
    options = {"seed": 0, "kd_scale": None, "zero": False, "nan_at": None}

    def __init__(self, **options):
        super().__init__(**options)
        self.calls = 0

    def loss(self, student, teacher, batch=None):
        self.calls += 1
        s = self.require(student, "logits", "student")
        if self.nan_at is not None and self.calls == self.nan_at:
            return s.sum() * math.nan
        if self.zero:
            return s.sum() * 0.0
        if self.kd_scale is not None:
            return self.kd_scale * reference_kd(s, self.require(teacher, "logits", "teacher"))
        d = torch.randn(s.shape[1], generator=torch.Generator().manual_seed(self.seed))
        return (s @ d).mean()


def reference_kd(s, t):
    """Hinton's loss written out: T^2 KL(softmax(t/T) || softmax(s/T)), mean over rows."""
    return F.kl_div(F.log_softmax(s / T, 1), F.softmax(t / T, 1), reduction="batchmean") * T * T


def models(seed=0):
    torch.manual_seed(seed)
    teacher = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10)).eval()
    student = nn.Sequential(nn.Linear(64, 12), nn.ReLU(), nn.Linear(12, 10))
    return teacher, student


def batches(n=96, batch_size=32):
    x, y, _, _ = data(n)
    return loader(x, y, batch_size, shuffle=False)


def distil(methods, epochs=2, lr=0.1, task_weight=0.0, seed=0, **options):
    teacher, student = models(seed)
    d = dx.Distiller(teacher, student, methods, task_weight=task_weight, scheduler=None,
                     optimizer=lambda p: torch.optim.SGD(p, lr=lr), progress=False, **options)
    d.fit(batches(), epochs)
    return d, student


def reference(terms, every, epochs=2, lr=0.1, seed=0):
    """The rule by hand: ``terms`` are ``(weight, f(student_logits, teacher_logits))``, the first one
    primary. Every ``every`` steps each auxiliary factor becomes max(0, cos) times min(1, |g_p| / |g_a|)
    of the flattened gradients (g_p of the weighted primary term, g_a of the auxiliary one before its
    weight); plain SGD on the weighted, factored sum. Returns the student and the factors per step."""
    teacher, student = models(seed)
    params = list(student.parameters())
    factors, history = [1.0] * len(terms), []
    step = 0
    for _ in range(epochs):
        for x, _y in batches():
            s, t = student(x), teacher(x).detach()
            losses = [w * f(s, t) for w, f in terms]
            if step % every == 0:
                flat = [torch.cat([g.reshape(-1) for g in torch.autograd.grad(L, params, retain_graph=True)])
                        for L in losses]
                for i in range(1, len(terms)):
                    g_p, g_a = flat[0].double(), flat[i].double() / terms[i][0]
                    cos = F.cosine_similarity(g_p, g_a, dim=0).item()
                    factors[i] = max(0.0, cos) * min(1.0, (g_p.norm() / g_a.norm()).item())
            grads = torch.autograd.grad(sum(f * L for f, L in zip(factors, losses)), params)
            with torch.no_grad():
                for p, g in zip(params, grads):
                    p -= lr * g
            history.append(list(factors))
            step += 1
    return student, history


def logged(d, keys):
    return [[r[f"weight/{k}"] for k in keys] for r in d.metrics.steps("student")]


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("every", [1, 4])
def test_the_rule_matches_a_hand_written_reference(seed, every):
    """kd primary, a random direction (any sign of cosine) and minus kd (always conflicting: factor 0)."""
    methods = [dx.method("kd", T=T, weight=0.5), Direction(seed=seed, weight=2.0), Direction(kd_scale=-1.0, weight=0.3)]
    d, student = distil(methods, balance="auto", balance_every=every)
    d_ref = torch.randn(10, generator=torch.Generator().manual_seed(seed))
    ref, history = reference([(0.5, reference_kd), (2.0, lambda s, t: (s @ d_ref).mean()),
                              (0.3, lambda s, t: -reference_kd(s, t))], every)
    got = logged(d, ["kd", "direction", "direction#2"])
    assert len(got) == len(history) == 6
    for step, (a, b) in enumerate(zip(got, history)):
        assert a == pytest.approx(b, abs=1e-5), step
        assert a[2] == 0.0  # minus kd: cosine -1, switched off
    for p, q in zip(student.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
    assert d._step.balancer.steps == 6


@pytest.mark.parametrize("kd_scale, weight, factor", [(10.0, 1.0, 0.1), (10.0, 3.0, 0.1), (0.1, 1.0, 1.0),
                                                      (0.1, 4.0, 1.0)])
def test_an_aligned_term_is_capped_at_the_primarys_norm_before_its_weight(kd_scale, weight, factor):
    """A multiple of kd: cosine 1. Ten times kd's gradient is scaled to kd's (factor 0.1, whatever its
    weight, which then multiplies it); a tenth of it keeps factor 1 (never scaled up)."""
    d, _ = distil([dx.method("kd", T=T), Direction(kd_scale=kd_scale, weight=weight)], epochs=1, balance="auto",
                  balance_every=1)
    for kd, direction in logged(d, ["kd", "direction"]):
        assert (kd, direction) == (1.0, pytest.approx(factor, rel=1e-5))


def test_the_factors_are_held_between_measurements_and_the_primary_can_be_chosen():
    methods = [Direction(seed=4), dx.method("kd", T=T)]
    d, student = distil(methods, balance="auto", balance_every=4, balance_primary="kd")
    d_ref = torch.randn(10, generator=torch.Generator().manual_seed(4))
    ref, history = reference([(1.0, reference_kd), (1.0, lambda s, t: (s @ d_ref).mean())], 4)
    got = logged(d, ["kd", "direction"])
    for a, b in zip(got, history):
        assert a == pytest.approx(b, abs=1e-5)
    assert [row[1] for row in got[:4]] == [got[0][1]] * 4 and got[0][1] > 0.01 and got[4][1] != got[3][1]
    for p, q in zip(student.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


def test_the_default_interval_is_ten_steps_per_extra_backward_pass():
    teacher, student = models()
    two = dx.Distiller(teacher, student, [dx.method("kd"), Direction()], task_weight=0.0, balance="auto")
    three = dx.Distiller(teacher, copy.deepcopy(student), [dx.method("kd"), Direction()], task_weight=1.0,
                         balance="auto")
    idle = dx.Distiller(teacher, copy.deepcopy(student), [dx.method("kd"), Direction(weight=0.0)], task_weight=0.0,
                        balance="auto")
    assert (two._step.balancer.interval(), three._step.balancer.interval(), idle._step.balancer.interval()) == (10, 20, 10)
    assert (two._step.balancer.primary, three._step.balancer.primary) == ("kd", "kd")
    assert three._step.balancer.logged_keys == ["task", "kd", "direction"]
    assert idle._step.balancer.logged_keys == ["kd"]


def test_a_term_with_a_zero_gradient_keeps_its_factor_and_changes_nothing():
    base, base_student = distil([dx.method("kd", T=T), Direction(seed=2)], balance="auto", balance_every=2)
    d, student = distil([dx.method("kd", T=T), Direction(seed=2), Direction(zero=True)], balance="auto",
                        balance_every=2)
    assert same(state(student), state(base_student))
    assert all(row[2] == 1.0 for row in logged(d, ["kd", "direction", "direction#2"]))
    assert logged(d, ["kd", "direction"]) == logged(base, ["kd", "direction"])


def test_a_primary_term_with_a_zero_gradient_leaves_every_factor_at_one():
    d, student = distil([Direction(zero=True), dx.method("kd", T=T), Direction(seed=3)], balance="auto",
                        balance_every=1)
    _, plain = distil([Direction(zero=True), dx.method("kd", T=T), Direction(seed=3)])
    assert all(row == [1.0, 1.0, 1.0] for row in logged(d, ["direction", "kd", "direction#2"]))
    for p, q in zip(student.parameters(), plain.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("nan_at", [1, 2], ids=["measuring-step", "held-step"])
def test_a_nan_term_stops_the_run_naming_it(nan_at):
    with pytest.raises(NonFiniteLossError, match=rf"step {nan_at}: method 'direction': its loss is nan"):
        distil([dx.method("kd", T=T), Direction(nan_at=nan_at)], balance="auto", balance_every=4)


def test_a_single_term_is_not_balanced():
    """One active term: nothing to align, so the run is bitwise the unbalanced one (and logs factor 1)."""
    plain_d, plain = distil([dx.method("kd", T=T)])
    d, student = distil([dx.method("kd", T=T)], balance="auto", balance_every=1)
    assert same(state(student), state(plain))
    assert [r["loss"] for r in d.metrics.steps("student")] == [r["loss"] for r in plain_d.metrics.steps("student")]
    assert logged(d, ["kd"]) == [[1.0]] * 6
    assert "weight/kd" not in plain_d.history[-1] and d.history[-1]["weight/kd"] == 1.0


def test_the_teacher_phase_is_untouched():
    runs = []
    for balance in (None, "auto"):
        teacher, student = models()
        teacher.train()
        d = dx.Distiller(teacher, student, [dx.method("kd", T=T), Direction(seed=1)], balance=balance,
                         optimizer=lambda p: torch.optim.SGD(p, lr=0.1), progress=False)
        d.fit(batches(), 1, teacher_epochs=2)
        runs.append((d, state(teacher)))
    (plain, plain_teacher), (balanced, balanced_teacher) = runs
    assert same(balanced_teacher, plain_teacher)
    assert balanced.teacher_history == plain.teacher_history
    assert not any(k.startswith("weight/") for r in balanced.metrics.steps("teacher") for k in r)
    assert {"weight/task", "weight/kd", "weight/direction"} <= set(balanced.history[-1])


def test_factors_are_logged_and_checkpointed(tmp_path):
    d, _ = distil([dx.method("kd", T=T), Direction(seed=0)], balance="auto", balance_every=3,
                  checkpoint_dir=str(tmp_path))
    saved = ckpt.load(str(tmp_path / "checkpoint.pt"))["balance"]
    assert saved == d._step.balancer.state_dict()
    assert saved["steps"] == 6 and saved["primary"] == "kd" and saved["every"] == 3
    last = d.metrics.steps("student")[-1]
    assert last["weight/direction"] == saved["factors"]["direction"]
    # the epoch value is the mean of its steps' factors
    steps = [r["weight/direction"] for r in d.metrics.steps("student") if r["epoch"] == 1]
    assert d.history[-1]["weight/direction"] == pytest.approx(sum(steps) / len(steps))


def test_a_checkpoint_of_another_balancing_is_named(tmp_path):
    distil([dx.method("kd", T=T), Direction()], epochs=1, balance="auto", checkpoint_dir=str(tmp_path))
    teacher, student = models()
    for options, said in (({}, "balance=None"), ({"balance": "auto", "balance_every": 5},
                                                       "balance='auto', balance_primary='kd', balance_every=5")):
        d = dx.Distiller(teacher, student, [dx.method("kd", T=T), Direction()], task_weight=0.0, progress=False,
                         checkpoint_dir=str(tmp_path), **options)
        with pytest.raises(CheckpointError, match=rf"written with balance='auto', balance_primary='kd', "
                                                  rf"balance_every=None, this Distiller has {said}"):
            d.fit(batches(), 2, resume=True)


def test_a_saved_balance_state_is_checked():
    b = Balancer(["task", "kd"], "kd")
    with pytest.raises(ValueError, match="saved factors are for the terms"):
        b.load_state_dict({"factors": {"kd": 1.0}, "steps": 0})
    with pytest.raises(ValueError, match="not finite floats"):
        b.load_state_dict({"factors": {"task": 1.0, "kd": math.nan}, "steps": 0})
    with pytest.raises(ValueError, match="step count"):
        b.load_state_dict({"factors": {"task": 1.0, "kd": 1.0}, "steps": -1})


@pytest.mark.parametrize("options, match", [
    ({"balance": "grad"}, r"balance must be None .* or 'auto', got 'grad'"),
    ({"balance": True}, r"balance must be None"),
    ({"balance": "auto", "balance_every": 0}, r"balance_every must be a positive int or None, got 0"),
    ({"balance": "auto", "balance_every": 2.5}, r"balance_every must be"),
    ({"balance": "auto", "balance_primary": "sld"}, r"balance_primary must be one of the loss terms 'task', 'kd', "
                                                    r"'direction', got 'sld'"),
    ({"balance": "auto", "balance_primary": "task"}, r"balance_primary='task' is never active"),
    ({"balance_primary": "kd"}, r"balance_primary='kd' is set but balance is None"),
    ({"balance_every": 3}, r"balance_every=3 is set but balance is None"),
])
def test_bad_options_are_named(options, match):
    teacher, student = models()
    with pytest.raises(ValueError, match=match):
        dx.Distiller(teacher, student, [dx.method("kd"), Direction()], task_weight=0.0, **options)


def test_fsdp_is_refused():
    teacher, student = models()
    with pytest.raises(ValueError, match="balance='auto' is not supported with strategy='fsdp'"):
        dx.Distiller(teacher, student, [dx.method("kd")], balance="auto", strategy="fsdp",
                     optimizer=lambda p: torch.optim.SGD(p, lr=0.1))
