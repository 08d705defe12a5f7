"""Batch forms (engine/batches.py): pairs and mappings, calling a model with them, device moves,
outputs, the default task loss and accuracy, and the errors of batches that do not fit."""
from __future__ import annotations

from collections import namedtuple

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import distillx as dx
from distillx._batch import BatchError, attention_mask_of
from distillx.engine.batches import (batch_size, call_model, causal_lm_loss, correct_and_counted, logits_of, split,
                                     split_indexed, task_cross_entropy, to_device)
from distillx.engine.training import evaluate


class Encoder(nn.Module):
    """forward(input_ids, attention_mask=None, token_type_ids=None): (B, L) ids -> (B, L, 8) and a mean."""

    main_input_name = "input_ids"

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(20, 8)
        self.seen = None

    def forward(self, input_ids, attention_mask=None, token_type_ids=None, **kwargs):
        self.seen = sorted(k for k, v in (("attention_mask", attention_mask), ("token_type_ids", token_type_ids))
                           if v is not None) + sorted(kwargs)
        h = self.emb(input_ids)
        return {"last_hidden_state": h, "pooled": h.mean(1)}


def test_split_pairs_and_mappings():
    x, y = torch.zeros(2, 3), torch.tensor([0, 1])
    assert split((x, y))[0] is x and split([x, y])[1] is y
    batch = {"input_ids": torch.ones(2, 4, dtype=torch.long), "labels": y}
    inputs, targets = split(batch)
    assert list(inputs) == ["input_ids"] and targets is y
    inputs, targets = split(batch, label_key="input_ids")
    assert list(inputs) == ["labels"] and targets is batch["input_ids"]
    assert split({"input_ids": x})[1] is None  # no labels: no targets
    with pytest.raises(BatchError, match=r"a mapping batch needs model inputs besides 'labels'"):
        split({"labels": y})
    with pytest.raises(TypeError, match=r"\(inputs, targets\) pair or a mapping .* got a tuple of length 3"):
        split((x, y, y))
    idx = torch.tensor([4, 5])
    assert split_indexed((idx, x, y)) == (idx, x, y)
    i, inputs, targets = split_indexed((idx, batch))
    assert i is idx and targets is y and list(inputs) == ["input_ids"]


def test_to_device_is_recursive_and_keeps_containers():
    Pair = namedtuple("Pair", "a b")
    x = {"a": torch.ones(2), "b": [torch.zeros(1), (torch.ones(3), "text")], "c": Pair(torch.ones(1), 3)}
    out = to_device(x, torch.device("cpu"))
    assert isinstance(out["b"], list) and isinstance(out["b"][1], tuple) and out["b"][1][1] == "text"
    assert isinstance(out["c"], Pair) and out["c"].b == 3
    assert torch.equal(out["b"][1][0], torch.ones(3))


def test_call_model_forms():
    class Two(nn.Module):
        def forward(self, a, b):
            return a + b

    assert torch.equal(call_model(Two(), (torch.ones(2), torch.ones(2))), torch.full((2,), 2.0))  # model(*inputs)
    enc = Encoder()
    ids = torch.randint(0, 20, (2, 5))
    out = call_model(enc, {"input_ids": ids, "attention_mask": torch.ones(2, 5), "special_tokens_mask": ids})
    assert enc.seen == ["attention_mask"]  # keys forward does not name are left out, even with **kwargs
    assert torch.equal(out["last_hidden_state"], enc.emb(ids))
    # through a wrapper, the inner model's signature decides
    wrapped = nn.Sequential()
    wrapped.module = enc
    assert torch.equal(call_model(enc, {"input_ids": ids})["pooled"], enc.emb(ids).mean(1))


def test_mapping_batches_that_do_not_fit_say_what_is_missing():
    enc = Encoder()
    with pytest.raises(BatchError, match=r"the batch does not hold what the student \(Encoder\) needs: missing "
                                         r"'input_ids'; the batch has keys \['attention_mask'\]"):
        call_model(enc, {"attention_mask": torch.ones(2, 5)}, "student")

    class Plain(nn.Module):
        def forward(self, x, scale):
            return x * scale

    with pytest.raises(BatchError, match=r"missing 'scale'"):
        call_model(Plain(), {"x": torch.ones(1)})
    with pytest.raises(BatchError, match=r"the batch's attention_mask must be a tensor of shape \(2, 5\), the shape "
                                         r"of input_ids, got shape \(2, 4\)"):
        call_model(enc, {"input_ids": torch.zeros(2, 5, dtype=torch.long), "attention_mask": torch.ones(2, 4)})
    with pytest.raises(BatchError, match=r"attention_mask must be a tensor of shape \(batch, tokens\), got shape \(5,\)"):
        attention_mask_of({"attention_mask": torch.ones(5)})
    assert attention_mask_of(({"attention_mask": torch.tensor([[1, 0]])}, None)).tolist() == [[True, False]]


