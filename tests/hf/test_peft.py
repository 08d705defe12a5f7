"""PEFT (LoRA) students: layer paths written for the user's model work through the ``PeftModel``
wrapper, only the adapter weights train (the frozen base stays bitwise), the adapter and the merged
model are saved and load back to the trained student's outputs, resume is bitwise, and what cannot
work is refused by name (LoRA on the output layer ``lm_kd`` reads, ``transfer=``, ``merge=`` misuse)."""
from __future__ import annotations

import pytest
import torch

import distillx as dx
from distillx.engine.batches import causal_lm_loss
from distillx.features import resolve_module
from distillx.hf import find_attention
from distillx.testing import same, state

from .models import TokenDataset, bert, llama, token_batch, transformers

peft = pytest.importorskip("peft")

LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]


def lora(base, targets, **kw):
    config = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=targets, **kw)
    return peft.get_peft_model(base, config)


def llama_pair(seed=0, **kw):
    """A 2-layer LLaMA teacher and a LoRA student of another random 2-layer LLaMA; also the
    student's base weights as they were (to rebuild the base for loading the adapter)."""
    torch.manual_seed(seed)
    teacher, base = llama(2, 32, 4, 2).eval(), llama(2, 32, 4, 2)
    initial = state(base)
    return teacher, lora(base, LLAMA_TARGETS, task_type="CAUSAL_LM", **kw), initial


def bert_pair(seed=0):
    torch.manual_seed(seed)
    teacher, base = bert(2, 32, 4).eval(), bert(2, 32, 4)
    initial = state(base)
    return teacher, lora(base, ["query", "key", "value"]), initial


def llama_methods(path="model.layers.-1"):
    return [dx.method("lm_kd", T=2.0), dx.method("sld", student=path, teacher="model.layers.-1")]


def bert_methods():
    return [dx.method("minilmv2"), dx.method("sld", student="encoder.layer.-1", teacher="encoder.layer.-1",
                                             reduction="masked_mean")]


def loader(n=16, seed=0):
    return torch.utils.data.DataLoader(TokenDataset(n, seed=seed), batch_size=4)


def distiller(teacher, student, methods, **kw):
    return dx.Distiller(teacher, student, methods, task_weight=0.0, progress=False,
                        optimizer=lambda params: torch.optim.AdamW(params, lr=1e-2), **kw)


def outputs(model, batch):
    model.eval()
    with torch.no_grad():
        out = model(**batch)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


CASES = {"llama": (llama_pair, llama_methods, transformers.LlamaForCausalLM, transformers.AutoModelForCausalLM),
         "bert": (bert_pair, bert_methods, transformers.BertModel, transformers.AutoModel)}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("seed", [0, 1])
def test_only_the_adapters_train_and_save_and_merge_reload_the_student(case, seed, tmp_path):
    build, methods, cls, auto = CASES[case]
    teacher, student, initial = build(seed)
    frozen = {n: p.detach().clone() for n, p in student.named_parameters() if not p.requires_grad}
    adapters = {n: p.detach().clone() for n, p in student.named_parameters() if p.requires_grad}
    assert adapters and all("lora_" in n for n in adapters)
    d = distiller(teacher, student, methods(), example_inputs=token_batch(2))
    held = {id(p) for g in d.optimizer.param_groups for p in g["params"]}
    wanted = {id(p) for p in student.parameters() if p.requires_grad} | {id(p) for m in d.methods for p in m.parameters()}
    assert held == wanted  # the frozen base is not in the optimizer (no weight decay moves it either)
    history = d.fit(loader(seed=seed), epochs=4)
    assert history[-1]["loss"] < 0.95 * history[0]["loss"]  # 0.76-0.85 over seeds 0-8
    now = dict(student.named_parameters())
    assert all(torch.equal(now[n], p) for n, p in frozen.items())
    assert all(not torch.equal(now[n], p) for n, p in adapters.items())

    batch = token_batch(3, seed=7)
    trained = outputs(student, batch)
    d.save_student(str(tmp_path / "adapter"))
    assert (tmp_path / "adapter" / "adapter_config.json").is_file()
    assert not (tmp_path / "adapter" / "config.json").exists()  # an adapter, not a whole model
    base = cls(student.base_model.model.config)
    base.load_state_dict(initial)
    reloaded = peft.PeftModel.from_pretrained(base, str(tmp_path / "adapter"))
    assert torch.allclose(outputs(reloaded, batch), trained, atol=1e-6, rtol=0)

    before = state(student)
    d.save_student(str(tmp_path / "merged"), merge=True)
    assert same(state(student), before) and isinstance(student, peft.PeftModel)  # the student is not merged
    merged = auto.from_pretrained(str(tmp_path / "merged"))
    assert not any("lora_" in n for n, _ in merged.named_parameters())
    assert torch.allclose(outputs(merged, batch), trained, atol=1e-5, rtol=0)
    assert torch.equal(outputs(student, batch), trained)
    d.close()


