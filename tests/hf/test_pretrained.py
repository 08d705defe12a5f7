"""In and out in the Hugging Face formats: save_pretrained students that AutoModel loads, and
``distillx run`` with pretrained directories, a student from the teacher's config and text files."""
from __future__ import annotations

import json
import os

import pytest
import torch

import distillx as dx
from distillx.cli.run import main
from distillx.hf.pretrained import config_with, is_causal_lm, student_from_config
from distillx.hf.text import read_texts

from .models import bert, llama, sentences, token_batch, tokenizer, transformers


def test_save_student_writes_what_auto_model_loads(tmp_path):
    torch.manual_seed(0)
    teacher, student = llama(2, 32, 4, 2).eval(), llama(1, 16, 4, 1)
    d = dx.Distiller(teacher, student, [dx.method("lm_kd")], task_weight=0.0, progress=False)
    d.fit([token_batch(2, 6)], 1)
    path = d.save_student(str(tmp_path / "student"), tokenizer=tokenizer())
    loaded = transformers.AutoModelForCausalLM.from_pretrained(path)
    assert type(loaded) is type(student)
    for (name, a), b in zip(student.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(a, b), name
    assert transformers.AutoTokenizer.from_pretrained(path).mask_token_id == 4
    # a plain module: its state dict, to a file
    plain = torch.nn.Linear(2, 2)
    dx.Distiller(torch.nn.Linear(2, 2), plain, [dx.method("kd")]).save_student(str(tmp_path / "s.pt"))
    assert torch.equal(torch.load(tmp_path / "s.pt")["weight"], plain.weight)
    with pytest.raises(ValueError, match="a tokenizer is saved next to a Hugging Face model only"):
        dx.Distiller(torch.nn.Linear(2, 2), plain, [dx.method("kd")]).save_student(str(tmp_path / "x.pt"), "tok")


def test_student_from_the_teachers_config():
    teacher = llama(4, 32, 4, 2)
    student = student_from_config(teacher, {"num_hidden_layers": 2, "hidden_size": 16, "intermediate_size": 24})
    assert type(student) is type(teacher) and len(student.model.layers) == 2
    assert student.config.head_dim == 4 and student.model.layers[0].self_attn.q_proj.out_features == 16
    assert is_causal_lm(student) and not is_causal_lm(bert(1))
    with pytest.raises(ValueError, match=r"student.config.num_layerz: LlamaConfig has no attribute 'num_layerz'; "
                                         r"it has: .*num_hidden_layers"):
        config_with(teacher.config, {"num_layerz": 2}, "student.config")


def write_teacher(directory, model):
    model.save_pretrained(directory)
    tokenizer().save_pretrained(directory)


def test_distillx_run_with_pretrained_teacher_text_and_config_student(tmp_path, capsys):
    torch.manual_seed(0)
    write_teacher(tmp_path / "teacher", bert(4, 32, 4))
    (tmp_path / "train.jsonl").write_text("".join(json.dumps({"sentence": s}) + "\n" for s in sentences(24)))
    cfg = {"output_dir": str(tmp_path / "run"), "seed": 0,
           "data": {"text": {"train": str(tmp_path / "train.jsonl"), "field": "sentence", "max_length": 12,
                             "batch_size": 8}},
           "teacher": {"pretrained": str(tmp_path / "teacher")},
           "student": {"config": {"num_hidden_layers": 2}, "epochs": 2, "task_weight": 0.0},
           "methods": [{"name": "minilmv2"},
                       {"name": "sld", "student": "encoder.layer.-1", "teacher": "encoder.layer.-1",
                        "reduction": "masked_mean"}],
           "transfer": {"name": "layer_map"}}
    path = tmp_path / "run.json"
    path.write_text(json.dumps(cfg))
    assert main([str(path), "--quiet"]) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    assert "student/" in out and "student.pt" not in out
    student = transformers.AutoModel.from_pretrained(tmp_path / "run" / "student")
    assert len(student.encoder.layer) == 2
    teacher = transformers.AutoModel.from_pretrained(tmp_path / "teacher")
    # layer_map initialised the student; 2 epochs moved it
    assert not torch.equal(student.encoder.layer[1].attention.self.query.weight,
                           teacher.encoder.layer[2].attention.self.query.weight)
    assert os.path.isfile(tmp_path / "run" / "student" / "tokenizer.json")
    history = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert history  # metrics were written


def test_distillx_run_causal_lm_from_txt(tmp_path, capsys):
    torch.manual_seed(0)
    write_teacher(tmp_path / "teacher", llama(2, 32, 4, 2, vocab=40))
    write_teacher(tmp_path / "student0", llama(1, 16, 4, 2, vocab=40))
    (tmp_path / "train.txt").write_text("\n".join(sentences(16)) + "\n\n")
    cfg = {"output_dir": str(tmp_path / "run"),
           "data": {"text": {"train": str(tmp_path / "train.txt"), "batch_size": 4}},
           "teacher": {"pretrained": str(tmp_path / "teacher")},
           "student": {"pretrained": str(tmp_path / "student0"), "epochs": 1, "task_weight": 0.0},
           "methods": [{"name": "lm_kd", "divergence": "reverse_kl"}]}
    path = tmp_path / "run.json"
    path.write_text(json.dumps(cfg))
    assert main([str(path), "--quiet"]) == 0, capsys.readouterr().err
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "student")
    assert type(loaded).__name__ == "LlamaForCausalLM"
    listed = json.loads((tmp_path / "run" / "distillx-outputs.json").read_text())["files"]
    assert "student/config.json" in listed and "student/tokenizer.json" in listed
    # continue from the previous run's student in the same output_dir: --overwrite must not delete
    # it before it is loaded, nor a file of the user's in that folder
    (tmp_path / "run" / "student" / "NOTES.md").write_text("mine")
    cfg["student"]["pretrained"] = str(tmp_path / "run" / "student")
    path.write_text(json.dumps(cfg))
    assert main([str(path), "--quiet", "--overwrite"]) == 0, capsys.readouterr().err
    again = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "student")
    assert not all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), again.state_dict().values()))
    assert (tmp_path / "run" / "student" / "NOTES.md").read_text() == "mine"