def test_outputs_and_batch_size():
    t = torch.randn(2, 3)
    assert logits_of(t, "m") is t and logits_of((t, 1), "m") is t and logits_of({"logits": t}, "m") is t
    assert logits_of({"last_hidden_state": t}, "m", required=False) is None
    with pytest.raises(TypeError, match=r"m must return logits .* got a dict with keys 'last_hidden_state'"):
        logits_of({"last_hidden_state": t}, "m")
    assert batch_size({"input_ids": torch.zeros(7, 3)}, None) == 7 and batch_size(t, torch.zeros(4)) == 4
    with pytest.raises(BatchError, match="cannot tell the batch size"):
        batch_size({"n": 3}, None)


def test_task_loss_and_accuracy_on_tokens():
    torch.manual_seed(0)
    logits, labels = torch.randn(2, 5, 7), torch.randint(0, 7, (2, 5))
    labels[0, 3:] = -100
    keep = labels != -100
    torch.testing.assert_close(task_cross_entropy(logits, labels), F.cross_entropy(logits[keep], labels[keep]))
    maps, seg = torch.randn(2, 7, 4, 4), torch.randint(0, 7, (2, 4, 4))  # PyTorch's own (B, C, H, W) layout
    torch.testing.assert_close(task_cross_entropy(maps, seg), F.cross_entropy(maps, seg))
    torch.testing.assert_close(causal_lm_loss(logits, labels),
                               F.cross_entropy(logits[:, :-1][keep[:, 1:]], labels[:, 1:][keep[:, 1:]]))
    hits, counted = correct_and_counted(logits, labels)
    assert counted.item() == int(keep.sum()) and hits.item() == int(((logits.argmax(-1) == labels) & keep).sum())
    hits, counted = correct_and_counted(logits, labels, next_token=True)
    assert counted.item() == int(keep[:, 1:].sum())


def test_distiller_on_mapping_batches_and_pairs_of_mappings():
    torch.manual_seed(0)

    class Clf(nn.Module):
        def __init__(self, width):
            super().__init__()
            self.enc, self.head = nn.Embedding(20, width), nn.Linear(width, 3)

        def forward(self, input_ids, attention_mask):
            m = attention_mask.unsqueeze(-1).float()
            return self.head((self.enc(input_ids) * m).sum(1) / m.sum(1))

    ids, mask = torch.randint(0, 20, (8, 6)), torch.ones(8, 6, dtype=torch.long)
    y = torch.randint(0, 3, (8,))
    teacher, student = Clf(16).eval(), Clf(8)
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    mapping = [{"input_ids": ids, "attention_mask": mask, "labels": y}] * 4
    d = dx.Distiller(teacher, student, [dx.method("kd", T=2.0)], progress=False)
    history = d.fit(mapping, 3, val_loader=mapping)
    assert history[-1]["loss"] < history[0]["loss"] and "val_accuracy" in history[-1]
    assert all(torch.equal(before[k], v) for k, v in teacher.state_dict().items())
    pairs = [({"input_ids": ids, "attention_mask": mask}, y)] * 2
    assert d.evaluate(pairs)["accuracy"] == d.evaluate(mapping)["accuracy"]
    # no labels: the task term is left out, the methods still train
    unlabeled = [{"input_ids": ids, "attention_mask": mask}] * 2
    assert dx.Distiller(teacher, Clf(8), [dx.method("kd")], progress=False).fit(unlabeled, 1)[0]["task"] == 0.0
    with pytest.raises(ValueError, match=r"evaluation needs targets, but a mapping batch of the loader has no 'labels'"):
        d.evaluate(unlabeled)


def test_the_label_key_is_configurable():
    torch.manual_seed(0)
    teacher, student = nn.Linear(4, 3), nn.Linear(4, 3)

    class Net(nn.Module):
        def __init__(self, lin):
            super().__init__()
            self.lin = lin

        def forward(self, x):
            return self.lin(x)

    batch = {"x": torch.randn(6, 4), "target": torch.randint(0, 3, (6,))}
    d = dx.Distiller(Net(teacher), Net(student), [dx.method("kd")], label_key="target", progress=False)
    losses = d.losses(batch)
    torch.testing.assert_close(losses["task"], F.cross_entropy(student(batch["x"]), batch["target"]))
    with pytest.raises(TypeError, match=r"label_key must be a non-empty string"):
        dx.Distiller(Net(teacher), Net(student), [dx.method("kd")], label_key="")


