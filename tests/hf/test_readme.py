"""The README's "Distil a Hugging Face model" recipes run as written, on tiny models saved by this
test into the local directories they name."""
from __future__ import annotations

import re
from pathlib import Path

import torch

from .models import bert, llama, sentences, tokenizer, transformers

README = Path(__file__).resolve().parents[2] / "README.md"


def recipes() -> list[str]:
    text = README.read_text(encoding="utf-8")
    section = text.split("## Distil a Hugging Face model", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```python\n(.*?)```", section, flags=re.S)


def test_the_readme_recipes_run_as_written(tmp_path, monkeypatch, capsys):
    blocks = recipes()
    assert len(blocks) == 2 and "minilmv2" in blocks[0] and "lm_kd" in blocks[1]
    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    for name, model in (("teacher-encoder", bert(4, 32, 4)), ("teacher-lm", llama(4, 32, 4, 2, vocab=48))):
        model.save_pretrained(f"models/{name}")
        tokenizer().save_pretrained(f"models/{name}")
    Path("corpus.txt").write_text("\n".join(sentences(40)) + "\n", encoding="utf-8")
    monkeypatch.setenv("DISTILLX_QUIET", "1")
    for block in blocks:
        exec(compile(block, str(README), "exec"), {"__name__": "__readme__"})
    encoder = transformers.AutoModel.from_pretrained("student-encoder")
    assert len(encoder.encoder.layer) == 2 and Path("student-encoder/tokenizer.json").is_file()
    lm = transformers.AutoModelForCausalLM.from_pretrained("student-lm")
    assert len(lm.model.layers) == 2 and Path("runs/lm/checkpoint.pt").is_file()
    assert "weight transfer 'layer_map'" in capsys.readouterr().out