@pytest.mark.parametrize("change, message", [
    ({"teacher": {"pretrained": "nowhere"}}, r"teacher.pretrained: FileNotFoundError: teacher.pretrained: 'nowhere' "
                                             r"does not exist"),
    ({"student": {"config": {"num_layerz": 1}, "epochs": 1}}, r"student.config.num_layerz: BertConfig has no attribute"),
    ({"data": {"text": {"train": "missing.txt"}}}, r"data.text.train: FileNotFoundError: text file 'missing.txt'"),
    ({"data": {"text": {"train": "corpus"}}}, r"data.text.train: IsADirectoryError: text file 'corpus' is a directory; "
                                              r"expected a .txt \(one example per line\) or .jsonl file"),
    ({"data": {"text": {"train": "latin1.txt"}}}, r"data.text.train: ValueError: latin1.txt:2: not UTF-8 text \(byte "
                                                  r"0xe9 at column 8\)"),
], ids=["pretrained", "config-key", "missing", "directory", "not-utf-8"])
def test_distillx_run_errors_name_the_key(tmp_path, capsys, monkeypatch, change, message):
    write_teacher(tmp_path / "teacher", bert(2, 16, 2))
    (tmp_path / "train.txt").write_text("the cat sat\n")
    (tmp_path / "corpus").mkdir()
    (tmp_path / "latin1.txt").write_bytes("the cat sat\nthe caf\u00e9 is red\n".encode("latin-1"))
    monkeypatch.chdir(tmp_path)
    cfg = {"output_dir": str(tmp_path / "run"), "data": {"text": {"train": str(tmp_path / "train.txt")}},
           "teacher": {"pretrained": str(tmp_path / "teacher")},
           "student": {"config": {"num_hidden_layers": 1}, "epochs": 1}, "methods": [{"name": "minilmv2"}]}
    cfg.update(change)
    path = tmp_path / "run.json"
    path.write_text(json.dumps(cfg))
    assert main([str(path), "--quiet"]) == 2
    assert __import__("re").search(message, capsys.readouterr().err)


def test_read_texts(tmp_path):
    (tmp_path / "a.jsonl").write_text('{"text": "one"}\n\n{"body": "two"}\n')
    with pytest.raises(ValueError, match=r"a.jsonl:3: expected an object with a string 'text' \(field=\), got \['body'\]"):
        read_texts(str(tmp_path / "a.jsonl"))
    (tmp_path / "b.csv").write_text("x\n")
    with pytest.raises(ValueError, match=r"expected a .txt \(one example per line\) or .jsonl file, got '.csv'"):
        read_texts(str(tmp_path / "b.csv"))
    (tmp_path / "c.txt").write_text("first line\n\n  second  \n")
    assert read_texts(str(tmp_path / "c.txt")) == ["first line", "  second  "]
    (tmp_path / "crlf.txt").write_bytes("caf\u00e9 one\r\ntwo\r\n".encode())  # Windows line ends, as text mode reads them
    assert read_texts(str(tmp_path / "crlf.txt")) == ["caf\u00e9 one", "two"]


@pytest.mark.parametrize("name, content", [
    ("d.txt", b"one\ntwo\nthr\xe9e\n"),
    ("e.jsonl", b'{"text": "one"}\n\n{"text": "thr\xe9e"}\n'),
], ids=["txt", "jsonl"])
def test_read_texts_names_the_file_and_line_that_is_not_utf_8(tmp_path, name, content):
    (tmp_path / name).write_bytes(content)
    column = content.split(b"\n")[2].index(b"\xe9") + 1
    with pytest.raises(ValueError, match=rf"{name}:3: not UTF-8 text \(byte 0xe9 at column {column}\); save it as UTF-8"):
        read_texts(str(tmp_path / name))


def test_read_texts_says_a_directory_is_not_a_text_file(tmp_path):
    with pytest.raises(IsADirectoryError, match=rf"text file '{tmp_path}' is a directory; expected a .txt"):
        read_texts(str(tmp_path))