def test_paths_resolve_through_the_wrapper_to_the_same_modules():
    teacher, student, _ = llama_pair()
    inner = student.base_model.model
    for path in ("model.layers.-1", "base_model.model.model.layers.1"):
        module, canonical = resolve_module(student, path)
        assert module is inner.model.layers[1] and canonical == "model.layers.1"
    layout = find_attention(student, "last")
    assert layout.path == "model.layers.1.self_attn" and layout.widths == (32, 16, 16)
    assert (layout.heads, layout.kv_heads) == (4, 2)
    # the sld term is the same whichever way the layer is written
    batch = token_batch(4, seed=3)
    losses = []
    for path in ("model.layers.-1", "base_model.model.model.layers.1"):
        torch.manual_seed(0)  # the same adapter
        d = distiller(teacher, student, llama_methods(path), example_inputs=token_batch(2))
        losses.append(d.losses(batch))
        d.close()
    assert torch.equal(losses[0]["sld"], losses[1]["sld"]) and torch.equal(losses[0]["lm_kd"], losses[1]["lm_kd"])


def test_a_peft_model_without_task_type_is_still_a_causal_lm():
    torch.manual_seed(0)
    student = lora(llama(1, 16, 4, 2), ["q_proj"])  # a bare PeftModel around LlamaForCausalLM
    assert type(student) is peft.PeftModel
    d = dx.Distiller(llama(1, 16, 4, 2), student, [dx.method("lm_kd")], progress=False)
    assert d.task_loss is causal_lm_loss
    d.close()


def test_lm_kd_reads_a_modules_to_save_copy_of_the_output_layer():
    teacher, student, _ = llama_pair(modules_to_save=["lm_head"])
    d = distiller(teacher, student, [dx.method("lm_kd")])
    wrapper = student.base_model.model.lm_head
    assert d.methods[0].output_weights()[0] is wrapper.modules_to_save["default"].weight
    original = wrapper.original_module.weight.detach().clone()
    d.fit(loader(8), epochs=1)
    assert torch.equal(wrapper.original_module.weight, original)
    assert not torch.equal(wrapper.modules_to_save["default"].weight, original)
    d.close()


def test_resume_with_a_peft_student_is_bitwise(tmp_path):
    def run(directory, epochs, resume=None):
        teacher, student, _ = llama_pair(seed=3)
        # a constant rate: one epoch then two more is the schedule of three
        d = distiller(teacher, student, llama_methods(), checkpoint_dir=str(tmp_path / directory),
                      scheduler="constant", warmup=0)
        d.fit(loader(12, seed=3), epochs=epochs, resume=resume)
        d.close()
        return state(student), [p.detach().clone() for m in d.methods for p in m.parameters()]

    full = run("a", 3)
    run("b", 1)
    resumed = run("b", 3, resume=True)
    assert same(resumed[0], full[0]) and all(torch.equal(a, b) for a, b in zip(resumed[1], full[1]))


