"""The minimal Distiller loop and the shared training helpers, on the bundled digits data."""
import copy

import pytest
import torch
from torch import nn

import distillx
from distillx.data import digits_split, tensor_loader
from distillx.distiller import Distiller
from distillx.methods import FeatureRequest, Method
from distillx.plugin import get_plugin_manager, hookimpl
from distillx.engine.training import evaluate, train


@pytest.fixture(scope="module")
def split():
    return digits_split(test_fraction=0.25, seed=0)


def loaders(split, batch_size=64, seed=0):
    return (tensor_loader(split.x_train, split.y_train, batch_size, shuffle=True, seed=seed),
            tensor_loader(split.x_test, split.y_test, 512))


def student(seed=1, hidden=16):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, 10))


@pytest.fixture(scope="module")
def teacher(split):
    # BatchNorm and Dropout make "the teacher stays in eval mode" observable (buffers, determinism).
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.BatchNorm1d(64), nn.ReLU(), nn.Dropout(0.2), nn.Linear(64, 10))
    train(model, loaders(split)[0], epochs=3)
    model.zero_grad(set_to_none=True)  # so a gradient appearing later is the Distiller's doing
    return model.eval()


class Probe(Method):
    """Records what the Distiller hands to a method; its loss is a plain logit MSE."""

    name = "probe"

    def __init__(self, **options):
        super().__init__(**options)
        self.seen = []

    def loss(self, student, teacher, batch=None):
        self.seen.append((student["logits"].requires_grad, teacher["logits"].requires_grad, len(batch)))
        return torch.nn.functional.mse_loss(student["logits"], teacher["logits"])


class Scaled(Method):
    """A method with a trainable parameter of its own."""

    name = "scaled"

    def __init__(self, **options):
        super().__init__(**options)
        self.scale = nn.Parameter(torch.tensor(1.0))

    def loss(self, student, teacher, batch=None):
        return ((self.scale * student["logits"] - teacher["logits"]) ** 2).mean()


class NeedsFeatures(Method):
    name = "needs_features"

    def features(self):
        return [FeatureRequest("h", student="0", teacher="0")]


def params_of(model):
    return [t.detach().clone() for t in [*model.parameters(), *model.buffers()]]


# -- training behaviour -----------------------------------------------------------------------
def test_loss_decreases_and_metrics(split, teacher):
    train_loader, val_loader = loaders(split)
    d = Distiller(teacher, student(), methods=[distillx.method("kd", T=4.0, weight=0.9)])
    history = d.fit(train_loader, epochs=4, val_loader=val_loader)
    assert [h["epoch"] for h in history] == [0, 1, 2, 3]
    assert history[-1]["loss"] < history[0]["loss"]
    for h in history:
        assert set(h) == {"epoch", "loss", "task", "kd", "val_accuracy", "val_loss"}
        # Components are weighted and add up to the total.
        assert h["loss"] == pytest.approx(h["task"] + h["kd"], rel=1e-6)
    assert history[-1]["val_accuracy"] > 0.5
    assert d.evaluate(val_loader)["accuracy"] == pytest.approx(history[-1]["val_accuracy"])
    assert d.history == history


def test_teacher_untouched_and_modes_restored(split, teacher):
    before = params_of(teacher)
    s = student()
    s.train()
    teacher.train()  # fit must switch it to eval (else BatchNorm buffers would move) and back
    try:
        Distiller(teacher, s, methods=[distillx.method("kd")]).fit(loaders(split)[0], epochs=1)
        assert teacher.training and s.training
    finally:
        teacher.eval()
    after = params_of(teacher)
    assert all(torch.equal(a, b) for a, b in zip(before, after))
    assert all(p.grad is None for p in teacher.parameters())


def test_method_sees_grad_student_and_constant_teacher(split, teacher):
    probe = Probe(weight=1.0)
    Distiller(teacher, student(), methods=[probe]).fit(loaders(split, batch_size=512)[0], epochs=1)
    assert probe.seen and all(seen == (True, False, 2) for seen in probe.seen)


def test_zero_weight_method_equals_no_method(split, teacher):
    a, b = student(), student()
    Distiller(teacher, a).fit(loaders(split)[0], epochs=2)
    history = Distiller(teacher, b, methods=[distillx.method("kd", weight=0.0)]).fit(loaders(split)[0], epochs=2)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    assert history[-1]["kd"] == 0.0


def test_method_weight_scales_its_term(split, teacher):
    # lr=0 keeps the student fixed, so both runs see identical unweighted losses.
    frozen = lambda params: torch.optim.SGD(params, lr=0.0)  # noqa: E731
    s = student()
    one = Distiller(teacher, copy.deepcopy(s), [Probe(weight=1.0)], optimizer=frozen).fit(loaders(split)[0], 1)[0]
    three = Distiller(teacher, copy.deepcopy(s), [Probe(weight=3.0)], task_weight=0.5,
                      optimizer=frozen).fit(loaders(split)[0], 1)[0]
    assert three["probe"] == pytest.approx(3.0 * one["probe"], rel=1e-6)
    assert three["task"] == pytest.approx(0.5 * one["task"], rel=1e-6)


def test_method_parameters_are_trained(split, teacher):
    method = Scaled(weight=1.0)
    d = Distiller(teacher, student(), methods=[method])
    assert any(p is method.scale for g in d.optimizer.param_groups for p in g["params"])
    d.fit(loaders(split)[0], epochs=1)
    assert method.scale.item() != 1.0


def test_duplicate_method_names_get_distinct_keys(split, teacher):
    d = Distiller(teacher, student(), methods=[distillx.method("kd", T=2.0), distillx.method("kd", T=8.0)])
    h = d.fit(loaders(split, batch_size=512)[0], epochs=1)[0]
    assert {"kd", "kd#2"} <= set(h)


