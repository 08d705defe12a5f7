"""The README's "Distil a Hugging Face model" and "PEFT (LoRA) students" recipes run as written, on
tiny models saved by this test into the local directories they name."""
from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from distillx.cli.run import main

from .models import bert, chat_tokenizer, llama, sentences, tokenizer, transformers

README = Path(__file__).resolve().parents[2] / "README.md"


def recipes(language: str = "python", heading: str = "## Distil a Hugging Face model") -> list[str]:
    text = README.read_text(encoding="utf-8")
    section = text.split(heading, 1)[1].split("\n## ", 1)[0]
    return re.findall(rf"```{language}\n(.*?)```", section, flags=re.S)


def test_the_readme_recipes_run_as_written(tmp_path, monkeypatch, capsys):
    blocks = recipes()
    assert len(blocks) == 3 and "minilmv2" in blocks[0] and "lm_kd" in blocks[1] and '"gkd"' in blocks[2]
    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    for name, model in (("teacher-encoder", bert(4, 32, 4)), ("teacher-lm", llama(4, 32, 4, 2, vocab=48))):
        model.save_pretrained(f"models/{name}")
        tokenizer().save_pretrained(f"models/{name}")
    llama(2, 32, 4, 2).save_pretrained("models/teacher-chat")
    chat_tokenizer().save_pretrained("models/teacher-chat")
    Path("corpus.txt").write_text("\n".join(sentences(40)) + "\n", encoding="utf-8")
    lines = [{"prompt": a, "completion": " " + b} for a, b in zip(sentences(12), sentences(12)[::-1])]
    Path("chat.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines), encoding="utf-8")
    monkeypatch.setenv("DISTILLX_QUIET", "1")
    for block in blocks:
        exec(compile(block, str(README), "exec"), {"__name__": "__readme__"})
    encoder = transformers.AutoModel.from_pretrained("student-encoder")
    assert len(encoder.encoder.layer) == 2 and Path("student-encoder/tokenizer.json").is_file()
    lm = transformers.AutoModelForCausalLM.from_pretrained("student-lm")
    assert len(lm.model.layers) == 2 and Path("runs/lm/checkpoint.pt").is_file()
    out = capsys.readouterr().out
    assert "weight transfer 'layer_map'" in out and "'gkd/on_policy'" in out
    chat = transformers.AutoModelForCausalLM.from_pretrained("student-chat")
    assert len(chat.model.layers) == 1


def test_the_chat_config_runs_as_written(tmp_path, monkeypatch, capsys):
    (config,) = [block for block in recipes("toml") if 'name = "gkd"' in block]
    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    llama(2, 32, 4, 2).save_pretrained("models/teacher-chat")
    chat_tokenizer().save_pretrained("models/teacher-chat")
    lines = [{"prompt": a, "completion": " " + b} for a, b in zip(sentences(8), sentences(8)[::-1])]
    Path("chat.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines), encoding="utf-8")
    Path("chat.toml").write_text(config, encoding="utf-8")
    assert main(["chat.toml", "--quiet"]) == 0, capsys.readouterr().err
    log = json.loads(Path("runs/chat-run/metrics.json").read_text())
    epochs = [r for r in log["epochs"] if r["phase"] == "student"]
    assert len(epochs) == 2 and all("gkd/on_policy" in r for r in epochs)
    assert Path("runs/chat-run/student/config.json").is_file()


def test_the_peft_recipe_runs_as_written(tmp_path, monkeypatch):
    peft = __import__("pytest").importorskip("peft")
    (block,) = recipes(heading="## PEFT (LoRA) students")
    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    for name, model in (("teacher-lm", llama(4, 32, 4, 2, vocab=48)), ("student-lm", llama(2, 16, 4, 2, vocab=48))):
        model.save_pretrained(f"models/{name}")
        tokenizer().save_pretrained(f"models/{name}")
    Path("corpus.txt").write_text("\n".join(sentences(24)) + "\n", encoding="utf-8")
    monkeypatch.setenv("DISTILLX_QUIET", "1")
    scope = {"__name__": "__readme__"}
    exec(compile(block, str(README), "exec"), scope)
    student, lora = scope["student"], scope["lora"]
    assert isinstance(lora, peft.PeftModel) and Path("student-lora/tokenizer.json").is_file()
    merged = transformers.AutoModelForCausalLM.from_pretrained("student-merged")
    batch = {"input_ids": torch.tensor([[5, 9, 12, 7]])}
    with torch.no_grad():
        want = student.eval()(**batch).logits
        assert torch.allclose(lora.eval()(**batch).logits, want, atol=1e-6, rtol=0)
        assert torch.allclose(merged(**batch).logits, want, atol=1e-5, rtol=0)
    assert not torch.equal(want, transformers.AutoModelForCausalLM.from_pretrained("models/student-lm")(**batch).logits)