def test_what_cannot_work_is_refused_by_name(tmp_path):
    torch.manual_seed(0)
    on_head = lora(llama(1, 16, 4, 2), ["q_proj", "lm_head"], task_type="CAUSAL_LM")
    with pytest.raises(ValueError, match=r"'lm_head' is wrapped by a PEFT adapter .*target_modules"):
        dx.Distiller(llama(1, 16, 4, 2), on_head, [dx.method("lm_kd")], task_weight=0.0)
    student = lora(llama(1, 16, 4, 2), ["q_proj"])
    with pytest.raises(ValueError, match=r"transfer='layer_map': the student is a PEFT model .*before wrapping"):
        dx.Distiller(llama(2, 16, 4, 2), student, [dx.method("lm_kd")], transfer="layer_map")
    plain = dx.Distiller(llama(1, 16, 4, 2), llama(1, 16, 4, 2), [dx.method("lm_kd")], progress=False)
    with pytest.raises(ValueError, match=r"merge=True .* no PEFT model"):
        plain.save_student(str(tmp_path / "s"), merge=True)
    with pytest.raises(TypeError, match=r"merge must be True or False, got 'yes'"):
        plain.save_student(str(tmp_path / "s"), merge="yes")
    assert not (tmp_path / "s").exists()
    plain.close()


def test_the_trainer_trains_saves_and_resumes_a_peft_student(tmp_path):
    pytest.importorskip("accelerate")
    from distillx.hf import DistillationTrainer

    def run(resume=None):
        teacher, student, _ = llama_pair(seed=2)
        frozen = {n: p.detach().clone() for n, p in student.named_parameters() if not p.requires_grad}
        args = transformers.TrainingArguments(
            output_dir=str(tmp_path / "out"), per_device_train_batch_size=4, learning_rate=1e-2, max_steps=6,
            save_steps=3, report_to=[], use_cpu=True, seed=0, disable_tqdm=True)
        trainer = DistillationTrainer(model=student, teacher=teacher, methods=llama_methods(), task_weight=0.3,
                                      args=args, train_dataset=TokenDataset(16, labels=True))
        trainer.train(resume_from_checkpoint=resume)
        now = dict(student.named_parameters())
        assert all(torch.equal(now[n], p) for n, p in frozen.items())
        trainer.distiller.close()
        return trainer, state(student)

    trainer, full = run()
    assert not same(full, state(llama_pair(seed=2)[1]))  # the adapters moved
    trainer.save_model(str(tmp_path / "saved"))
    assert (tmp_path / "saved" / "adapter_config.json").is_file()
    # sld between equal widths holds no parameters: the checkpoint has no distillx_methods.pt, and needs none
    assert not (tmp_path / "out" / "checkpoint-3" / "distillx_methods.pt").exists()
    _, resumed = run(str(tmp_path / "out" / "checkpoint-3"))
    assert same(resumed, full)


def test_gkd_samples_from_a_peft_student_and_trains_its_adapters(tmp_path):
    import json

    from distillx.hf.text import chat_loader

    from .models import chat_tokenizer, sentences

    lines = [{"prompt": a, "completion": " " + b} for a, b in zip(sentences(8), sentences(8)[::-1])]
    (tmp_path / "chat.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines), encoding="utf-8")
    tok = chat_tokenizer()
    torch.manual_seed(0)
    teacher = llama(2, 32, 4, 2, vocab=len(tok)).eval()
    student = lora(llama(1, 32, 4, 2, vocab=len(tok)), LLAMA_TARGETS, task_type="CAUSAL_LM")
    before = {n: p.detach().clone() for n, p in student.named_parameters()}
    d = distiller(teacher, student, [dx.method("gkd", lmbda=1.0, max_new_tokens=4)])
    history = d.fit(chat_loader(str(tmp_path / "chat.jsonl"), tok, max_length=32, batch_size=4), epochs=1)
    assert history[0]["gkd/on_policy"] == 1.0 and history[0]["gkd/mean_sampled_length"] > 0
    for n, p in student.named_parameters():
        assert torch.equal(p, before[n]) != p.requires_grad, n  # the adapters moved, nothing else
    d.close()
