"""Output layers padded to different sizes for one tokenizer: lm_kd compares the shared rows (the
first V), gradients included; truly different sizes and token ids past V are errors naming them."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import distillx as dx
from distillx.methods.lm_kd import shared_rows
from distillx.ops.reference import kd_loss_reference

from .models import llama, token_batch
from .test_lm_kd import next_token_keep


@pytest.mark.parametrize("rows, shared", [
    ((96, 96), 96), ((96, 128), 96), ((128, 96), 96),
    ((151936, 152064), 151936),  # Qwen2.5-3B and -72B: 152,064 = 297 x 512, 128 rows apart
    ((50257, 50304), 50257),     # GPT-2 and its vocabulary padded to a multiple of 64 (50,304 = 393 x 128)
    ((96, 500), None), ((50, 96), None), ((96, 100), None),  # 500 = 125 x 4, 96 = 3 x 32, 100 = 25 x 4
    ((32000, 65536), None),      # within a power of two, but more rows apart than any padding
])
def test_the_shared_rows_rule(rows, shared):
    assert shared_rows(*rows) == shared


def reference(student, teacher, batch, V, **kw):
    """kd on the first V columns of both models' full logits (plain PyTorch)."""
    with torch.no_grad():
        t = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[..., :V]
    s = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[..., :V]
    keep = next_token_keep(batch, batch["labels"])
    return kd_loss_reference(s, t, kw.get("T", 1.0), kw.get("divergence", "kl"), kw.get("beta", 0.5), "batchmean",
                             keep)


@pytest.mark.parametrize("student_rows, teacher_rows, options", [
    (96, 128, {}), (128, 96, {"divergence": "jsd", "beta": 0.3}), (128, 128, {"vocab_size": 96, "T": 2.0})])
@pytest.mark.parametrize("tied", [False, True])
def test_lm_kd_compares_the_shared_rows(student_rows, teacher_rows, options, tied):
    torch.manual_seed(0)
    teacher = llama(2, 32, 4, 2, vocab=teacher_rows, tied=tied).eval()
    student = llama(1, 16, 4, 1, vocab=student_rows, tied=tied).eval()
    batch = token_batch(3, 9, seed=1, labels=True, vocab=96)  # one tokenizer of 96 tokens
    batch["labels"][0, :3] = -100
    method = dx.method("lm_kd", **options)
    d = dx.Distiller(teacher, student, [method], task_weight=0.0)
    assert method.shared_vocab == 96
    got = d.losses(batch)["lm_kd"]
    want = reference(student, teacher, batch, 96, **options)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)
    grads = []
    for loss in (got, want):
        student.zero_grad()
        loss.backward()
        grads.append([p.grad.clone() for p in student.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)
    head = [p for p in student.parameters() if p is student.get_output_embeddings().weight][0]
    # rows past the shared ones get no gradient (tied: nor as embedding rows, no id reaches them)
    assert torch.equal(head.grad[96:], torch.zeros_like(head.grad[96:]))
    assert head.grad[:96].abs().sum() > 0
    d.close()


def test_biased_output_layers_are_sliced_too():
    torch.manual_seed(0)
    student = nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 128))
    teacher = nn.Sequential(nn.Linear(4, 16), nn.Linear(16, 96))
    m = dx.method("lm_kd", shift=False)
    m.bind(student, teacher)
    hs, ht = torch.randn(2, 5, 8, requires_grad=True), torch.randn(2, 5, 16)
    got = m.loss({"hidden": hs}, {"hidden": ht}, ({"input_ids": torch.randint(0, 96, (2, 5))}, None))
    s, t = student[1], teacher[1]
    want = kd_loss_reference(hs @ s.weight[:96].T + s.bias[:96], ht @ t.weight.T + t.bias, 1.0, "kl", 0.5,
                             "batchmean", None)
    torch.testing.assert_close(got, want)
    (g_got,) = torch.autograd.grad(got, [s.bias])
    (g_want,) = torch.autograd.grad(want, [s.bias])
    torch.testing.assert_close(g_got, g_want)
    assert g_got[:96].abs().sum() > 0 and torch.equal(g_got[96:], torch.zeros(32))


def test_different_tokenizers_and_ids_past_the_shared_rows_are_errors():
    with pytest.raises(ValueError, match=r"method 'lm_kd': the student's output layer 'lm_head' has 96 rows and the "
                                         r"teacher's 'lm_head' has 500; .*not one vocabulary padded to two sizes \(they "
                                         r"differ by 404 rows.*the models have different tokenizers. If they share one, "
                                         r"set vocab_size=len\(tokenizer\)"):
        dx.Distiller(llama(1, 32, 4, 2, vocab=500), llama(1, 16, 4, 1), [dx.method("lm_kd")], task_weight=0.0)
    with pytest.raises(ValueError, match=r"option vocab_size=97 is more rows than both output layers have: the "
                                         r"student's output layer 'lm_head' has 128 rows and the teacher's 'lm_head' "
                                         r"has 96"):
        dx.method("lm_kd", vocab_size=97).bind(llama(1, 16, 4, 1, vocab=128), llama(1, 32, 4, 2))
    with pytest.raises(ValueError, match=r"option vocab_size must be"):
        dx.method("lm_kd", vocab_size=0)
    with pytest.raises(RuntimeError, match=r"shared_vocab is known once the method is bound"):
        dx.method("lm_kd").shared_vocab
    m = dx.method("lm_kd", vocab_size=96)  # 96 vs 500 when told they share a tokenizer
    m.bind(llama(1, 16, 4, 1), llama(1, 32, 4, 2, vocab=500))
    assert m.shared_vocab == 96
    # the student's layer has 128 rows, the teacher's 96: ids reach up to 127 in the student's embedding
    m = dx.method("lm_kd")
    m.bind(llama(1, 16, 4, 1, vocab=128), llama(1, 32, 4, 2))
    hs, ht = torch.randn(2, 5, 16), torch.randn(2, 5, 32)
    ok = torch.randint(0, 96, (2, 5))
    m.loss({"hidden": hs}, {"hidden": ht}, ({"input_ids": ok}, ok))
    for key in ("input_ids", "prompt_input_ids", "labels"):
        bad = ok.clone()
        bad[1, 2] = 100
        inputs = {"input_ids": bad if key == "input_ids" else ok}
        if key == "prompt_input_ids":
            inputs[key] = bad
        with pytest.raises(ValueError, match=rf"method 'lm_kd': the batch's {key} holds token id 100, but the output "
                                             r"layers share only the first 96 rows \(student 128, teacher 96\)"):
            m.loss({"hidden": hs}, {"hidden": ht}, (inputs, bad if key == "labels" else ok))
