"""Hugging Face pairs end to end on mapping batches: bitwise resume on CPU, the teacher cache, DDP
under torchrun, pooled sentence embeddings (masked_mean), token masking, evaluation."""
from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest
import torch
from torch.utils.data import DataLoader

import distillx as dx
from distillx.engine import TrainingInterrupted
from distillx.engine.batches import causal_lm_loss
from distillx.testing import child_env, same, state

from .models import TokenDataset, bert, distilbert, gpt2, llama, token_batch, transformers

HERE = os.path.dirname(os.path.abspath(__file__))


class InterruptAt:
    """A task loss that sends SIGINT to this process on its ``at``-th call."""

    def __init__(self, loss, at=None):
        self.loss, self.calls, self.at = loss, 0, at

    def __call__(self, logits, targets):
        self.calls += 1
        if self.calls == self.at:
            os.kill(os.getpid(), signal.SIGINT)
        return self.loss(logits, targets)


def classifier(layers, hidden, heads):
    return bert(layers, hidden, heads, cls=transformers.BertForSequenceClassification, num_labels=3)


def bert_run(tmp, at=None, resume=None):
    torch.manual_seed(0)
    teacher, student = classifier(3, 32, 4).eval(), classifier(2, 16, 4)
    data = TokenDataset(24, 8, labels=False)
    for i, item in enumerate(data.items):
        item["labels"] = torch.tensor(i % 3)
    loader = DataLoader(data, batch_size=8, shuffle=True, generator=torch.Generator().manual_seed(5))
    methods = [dx.method("minilmv2"), dx.method("kd", T=2.0),
               dx.method("sld", student="bert.encoder.layer.-1", teacher="bert.encoder.layer.-1",
                         reduction="masked_mean", reduction_kwargs={"normalize": True})]
    d = dx.Distiller(teacher, student, methods, task_loss=InterruptAt(torch.nn.functional.cross_entropy, at),
                     checkpoint_dir=str(tmp), augmentations=[{"name": "token_mask", "p": 0.2, "mask_id": 1}], seed=3,
                     transfer="layer_map", progress=False)
    if resume:
        torch.manual_seed(1234)  # everything must come from the checkpoint
    d.fit(loader, 3, resume=resume)
    return state(student), teacher


def llama_run(tmp, at=None, resume=None):
    torch.manual_seed(0)
    teacher, student = llama(2, 32, 4, 2).eval(), llama(1, 16, 4, 1)
    loader = DataLoader(TokenDataset(24, 10, labels=True), batch_size=8, shuffle=True,
                        generator=torch.Generator().manual_seed(5))
    d = dx.Distiller(teacher, student, [dx.method("lm_kd", divergence="jsd")], task_weight=0.5,
                     task_loss=InterruptAt(causal_lm_loss, at), checkpoint_dir=str(tmp), transfer="select",
                     progress=False)
    if resume:
        torch.manual_seed(1234)
    d.fit(loader, 3, resume=resume)
    return state(student), teacher


def family_run(tmp, at=None, resume=None, family="distilbert"):
    """DistilBERT with minilm on unlabeled batches, or GPT-2 with lm_kd + tinybert_attn; 2 epochs of 2 steps."""
    torch.manual_seed(0)
    pair = {"distilbert": (distilbert(2, 32, 4), distilbert(1, 16, 4)), "gpt2": (gpt2(2, 32, 4), gpt2(1, 16, 4))}
    teacher, student = pair[family]
    teacher.eval()
    methods = [dx.method("minilm")] if family == "distilbert" else [dx.method("lm_kd"), dx.method("tinybert_attn")]
    loader = DataLoader(TokenDataset(8, 8), batch_size=4, shuffle=True, generator=torch.Generator().manual_seed(5))
    calls = []  # no task loss here: a hook on the student's forward interrupts

    def on_step(module, args):
        calls.append(1)
        if len(calls) == at:
            os.kill(os.getpid(), signal.SIGINT)

    student.register_forward_pre_hook(on_step)
    d = dx.Distiller(teacher, student, methods, task_weight=0.0, checkpoint_dir=str(tmp), transfer="select",
                     progress=False)
    if resume:
        torch.manual_seed(1234)
    d.fit(loader, 2, resume=resume)
    return state(student), teacher