# -- targets without a label ---------------------------------------------------------------------
def r(*shape):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("logits, targets, loss", [
    (r(4, 7), torch.full((4,), -100), task_cross_entropy),
    (r(2, 5, 7), torch.full((2, 5), -100), task_cross_entropy),            # tokens
    (r(2, 7, 3, 3), torch.full((2, 3, 3), -100), task_cross_entropy),      # (B, C, H, W) maps
    (r(0, 7), torch.zeros(0, dtype=torch.long), task_cross_entropy),      # no rows
    (r(0, 7), torch.zeros(0, 7), task_cross_entropy),                     # soft targets, no rows
    (r(2, 5, 7), torch.full((2, 5), -100), causal_lm_loss),
    (r(3, 1, 7), torch.tensor([[4], [0], [6]]), causal_lm_loss),              # length 1: no next token
], ids=["classes", "tokens", "maps", "no-rows", "soft-no-rows", "causal-lm", "causal-lm-length-1"])
def test_a_task_loss_without_a_labelled_target_is_0_with_a_zero_gradient(logits, targets, loss):
    """Nothing labelled is distillx's rule for its losses: 0 with a zero gradient, not NaN (which
    would stop training, and stop it again on every resume that replays the batch)."""
    logits = logits.clone().requires_grad_()
    value = loss(logits, targets)
    value.backward()
    assert value.item() == 0.0 and torch.equal(logits.grad, torch.zeros_like(logits))


def test_the_task_loss_of_a_partly_labelled_batch_is_its_mean_over_labelled_targets():
    g = torch.Generator().manual_seed(0)
    logits, labels = torch.randn(3, 6, 5, generator=g), torch.randint(0, 5, (3, 6), generator=g)
    labels[1] = -100  # a whole sequence unlabelled
    labels[0, :2] = -100
    keep = labels != -100
    torch.testing.assert_close(task_cross_entropy(logits, labels), F.cross_entropy(logits[keep], labels[keep]))


def test_evaluate_averages_over_labelled_targets_only():
    """Accuracy and loss are means over the labelled targets of the whole loader: a batch without one
    adds nothing, a batch with few labelled tokens weighs little; a loader with no labelled target
    at all has neither (None, not NaN)."""
    g = torch.Generator().manual_seed(0)
    model = nn.Linear(4, 3)
    x, y = torch.randn(6, 4, generator=g), torch.randint(0, 3, (6,), generator=g)
    unlabelled = (torch.randn(5, 4, generator=g), torch.full((5,), -100))
    assert evaluate(model, [(x, y), unlabelled]) == evaluate(model, [(x, y)])
    assert evaluate(model, [unlabelled, unlabelled]) == {"accuracy": None, "loss": None}
    soft = torch.softmax(torch.randn(6, 3, generator=g), -1)  # soft targets: every row counts
    with torch.no_grad():
        assert evaluate(model, [(x, soft)])["loss"] == pytest.approx(F.cross_entropy(model(x), soft).item(), rel=1e-6)

    class Tokens(nn.Module):  # (B, L, 4) -> (B, L, 3)
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 3)

        def forward(self, x):
            return self.lin(x)

    tokens = Tokens()
    xs = torch.randn(2, 4, 6, 4, generator=g)
    ys = torch.randint(0, 3, (2, 4, 6), generator=g)
    ys[1, :, 1:] = -100  # the second batch has 4 labelled tokens, the first 24
    keep = ys != -100
    with torch.no_grad():
        logits = tokens(xs)
    want = F.cross_entropy(logits[keep], ys[keep]).item()
    hits = ((logits.argmax(-1) == ys) & keep).sum().item()
    got = evaluate(tokens, [(xs[0], ys[0]), (xs[1], ys[1])])
    assert got["loss"] == pytest.approx(want, rel=1e-6) and got["accuracy"] == hits / int(keep.sum())


def test_a_fully_masked_batch_neither_stops_training_nor_validation():
    g = torch.Generator().manual_seed(0)
    teacher, student = nn.Linear(4, 3), nn.Linear(4, 3)
    x, y = torch.randn(6, 4, generator=g), torch.randint(0, 3, (6,), generator=g)
    unlabelled = (torch.randn(6, 4, generator=g), torch.full((6,), -100))
    d = dx.Distiller(teacher, student, [dx.method("kd")], task_weight=1.0, progress=False)
    history = d.fit([(x, y), unlabelled], 2, val_loader=[unlabelled])
    assert [h["val_accuracy"] for h in history] == [None, None]
    assert d.metrics.steps("student", 0)[1]["task"] == 0.0
    assert d.train_teacher([(x, y), unlabelled], 1)[0]["loss"] > 0
