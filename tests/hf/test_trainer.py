"""``distillx.hf.DistillationTrainer``: the Distiller's step inside ``transformers.Trainer`` (tiny
LLaMA pair, CPU): the loss of a batch equals ``Distiller.losses``, training lowers it, each term is
logged, adapters are trained, saved and restored, a resumed run continues, the teacher never moves."""
from __future__ import annotations

import copy
import os

import pytest
import torch

import distillx as dx
from distillx.testing import snapshot, unchanged

from .models import TokenDataset, llama, token_batch, transformers

pytest.importorskip("accelerate")
from distillx.hf import DistillationTrainer  # noqa: E402


def pair(seed=0):
    torch.manual_seed(seed)
    return llama(2, 32, 4, 2).eval(), llama(1, 16, 4, 2)


def methods():
    return [dx.method("lm_kd", T=2.0, weight=1.0),
            dx.method("sld", student="model.layers.0", teacher="model.layers.1", weight=0.5)]  # an adapter 16 -> 32


def arguments(tmp_path, **kw):
    kw = {"per_device_train_batch_size": 4, "learning_rate": 1e-2, "max_steps": 4, "logging_steps": 1,
          "save_strategy": "no", "report_to": [], "use_cpu": True, "seed": 0, "disable_tqdm": True,
          "lr_scheduler_type": "constant", **kw}
    return transformers.TrainingArguments(output_dir=str(tmp_path / "out"), **kw)


def trainer(tmp_path, teacher, student, dataset=None, **kw):
    return DistillationTrainer(model=student, args=arguments(tmp_path, **kw.pop("args", {})), teacher=teacher,
                               methods=methods(), task_weight=0.3, train_dataset=dataset or TokenDataset(16, labels=True),
                               example_inputs=token_batch(2), **kw)


def test_the_loss_is_the_distillers_and_training_lowers_it(tmp_path):
    teacher, student = pair()
    batch = token_batch(8, seed=5, labels=True)
    reference = dx.Distiller(copy.deepcopy(teacher), copy.deepcopy(student), methods(), task_weight=0.3,
                             example_inputs=token_batch(2), progress=False)
    t = trainer(tmp_path, teacher, student, TokenDataset(8, labels=True, seed=5), args={"max_steps": 25})
    reference.methods[1].load_state_dict(t.distiller.methods[1].state_dict())  # the same adapter
    expected = reference.losses(batch)
    got = t.compute_loss(t.model, batch)
    assert torch.equal(got, expected["loss"]) and set(expected) == {"loss", "task", "lm_kd", "sld"}
    before_teacher = snapshot(teacher)
    t.train()
    assert unchanged(teacher, before_teacher) and not teacher.training
    with torch.no_grad():
        after = t.compute_loss(t.model, batch)
    assert after < 0.8 * got
    held = {id(p) for g in t.optimizer.param_groups for p in g["params"]}
    adapter = list(t.distiller.methods[1].parameters())
    assert adapter and all(id(p) in held for p in adapter), "the adapter trains"
    assert not any(id(p) in held for p in teacher.parameters()), "the teacher is never in the optimizer"
    assert not torch.equal(adapter[0], next(reference.methods[1].parameters())), "the adapter moved"
    logs = [r for r in t.state.log_history if "loss" in r]
    assert len(logs) == 25 and all({"loss/task", "loss/lm_kd", "loss/sld"} <= set(r) for r in logs)
    assert logs[0]["loss"] > logs[-1]["loss"]


def test_the_first_logged_loss_is_the_distillers_on_that_batch(tmp_path):
    teacher, student = pair(2)
    data = TokenDataset(4, labels=True, seed=3)  # one batch per epoch: the whole set, in the sampler's order
    whole = token_batch(4, seed=3, labels=True)
    reference = dx.Distiller(copy.deepcopy(teacher), copy.deepcopy(student), methods(), task_weight=0.3,
                             example_inputs=token_batch(2), progress=False)
    t = trainer(tmp_path, teacher, student, data, args={"max_steps": 1})
    reference.methods[1].load_state_dict(t.distiller.methods[1].state_dict())
    expected = {k: v.item() for k, v in reference.losses(whole).items()}
    t.train()
    first = t.state.log_history[0]
    assert first["loss"] == pytest.approx(expected["loss"], rel=1e-4)  # the batch's rows in another order
    for key in ("task", "lm_kd", "sld"):
        assert first[f"loss/{key}"] == pytest.approx(expected[key], rel=1e-4)