@pytest.mark.parametrize("run", [bert_run, llama_run, family_run,
                                 lambda tmp, **kw: family_run(tmp, family="gpt2", **kw)],
                         ids=["bert", "llama", "distilbert", "gpt2"])
def test_interrupt_and_resume_is_bitwise(tmp_path, run):
    ref, teacher = run(tmp_path / "ref")
    with pytest.raises(TrainingInterrupted):
        run(tmp_path / "cut", at=4 if run in (bert_run, llama_run) else 3)  # the second epoch
    resumed, _ = run(tmp_path / "cut", resume=True)
    assert same(ref, resumed)


def test_teacher_cache_with_mapping_batches(tmp_path):
    torch.manual_seed(0)
    teacher = bert(3, 32, 4).eval()
    calls = []
    teacher.register_forward_pre_hook(lambda m, a: calls.append(1))
    data = TokenDataset(16, 8)  # one length: cached token features have one shape
    methods = [dx.method("minilmv2"), dx.method("kfd", student="encoder.layer.-1", teacher="encoder.layer.-1",
                                                reduction="masked_mean")]

    def run(cache, directory):
        torch.manual_seed(1)
        s = bert(2, 16, 4)
        loader = DataLoader(data, batch_size=4, shuffle=True, generator=torch.Generator().manual_seed(2))
        d = dx.Distiller(teacher, s, methods, task_weight=0.0, cache_teacher=cache, cache_dtype="float32",
                         cache_dir=str(directory), progress=False)
        return d.fit(loader, 2), d

    live, _ = run(False, tmp_path / "a")
    calls.clear()
    cached, d = run(True, tmp_path / "b")
    assert len(calls) == 4  # one pass over the 16 samples for the cache, never during the epochs
    for a, b in zip(live, cached):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5)
    assert "logits" not in d._step.cache.keys()  # nothing reads the teacher's logits: not cached

    # lm_kd: the teacher's final hidden states are cached, its output layer never ran
    t, s = llama(2, 32, 4, 2).eval(), llama(1, 16, 4, 1)
    loader = DataLoader(TokenDataset(8, 6, labels=True), batch_size=4)
    d = dx.Distiller(t, s, [dx.method("lm_kd")], task_weight=0.0, cache_teacher=True, cache_dir=str(tmp_path / "c"),
                     progress=False)
    d.fit(loader, 1)
    assert d._step.cache.keys() == ["lm_kd.hidden"] and d._step.cache.shape("lm_kd.hidden") == (6, 32)


def test_masked_mean_is_a_sentence_embedding():
    torch.manual_seed(0)
    model = bert(2, 16, 4).eval()
    batch = token_batch(3, 7, seed=2)
    ex = dx.features.FeatureExtractor(model, {"emb": dx.features.FeatureSpec(
        "encoder.layer.-1", reduction="masked_mean", reduction_kwargs={"normalize": True})})
    with ex, torch.no_grad():
        h = model(**batch).last_hidden_state
    m = batch["attention_mask"].unsqueeze(-1).float()
    want = torch.nn.functional.normalize((h * m).sum(1) / m.sum(1), dim=1)
    torch.testing.assert_close(ex["emb"], want)


def test_token_mask_spares_padding_and_special_tokens():
    batch = token_batch(4, 12, seed=1)
    batch["special_tokens_mask"] = torch.zeros_like(batch["input_ids"])
    batch["special_tokens_mask"][:, 0] = 1
    aug = dx.plugin.resolve_augmentation({"name": "token_mask", "p": 1.0, "mask_id": 2, "special_ids": [5]})
    out, _ = aug(batch, None, torch.Generator().manual_seed(0))
    ids, real = batch["input_ids"], batch["attention_mask"].bool()
    masked = out["input_ids"] == 2
    assert torch.equal(masked, real & (batch["special_tokens_mask"] == 0) & (ids != 5))
    assert torch.equal(batch["input_ids"], ids) and out["attention_mask"] is batch["attention_mask"]


