"""lm_kd: the kd divergence of two causal LMs through their output layers, next-token shift, -100 and
padding masks, tied embeddings, the output layers never run, clear errors."""
from __future__ import annotations

import pytest
import torch

import distillx as dx
from distillx.ops.reference import kd_loss_reference

from .models import gpt2, llama, token_batch


def full_logits_kd(student, teacher, batch, keep, **kw):
    with torch.no_grad():
        t = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    s = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return kd_loss_reference(s, t, kw.get("T", 1.0), kw.get("divergence", "kl"), kw.get("beta", 0.5), "batchmean", keep)


def next_token_keep(batch, labels=None):
    real = batch["attention_mask"].bool()
    keep = torch.zeros_like(real)
    keep[:, :-1] = real[:, :-1] & real[:, 1:]
    if labels is not None:
        keep[:, :-1] &= labels[:, 1:] != -100
    return keep


@pytest.mark.parametrize("pair, options", [("llama_gqa", {}), ("llama_tied", {"T": 2.0, "divergence": "reverse_kl"}),
                                           ("gpt2", {"divergence": "jsd", "beta": 0.3})])
def test_lm_kd_is_kd_on_the_full_logits(pair, options):
    torch.manual_seed(0)
    teacher, student = {"llama_gqa": lambda: (llama(2, 32, 4, 2), llama(1, 16, 4, 1)),
                        "llama_tied": lambda: (llama(2, 32, 4, 2, tied=True), llama(1, 16, 2, 2, tied=True)),
                        "gpt2": lambda: (gpt2(2, 32, 4), gpt2(1, 16, 2))}[pair]()
    teacher.eval(), student.eval()
    batch = token_batch(3, 9, seed=1, labels=True)
    batch["labels"][0, :3] = -100  # a prompt whose tokens are not distilled
    d = dx.Distiller(teacher, student, [dx.method("lm_kd", **options)], task_weight=0.0)
    got = d.losses(batch)["lm_kd"]
    want = full_logits_kd(student, teacher, batch, next_token_keep(batch, batch["labels"]), **options)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)
    # the gradient reaches the student's output layer (the tied embedding when tied)
    student.zero_grad()
    got.backward()
    g = student.get_output_embeddings().weight.grad.clone()
    student.zero_grad()
    want.backward()
    torch.testing.assert_close(g, student.get_output_embeddings().weight.grad, rtol=1e-4, atol=1e-7)
    d.close()


def test_the_output_layers_do_not_run_unless_a_term_reads_logits():
    torch.manual_seed(0)
    teacher, student = llama(2, 32, 4, 2).eval(), llama(1, 16, 4, 1)
    widths = []
    for model in (teacher, student):
        model.lm_head.register_forward_hook(lambda m, a, out: widths.append(out.shape[-1]))
    batch = token_batch(2, 6, labels=True)
    d = dx.Distiller(teacher, student, [dx.method("lm_kd")], task_weight=0.0, progress=False)
    d.fit([batch], 1)
    assert widths == [0, 0]  # both output layers skipped: (B, L, 0) instead of (B, L, vocab)
    widths.clear()
    d2 = dx.Distiller(teacher, student, [dx.method("lm_kd")], task_weight=1.0, progress=False)
    d2.losses(batch)
    assert widths == [0, 96]  # the task loss needs the student's logits (and uses the next-token loss)
    widths.clear()
    d3 = dx.Distiller(teacher, student, [dx.method("lm_kd"), dx.method("kd", T=1.0)], task_weight=0.0)
    d3.losses(batch)
    assert widths == [96, 96]
    for x in (d, d2, d3):
        x.close()
    assert "forward" not in vars(student.lm_head) and "forward" not in vars(teacher.lm_head)  # restored


def test_lm_kd_trains_a_student_and_leaves_the_teacher_alone():
    torch.manual_seed(0)
    teacher, student = llama(2, 32, 4, 2).eval(), llama(1, 16, 4, 1)
    before = [p.detach().clone() for p in teacher.parameters()]
    batches = [token_batch(4, 10, seed=i, labels=True) for i in range(2)]
    d = dx.Distiller(teacher, student, [dx.method("lm_kd")], task_weight=0.0, progress=False,
                     optimizer=lambda p: torch.optim.Adam(p, lr=1e-2), scheduler=None)
    history = d.fit(batches, 5)
    assert history[-1]["lm_kd"] < 0.5 * history[0]["lm_kd"], history
    assert all(torch.equal(a, b) for a, b in zip(before, teacher.parameters()))


def test_lm_kd_errors():
    with pytest.raises(ValueError, match=r"method 'lm_kd': the student's output layer 'lm_head' has 50 rows and the "
                                         r"teacher's 'lm_head' has 96; lm_kd compares next-token distributions over one "
                                         r"tokenizer's vocabulary"):
        dx.Distiller(llama(1, 32, 4, 2), llama(1, 16, 4, 1, vocab=50), [dx.method("lm_kd")], task_weight=0.0)
    with pytest.raises(ValueError, match=r"option divergence must be one of"):
        dx.method("lm_kd", divergence="tvd")
    m = dx.method("lm_kd")
    with pytest.raises(ValueError, match=r"the student's output layer is found in the model.*method.bind"):
        m.features()
    m.bind(llama(1, 16, 4, 1), llama(1, 32, 4, 2))
    h = torch.randn(2, 5, 16)
    with pytest.raises(ValueError, match=r"method 'lm_kd', feature 'hidden': the attention mask has shape \(2, 4\)"):
        m.loss({"hidden": h}, {"hidden": torch.randn(2, 5, 32)}, ({"attention_mask": torch.ones(2, 4)}, None))


def test_kd_on_token_logits_leaves_padding_out():
    torch.manual_seed(0)
    teacher, student = llama(2, 32, 4, 2).eval(), llama(1, 16, 4, 1).eval()
    batch = token_batch(3, 8, seed=4)
    d = dx.Distiller(teacher, student, [dx.method("kd", T=2.0)], task_weight=0.0)
    with torch.no_grad():
        got = d.losses(batch)["kd"]
        want = full_logits_kd(student, teacher, batch, batch["attention_mask"].bool(), T=2.0)
    torch.testing.assert_close(got, want)
    d.close()
