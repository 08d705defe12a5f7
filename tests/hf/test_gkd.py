"""On-policy distillation (``gkd``): the loss against a plain-PyTorch generalised JSD on full logits
and TRL's ``generalized_jsd_loss``, sampling (greedy equals transformers' ``generate``; the KV cache
equals recomputing; nucleus support), the rewritten batch's layout, ``lmbda=0`` is ``lm_kd``, a kill
mid on-policy epoch resumes bitwise, metrics, and the errors."""
from __future__ import annotations

import json
import os
import signal

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader

import distillx as dx
from distillx.engine import TrainingInterrupted
from distillx.engine.arguments import check_rewriting
from distillx.hf.generate import _draw, join, sample
from distillx.methods import BatchContext

from .chat_batches import EOS, PAD, ChatDataset, chat_batch
from .models import llama

transformers = pytest.importorskip("transformers")


def pair(dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    teacher = llama(layers=2, hidden=48, heads=4, kv_heads=2).to(dtype).eval()
    student = llama(layers=1, hidden=32, heads=4, kv_heads=2).to(dtype)
    return teacher, student


def loader(n=12, batch_size=4, seed=0):
    return DataLoader(ChatDataset(n, seed=seed), batch_size=batch_size, shuffle=True,
                      generator=torch.Generator().manual_seed(seed))


def generalized_jsd(student_logits, teacher_logits, labels, beta, T):
    """T² · mean over completion positions of β·KL(p‖m) + (1−β)·KL(q‖m), m = βp + (1−β)q, on full
    (B, L, V) logits in float64: position t predicts token t+1, kept where labels[t+1] != -100."""
    s = torch.log_softmax(student_logits[:, :-1].double() / T, -1)
    t = torch.log_softmax(teacher_logits[:, :-1].double() / T, -1)
    keep = labels[:, 1:] != -100
    s, t = s[keep], t[keep]
    m = torch.log(beta * t.exp() + (1 - beta) * s.exp())
    kl_pm = (t.exp() * (t - m)).sum(-1)
    kl_qm = (s.exp() * (s - m)).sum(-1)
    return T * T * (beta * kl_pm + (1 - beta) * kl_qm).mean()


@pytest.mark.parametrize("beta", [0.1, 0.5, 0.9])
@pytest.mark.parametrize("T", [0.5, 1.0, 2.0])
def test_loss_and_gradients_match_full_logits_and_trl(beta, T):
    teacher, student = pair(torch.float64)
    batch = chat_batch(3, 5, 4, seed=1)
    d = dx.Distiller(teacher, student, [dx.method("gkd", lmbda=0.0, beta=beta, T=T)], task_weight=0.0,
                     progress=False)
    got = d.losses(batch)["gkd"]
    got.backward()
    ours = {n: p.grad.clone() for n, p in student.named_parameters()}
    d.close()
    student.zero_grad(set_to_none=True)

    inputs = {k: batch[k] for k in ("input_ids", "attention_mask")}
    with torch.no_grad():
        t_logits = teacher(**inputs).logits
    s_logits = student(**inputs).logits
    want = generalized_jsd(s_logits, t_logits, batch["labels"], beta, T)
    want.backward()
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)
    assert ours["lm_head.weight"].abs().sum() > 0  # the student's output layer is trained
    for name, p in student.named_parameters():
        torch.testing.assert_close(ours[name], p.grad, rtol=1e-7, atol=1e-12, msg=name)
    assert all(p.grad is None for p in teacher.parameters())

    trl = pytest.importorskip("trl.experimental.gkd").GKDTrainer
    theirs = trl.generalized_jsd_loss(s_logits[:, :-1].detach(), t_logits[:, :-1], labels=batch["labels"][:, 1:],
                                      beta=beta, temperature=T)
    torch.testing.assert_close(got.detach(), T * T * theirs, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("beta, divergence", [(0.0, "kl"), (1.0, "reverse_kl")])
def test_beta_zero_and_one_are_the_two_kls(beta, divergence):
    teacher, student = pair(torch.float64)
    batch = chat_batch(3, 5, 4, seed=2)
    losses = []
    for m in (dx.method("gkd", lmbda=0.0, beta=beta, T=1.5), dx.method("lm_kd", divergence=divergence, T=1.5)):
        with dx.Distiller(teacher, student, [m], task_weight=0.0, progress=False) as d:
            losses.append(d.losses(batch)[d._keys[0]].detach())
    assert torch.equal(losses[0], losses[1])
    trl = pytest.importorskip("trl.experimental.gkd").GKDTrainer
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask")}
    with torch.no_grad():
        s, t = student(**inputs).logits, teacher(**inputs).logits
    theirs = trl.generalized_jsd_loss(s[:, :-1], t[:, :-1], labels=batch["labels"][:, 1:], beta=beta, temperature=1.5)
    torch.testing.assert_close(losses[0], 1.5 ** 2 * theirs, rtol=1e-9, atol=1e-12)


def test_lmbda_zero_without_seq_kd_is_lm_kd_jsd_on_the_dataset():
    weights, histories = [], []
    for m in (dx.method("gkd", lmbda=0.0, beta=0.3, T=2.0), dx.method("lm_kd", divergence="jsd", beta=0.3, T=2.0)):
        teacher, student = pair()
        d = dx.Distiller(teacher, student, [m], task_weight=0.0, progress=False, seed=0,
                         optimizer=lambda p: torch.optim.AdamW(p, lr=1e-2))
        histories.append([h[d._keys[0]] for h in d.fit(loader(), 2)])
        weights.append(student.state_dict())
    assert histories[0] == histories[1]
    for key in weights[0]:
        assert torch.equal(weights[0][key], weights[1][key]), key


def _prompts(seed=3):
    b = chat_batch(4, 6, 3, seed=seed)
    return b["prompt_input_ids"], b["prompt_attention_mask"]


def test_greedy_sampling_is_transformers_generate_with_left_padding():
    _, student = pair()
    student.eval()
    ids, mask = _prompts()
    tokens, lengths = sample(student, ids, mask, max_new_tokens=7, generator=torch.Generator(), temperature=0.0,
                             eos_token_id=EOS, pad_token_id=PAD)
    want = student.generate(input_ids=ids, attention_mask=mask, max_new_tokens=7, do_sample=False, eos_token_id=EOS,
                            pad_token_id=PAD)[:, ids.shape[1]:]
    for b in range(ids.shape[0]):
        n = int(lengths[b])
        assert torch.equal(tokens[b, :n], want[b, :n])
        assert n == 7 or int(tokens[b, n - 1]) == EOS


class NoCache(nn.Module):
    """The same model called on the whole sequence each step (its forward takes no KV cache)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask):
        return self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits


def test_the_kv_cache_draws_what_recomputing_draws_and_the_generator_decides():
    _, student = pair(torch.float64)
    ids, mask = _prompts(4)
    runs, widths = [], []
    hook = student.model.register_forward_pre_hook(
        lambda module, args, kwargs: widths.append((kwargs["input_ids"].shape[1], kwargs.get("logits_to_keep"))),
        with_kwargs=True)
    logits = []
    head = student.lm_head.register_forward_hook(lambda module, args, out: logits.append(out.shape[1]))
    for model in (student, NoCache(student), student):
        runs.append(sample(model, ids, mask, max_new_tokens=6, generator=torch.Generator().manual_seed(5),
                           eos_token_id=EOS, pad_token_id=PAD))
        if model is student and len(runs) == 1:  # with the cache: the prompt once, then one token per step
            steps = len(widths)
            assert [w for w, _ in widths] == [ids.shape[1]] + [1] * (steps - 1) and steps > 1
            assert logits == [1] * steps  # only the last position's logits
    hook.remove()
    head.remove()
    for tokens, lengths in runs[1:]:
        assert torch.equal(tokens, runs[0][0]) and torch.equal(lengths, runs[0][1])
    other = sample(student, ids, mask, max_new_tokens=6, generator=torch.Generator().manual_seed(6),
                   eos_token_id=EOS, pad_token_id=PAD)
    assert not torch.equal(other[0], runs[0][0])
    assert student.training  # the mode is restored


def test_nucleus_sampling_draws_only_from_the_nucleus():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]] * 4000))
    g = torch.Generator().manual_seed(0)
    drawn = _draw(logits, 1.0, 0.7, g)
    assert set(drawn.tolist()) == {0, 1}  # 0.5 < 0.7, 0.5 + 0.3 >= 0.7: the first two tokens
    full = _draw(logits, 1.0, 1.0, g)
    assert set(full.tolist()) == {0, 1, 2, 3}
    assert set(_draw(logits, 1.0, 0.1, g).tolist()) == {0}
    assert torch.equal(_draw(logits[:3], 0.0, 1.0, g), torch.zeros(3, dtype=torch.long))


def test_an_on_policy_batch_is_the_students_sample_masked_after_its_end():
    teacher, student = pair()
    batch = chat_batch(4, 6, 3, seed=7)
    m = dx.method("gkd", lmbda=1.0, max_new_tokens=5)
    m.bind(student, teacher)
    student.train()
    g = torch.Generator().manual_seed(11)
    state = g.get_state()
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    new, labels = m.prepare_batch(inputs, batch["labels"], BatchContext(student, teacher, g, torch.device("cpu")))
    assert student.training and not teacher.training
    assert set(new) == {"input_ids", "attention_mask"}
    g.set_state(state)
    assert bool(torch.rand((), generator=g) < 1.0)  # the draw that decided on-policy
    tokens, lengths = sample(student, batch["prompt_input_ids"], batch["prompt_attention_mask"], max_new_tokens=5,
                             generator=g, eos_token_id=EOS, pad_token_id=PAD)
    p_len = batch["prompt_attention_mask"].sum(-1)
    for b in range(4):
        p, n = int(p_len[b]), int(lengths[b])
        prompt = batch["prompt_input_ids"][b][batch["prompt_attention_mask"][b].bool()]
        assert torch.equal(new["input_ids"][b, :p], prompt)
        assert torch.equal(new["input_ids"][b, p:p + n], tokens[b, :n])
        assert torch.equal(labels[b, p:p + n], tokens[b, :n])
        assert (labels[b, :p] == -100).all() and (labels[b, p + n:] == -100).all()
        assert (new["attention_mask"][b, :p + n] == 1).all() and (new["attention_mask"][b, p + n:] == 0).all()
    assert m.batch_metrics()["on_policy"] == 1.0


def test_seq_kd_samples_the_off_policy_batches_from_the_teacher():
    teacher, student = pair()
    batch = chat_batch(3, 6, 3, seed=8)
    m = dx.method("gkd", lmbda=0.0, seq_kd=True, max_new_tokens=4, temperature=0.7)
    m.bind(student, teacher)
    g = torch.Generator().manual_seed(2)
    state = g.get_state()
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    new, labels = m.prepare_batch(inputs, batch["labels"], BatchContext(student, teacher, g, torch.device("cpu")))
    g.set_state(state)
    torch.rand((), generator=g)
    tokens, lengths = sample(teacher, batch["prompt_input_ids"], batch["prompt_attention_mask"], max_new_tokens=4,
                             generator=g, temperature=0.7, eos_token_id=EOS, pad_token_id=PAD)
    want = join(batch["prompt_input_ids"], batch["prompt_attention_mask"], tokens, lengths, PAD)
    assert torch.equal(new["input_ids"], want["input_ids"]) and torch.equal(labels, want["labels"])
    assert m.batch_metrics()["on_policy"] == 0.0


def test_metrics_per_step_and_epoch_and_in_the_plot(tmp_path):
    pytest.importorskip("matplotlib")
    teacher, student = pair()
    d = dx.Distiller(teacher, student, [dx.method("gkd", lmbda=0.5, max_new_tokens=4)], task_weight=0.0,
                     progress=False, seed=0)
    history = d.fit(loader(16), 3)
    steps = d.metrics.steps("student")
    assert {s["gkd/on_policy"] for s in steps} == {0.0, 1.0}  # seed 0 draws both kinds in 12 steps
    for s in steps:
        if s["gkd/on_policy"] == 0.0:
            assert s["gkd/sampled_tokens"] == 0.0 and s["gkd/sampled_divergence"] == 0.0
        else:
            assert 1.0 <= s["gkd/sampled_tokens"] <= 4.0 and s["gkd/sampled_divergence"] == pytest.approx(s["gkd"])
    for epoch, h in enumerate(history):
        own = [s for s in steps if s["epoch"] == epoch]
        on = [s for s in own if s["gkd/on_policy"] == 1.0]
        assert h["gkd/on_policy"] == pytest.approx(len(on) / len(own))
        if on:
            assert h["gkd/mean_sampled_length"] == pytest.approx(sum(s["gkd/sampled_tokens"] for s in on) / len(on))
            assert h["gkd/divergence_on_samples"] == pytest.approx(
                sum(s["gkd/sampled_divergence"] for s in on) / len(on))
        else:
            assert h["gkd/mean_sampled_length"] == 0.0
    d.save_metrics(str(tmp_path / "metrics.json"))
    saved = json.load(open(tmp_path / "metrics.json"))
    assert "gkd/mean_sampled_length" in json.dumps(saved)
    d.plot(str(tmp_path / "metrics.png"))
    assert os.path.getsize(tmp_path / "metrics.png") > 0


class SignalAt(type(dx.method("gkd"))):
    """``gkd`` that sends SIGINT to this process on its ``at``-th batch."""

    name = "gkd_signal"
    options = {"at": 0}

    def prepare_batch(self, inputs, targets, context):
        self.calls = getattr(self, "calls", 0) + 1
        if self.calls == self.at:
            os.kill(os.getpid(), signal.SIGINT)
        return super().prepare_batch(inputs, targets, context)


def _run(tmp, at=0, resume=None):
    teacher, student = pair()
    d = dx.Distiller(teacher, student, [SignalAt(at=at, lmbda=0.6, max_new_tokens=4, seq_kd=True)], task_weight=0.0,
                     progress=False, seed=0, checkpoint_dir=str(tmp), optimizer=lambda p: torch.optim.AdamW(p, lr=1e-2))
    history = d.fit(loader(16), 3, resume=resume)
    return student.state_dict(), history, d.metrics.steps("student")


def test_a_kill_in_the_middle_of_an_on_policy_epoch_resumes_bitwise(tmp_path):
    want, history, steps = _run(tmp_path / "whole")
    kinds = [s["gkd_signal/on_policy"] for s in steps]
    assert set(kinds) == {0.0, 1.0} and kinds[5] == 1.0  # the kill lands after an on-policy step
    with pytest.raises(TrainingInterrupted):
        _run(tmp_path / "killed", at=6)  # epoch 1, step 2 of 4
    got, resumed, resumed_steps = _run(tmp_path / "killed", resume=True)
    for key in want:
        assert torch.equal(got[key], want[key]), key
    assert resumed == history
    assert [s["gkd_signal/on_policy"] for s in resumed_steps] == [s["gkd_signal/on_policy"] for s in steps]


def test_what_gkd_cannot_do_is_refused_by_name():
    teacher, student = pair()
    with pytest.raises(ValueError, match="cache_teacher=True .* 'gkd' .* drop cache_teacher"):
        dx.Distiller(teacher, student, [dx.method("gkd")], task_weight=0.0, cache_teacher=True)
    with pytest.raises(ValueError, match="'gkd' sample from the student .* use strategy='ddp'"):
        check_rewriting(["gkd"], None, "fsdp")
    d = dx.Distiller(teacher, student, [dx.method("gkd")], task_weight=0.0, progress=False)
    plain = {k: v for k, v in chat_batch().items() if not k.startswith("prompt_")}
    with pytest.raises(ValueError, match="prompt_input_ids and prompt_attention_mask .*chat_loader.* holds "
                                         r"\['attention_mask', 'input_ids'\]"):
        d.losses(plain)
    d.close()


@pytest.mark.parametrize("option, value", [("lmbda", 1.5), ("lmbda", "0.5"), ("beta", -0.1), ("top_p", 0.0),
                                           ("temperature", -1.0), ("max_new_tokens", 0), ("seq_kd", "yes"),
                                           ("eos_token_id", "2"), ("eos_token_id", []), ("pad_token_id", -1)])
def test_bad_options_are_named(option, value):
    with pytest.raises((ValueError, TypeError), match=f"'gkd'.*{option}"):
        dx.method("gkd", **{option: value})


class Doubler(dx.methods.Method):
    """A plugin's batch-rewriting method: repeats each row's tokens, calling the student on the way
    (its features must not be captured then), and adds an MSE on the last hidden state."""

    name = "doubler"
    uses_logits = False
    rewrites_batch = True
    metric_names = ("length",)

    def prepare_batch(self, inputs, targets, context):
        context.student(input_ids=inputs["input_ids"][:, :1])  # a call between captures
        self.seen = {k: v.shape for k, v in inputs.items()}
        ids = torch.cat([inputs["input_ids"], inputs["input_ids"]], dim=1)
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}, None

    def features(self):
        return [dx.methods.FeatureRequest("h", "model.norm", "model.norm")]

    def loss(self, student, teacher, batch=None):
        self.width = student["h"].shape[1]
        return torch.nn.functional.mse_loss(student["h"][..., :8], teacher["h"][..., :8])

    def batch_metrics(self):
        return {"length": float(self.width)}


def test_a_plugin_method_rewrites_the_batch_and_logs_its_statistics():
    teacher, student = pair()
    m = Doubler()
    d = dx.Distiller(teacher, student, [m], task_weight=0.0, progress=False)
    batch = chat_batch(2, 4, 3, seed=0)
    out = d.losses(batch)
    width = batch["input_ids"].shape[1]
    assert m.width == 2 * width and float(out["doubler/length"]) == 2 * width
    assert "prompt_input_ids" in m.seen  # it saw the batch as the loader made it
    d.close()


def test_padded_vocabularies_sample_only_the_shared_rows():
    """A student whose output layer has 128 rows next to a teacher's 96 (one vocabulary padded twice):
    samples come from the first 96 rows only, and the loss compares those rows."""
    torch.manual_seed(0)
    teacher = llama(layers=2, hidden=48, vocab=96).eval()
    student = llama(layers=1, hidden=32, vocab=128)
    with torch.no_grad():
        student.lm_head.weight[96:] += 3.0 * student.lm_head.weight[96:].sign()  # the padded rows are likely
    m = dx.method("gkd", lmbda=1.0, max_new_tokens=12, temperature=3.0, eos_token_id=95)
    m.bind(student, teacher)
    assert m.shared_vocab == 96
    batch = chat_batch(4, 5, 3, seed=9)
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    g = torch.Generator().manual_seed(0)
    new, labels = m.prepare_batch(inputs, batch["labels"], BatchContext(student, teacher, g, torch.device("cpu")))
    assert int(new["input_ids"].max()) < 96 and int(labels.max()) < 96
    unmasked = sample(student, batch["prompt_input_ids"], batch["prompt_attention_mask"], max_new_tokens=12,
                      generator=torch.Generator().manual_seed(0), temperature=3.0, eos_token_id=95)[0]
    assert int(unmasked.max()) >= 96  # without the restriction the padded rows are drawn
    with dx.Distiller(teacher, student, [dx.method("gkd", lmbda=1.0, max_new_tokens=6)], task_weight=0.0,
                      progress=False) as d:
        assert torch.isfinite(d.losses(batch)["gkd"])


def test_other_methods_run_beside_gkd_on_the_sampled_batch():
    """``sld`` on the last layer's hidden states next to ``gkd``: its features are those of the
    sampled batch (prompt + sample), not of the dataset's."""
    teacher, student = pair()
    batch = chat_batch(3, 5, 2, seed=4)
    gkd = dx.method("gkd", lmbda=1.0, max_new_tokens=6)
    sld = dx.method("sld", student="model.layers.-1", teacher="model.layers.-1")
    seen = []
    original = sld.loss
    sld.loss = lambda s, t, b=None: (seen.append((s["pair0"].shape[1], t["pair0"].shape[1], b)), original(s, t, b))[1]
    with dx.Distiller(teacher, student, [gkd, sld], task_weight=0.0, progress=False) as d:
        out = d.losses(batch)
    assert torch.isfinite(out["sld"]) and out["gkd/on_policy"] == 1.0
    (s_width, t_width, (inputs, labels)), = seen
    assert "prompt_input_ids" not in inputs  # the rewritten batch: prompt + the student's sample
    assert s_width == t_width == inputs["input_ids"].shape[1] == labels.shape[1]
    prompts = batch["prompt_attention_mask"].sum(-1)
    for row, p in enumerate(prompts.tolist()):
        assert (labels[row, :p] == -100).all() and labels[row, p] != -100  # each row sampled at least one token