def test_two_ranks_match_one_process(tmp_path):
    if not torch.distributed.is_available() or not torch.distributed.is_gloo_available():
        pytest.skip("torch.distributed with gloo is needed")
    script = os.path.join(HERE, "ddp_script.py")
    env = child_env()
    single, multi = str(tmp_path / "single.pt"), str(tmp_path / "ddp.pt")
    sys.path.insert(0, HERE)
    threads = torch.get_num_threads()
    try:  # the one-process reference runs here (the script sets 1 thread, as each rank has)
        __import__("ddp_script").main(single, 1)
    finally:
        torch.set_num_threads(threads)
        sys.path.remove(HERE)
        for name in ("ddp_script", "models"):  # top-level names of this run only
            sys.modules.pop(name, None)
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          script, multi, "2"], env=env, timeout=300, capture_output=True, text=True)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    a, b = torch.load(single), torch.load(multi)
    assert (a["world"], b["world"]) == (1, 2)
    for key in a["student"]:  # the pooler gets no gradient: DDP must cope, and the rest must agree
        torch.testing.assert_close(b["student"][key], a["student"][key], rtol=1e-5, atol=1e-6, msg=key)
    for ha, hb in zip(a["history"], b["history"]):
        assert hb["loss"] == pytest.approx(ha["loss"], rel=1e-5)
    assert a["history"][-1]["loss"] < a["history"][0]["loss"]


def unlabelled_pair(family):
    """(teacher, student, batches of 4: one labelled and one whose labels give nothing to learn)."""
    torch.manual_seed(0)
    if family == "bert-tokens":
        make = lambda layers: bert(layers, 16, 4, cls=transformers.BertForTokenClassification, num_labels=3)  # noqa: E731
        labelled = token_batch(4, 6, seed=1)
        labelled["labels"] = (labelled["input_ids"] % 3).masked_fill(labelled["attention_mask"] == 0, -100)
    else:
        make = {"gpt2": lambda layers: gpt2(layers, 16, 4), "llama": lambda layers: llama(layers, 16, 4, 2)}[
            family.split("-")[0]]
        labelled = token_batch(4, 6, seed=1, labels=True)
    if family.endswith("length-1"):  # a causal LM's next token needs two positions: none has a target
        nothing = {k: v[:, :1] for k, v in token_batch(4, 6, seed=2, labels=True, padded=False).items()}
    else:
        nothing = token_batch(4, 6, seed=2)
        nothing["labels"] = torch.full_like(nothing["input_ids"], -100)
    return make(2).eval(), make(1), labelled, nothing


@pytest.mark.parametrize("family", ["gpt2", "llama", "bert-tokens", "llama-length-1"])
def test_a_batch_without_labelled_targets_trains_and_evaluates(family):
    """Labels all -100 (or a length-1 causal LM sequence) with task_weight > 0: the task term is 0,
    training goes on, and evaluation counts only labelled targets (None when there are none)."""
    teacher, student, labelled, nothing = unlabelled_pair(family)
    method = dx.method("kd") if family == "bert-tokens" else dx.method("lm_kd")
    d = dx.Distiller(teacher, student, [method], task_weight=1.0, progress=False)
    history = d.fit([labelled, nothing], 2, val_loader=[nothing])
    assert [s["task"] for s in d.metrics.steps("student") if s["step"] == 2] == [0.0, 0.0]
    assert [h["val_accuracy"] for h in history] == [None, None] and history[-1]["val_loss"] is None
    assert d.evaluate([labelled, nothing]) == d.evaluate([labelled])
    assert d.evaluate([labelled])["loss"] > 0