def test_a_resumed_run_continues_with_its_adapters(tmp_path):
    teacher, student = pair()
    full = trainer(tmp_path / "a", teacher, copy.deepcopy(student), args={"max_steps": 6, "save_strategy": "steps",
                                                                          "save_steps": 3})
    full.train()
    ckpt = tmp_path / "a" / "out" / "checkpoint-3"
    assert (ckpt / "distillx_methods.pt").is_file() and (ckpt / "model.safetensors").is_file()
    resumed = trainer(tmp_path / "b", teacher, copy.deepcopy(student), args={"max_steps": 6})
    resumed.train(resume_from_checkpoint=str(ckpt))
    assert resumed.state.global_step == 6
    for (name, a), b in zip(full.model.named_parameters(), resumed.model.parameters()):
        assert torch.equal(b, a), name  # bitwise: weights, adapters and their optimizer state restored
    for a, b in zip(full.distiller.methods[1].parameters(), resumed.distiller.methods[1].parameters()):
        assert torch.equal(b, a)
    os.remove(ckpt / "distillx_methods.pt")
    again = trainer(tmp_path / "c", teacher, copy.deepcopy(student), args={"max_steps": 6})
    with pytest.raises(FileNotFoundError, match="has no distillx_methods.pt"):
        again.train(resume_from_checkpoint=str(ckpt))


def test_transfer_applies_when_training_starts(tmp_path):
    teacher, student = pair()
    t = DistillationTrainer(model=student, args=arguments(tmp_path, max_steps=1, learning_rate=1e-9),
                            teacher=teacher, methods=[dx.method("lm_kd")], task_weight=0.0, transfer="select",
                            train_dataset=TokenDataset(8))
    assert t.distiller.transfer_report is None
    t.train()
    report = t.distiller.transfer_report
    assert report is not None and report.headline()
    # lr 1e-9: the student is the transfer's result (select keeps the teacher's layer 0 of the stack)
    torch.testing.assert_close(student.model.layers[0].mlp.down_proj.weight.abs().sum() > 0, torch.tensor(True))


@pytest.mark.parametrize("kw, error, words", [
    ({"balance": "auto"}, TypeError, "does not take balance=: loss balancing"),
    ({"optimizer": None}, TypeError, "does not take optimizer=: pass TrainingArguments(optim="),
    ({"teacher": None}, TypeError, "needs teacher="),
    ({"methods": [3]}, TypeError, "methods[0] must be a distillx Method"),
    ({"methods": [], "task_weight": 0.0}, ValueError, "nothing to train"),
    ({"task_weight": "1"}, ValueError, "task_weight"),
])
def test_bad_arguments_name_themselves(tmp_path, kw, error, words):
    teacher, student = pair()
    args = {"model": student, "args": arguments(tmp_path), "teacher": teacher, "methods": [dx.method("lm_kd")],
            "train_dataset": TokenDataset(8), **kw}
    with pytest.raises(error) as info:
        DistillationTrainer(**args)
    assert words in str(info.value), str(info.value)


def test_the_readme_recipe_runs_as_written(tmp_path, monkeypatch):
    import re
    from pathlib import Path

    from .models import sentences, tokenizer

    text = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    section = text.split("## Inside the Hugging Face Trainer", 1)[1].split("\n## ", 1)[0]
    (block,) = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    llama(4, 32, 4, 2, vocab=48).save_pretrained("models/teacher-lm")
    tokenizer().save_pretrained("models/teacher-lm")
    Path("corpus.txt").write_text("\n".join(sentences(40)) + "\n")
    scope = {"__name__": "__readme__"}
    exec(compile(block, "README.md", "exec"), scope)
    logs = [r for r in scope["trainer"].state.log_history if "loss" in r]
    assert len(logs) == 4 and {"loss/task", "loss/lm_kd", "loss/sld"} <= set(logs[0])
    # equal widths: sld needs no adapter, so the checkpoint holds no methods' state
    assert (tmp_path / "runs/trainer/checkpoint-10/model.safetensors").is_file()
    assert not (tmp_path / "runs/trainer/checkpoint-10/distillx_methods.pt").exists()
    assert scope["trainer"].distiller.transfer_report is not None
    assert len(transformers.AutoModelForCausalLM.from_pretrained("student-trainer").model.layers) == 2