def test_training_events_fire(split, teacher):
    calls = []

    class Recorder:
        @hookimpl
        def distillx_on_fit_start(self, distiller):
            calls.append(("start", distiller))

        @hookimpl
        def distillx_on_epoch_end(self, distiller, epoch, metrics):
            calls.append(("epoch", epoch, metrics["loss"]))

        @hookimpl
        def distillx_on_fit_end(self, distiller, metrics):
            calls.append(("end", metrics["epoch"]))

    get_plugin_manager().register(Recorder(), name="recorder")
    d = Distiller(teacher, student(), methods=[distillx.method("kd")])
    history = d.fit(loaders(split, batch_size=512)[0], epochs=2)
    assert calls == [("start", d), ("epoch", 0, history[0]["loss"]), ("epoch", 1, history[1]["loss"]), ("end", 1)]


def test_custom_task_loss_and_optimizer_instance(split, teacher):
    s = student()
    seen = []

    def task_loss(logits, targets):
        seen.append(logits.shape)
        return nn.functional.cross_entropy(logits, targets, label_smoothing=0.1)

    opt = torch.optim.SGD(s.parameters(), lr=0.1)
    d = Distiller(teacher, s, methods=[distillx.method("kd")], task_loss=task_loss, optimizer=opt)
    assert d.optimizer is opt
    d.fit(loaders(split, batch_size=512)[0], epochs=1)
    assert seen and seen[0][1] == 10


def test_train_and_evaluate_helpers(split):
    model = student(hidden=8)
    train_loader, val_loader = loaders(split)
    before = evaluate(model, val_loader)
    history = train(model, train_loader, epochs=3, val_loader=val_loader)
    assert set(history[0]) == {"epoch", "loss", "val_accuracy", "val_loss"}
    assert history[-1]["loss"] < history[0]["loss"]
    after = evaluate(model, val_loader)
    assert after["accuracy"] > before["accuracy"] and 0.0 <= after["accuracy"] <= 1.0
    assert after["loss"] == pytest.approx(history[-1]["val_loss"])


# -- input validation -------------------------------------------------------------------------
@pytest.mark.parametrize("epochs", [0, -1, 1.5, True, "2"])
def test_bad_epochs(split, teacher, epochs):
    with pytest.raises(ValueError, match="epochs"):
        Distiller(teacher, student()).fit(loaders(split)[0], epochs=epochs)


def test_empty_loaders(split, teacher):
    d = Distiller(teacher, student())
    with pytest.raises(ValueError, match="train_loader is empty"):
        d.fit([], epochs=1)
    with pytest.raises(ValueError, match="train_loader is empty"):
        d.fit(iter([]), epochs=1)  # no __len__: detected after the pass
    with pytest.raises(ValueError, match="val_loader is empty"):
        d.fit(loaders(split)[0], epochs=1, val_loader=[])


def test_bad_batches(teacher):
    d = Distiller(teacher, student())
    with pytest.raises(TypeError, match=r"\(inputs, targets\) pair"):
        d.fit([torch.zeros(4, 64)], epochs=1)


@pytest.mark.parametrize("methods, error, match", [
    ("kd", TypeError, "list of distillx methods"),
    (["kd"], TypeError, r"methods\[0\] .*distillx.method"),
    ([nn.Linear(1, 1)], TypeError, r"methods\[0\]"),
    (42, TypeError, "list of distillx methods, got int"),
])
def test_bad_methods(teacher, methods, error, match):
    with pytest.raises(error, match=match):
        Distiller(teacher, student(), methods=methods)


def test_single_method_not_in_list(teacher):
    with pytest.raises(TypeError, match="wrap the single method in a list"):
        Distiller(teacher, student(), methods=distillx.method("kd"))


def test_feature_methods_receive_both_sides_features(split, teacher):
    seen = []

    class Hidden(NeedsFeatures):
        def loss(self, student, teacher, batch=None):
            seen.append((tuple(student["h"].shape), student["h"].requires_grad, teacher["h"].requires_grad))
            return (student["h"].mean() - teacher["h"].mean()) ** 2

    s = student()
    d = Distiller(teacher, s, methods=[Hidden()])
    d.fit(loaders(split)[0], epochs=1)
    # Layer "0" is the first Linear of each model: 16 student units, 64 teacher units, batch 64.
    assert seen and seen[0] == ((64, 16), True, False)


def test_bad_models(teacher):
    s = student()
    with pytest.raises(ValueError, match="same module"):
        Distiller(s, s)
    with pytest.raises(TypeError, match="teacher must be a torch.nn.Module"):
        Distiller(lambda x: x, s)
    shared = nn.Sequential(s[0], nn.ReLU(), nn.Linear(16, 10))
    with pytest.raises(ValueError, match="share 2 parameter"):
        Distiller(shared, s)


@pytest.mark.parametrize("weight", [-1.0, float("nan"), float("inf"), "1"])
def test_bad_task_weight(teacher, weight):
    with pytest.raises(ValueError, match="task_weight"):
        Distiller(teacher, student(), task_weight=weight)


def test_nothing_to_train(teacher):
    with pytest.raises(ValueError, match="nothing to train"):
        Distiller(teacher, student(), methods=[distillx.method("kd", weight=0.0)], task_weight=0.0)


def test_optimizer_missing_method_parameters(teacher):
    s = student()
    with pytest.raises(ValueError, match="optimizer does not hold 1 of"):
        Distiller(teacher, s, methods=[Scaled()], optimizer=torch.optim.SGD(s.parameters(), lr=0.1))
    with pytest.raises(TypeError, match="optimizer"):
        Distiller(teacher, s, optimizer="adam")
