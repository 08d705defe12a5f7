"""``[data.dataset]``: local ``datasets`` sources (json, parquet, a save_to_disk directory), tokenized
exactly as ``[data.text]`` is; anything that could reach the Hub is refused, every mistake names its
key."""
from __future__ import annotations

import json
import os

import pytest
import torch

from distillx.cli.run import main
from distillx.config import ConfigError, validate
from distillx.config.build import build_data
from distillx.hf.datasets_local import dataset_texts

from .models import bert, sentences, tokenizer

datasets = pytest.importorskip("datasets")

TEXTS = sentences(20)


def config(tmp_path, data):
    return validate({"output_dir": str(tmp_path / "run"), "seed": 3, "data": data,
                     "teacher": {"builder": "a:b"}, "student": {"builder": "a:b", "epochs": 1}})


def batches(loader):
    return [{k: v.tolist() for k, v in b.items()} for b in loader]


@pytest.fixture
def sources(tmp_path):
    (tmp_path / "train.jsonl").write_text("".join(json.dumps({"body": t, "n": i}) + "\n" for i, t in enumerate(TEXTS)))
    table = datasets.Dataset.from_dict({"body": TEXTS, "n": list(range(len(TEXTS)))})
    table.to_parquet(str(tmp_path / "train.parquet"))
    datasets.DatasetDict({"train": table, "validation": table.select(range(4))}).save_to_disk(str(tmp_path / "saved"))
    table.save_to_disk(str(tmp_path / "one"))
    return tmp_path


@pytest.mark.parametrize("source", [
    {"path": "json", "data_files": "train.jsonl"},
    {"path": "json", "data_files": {"train": ["train.jsonl"]}},
    {"path": "parquet", "data_files": ["train.parquet"]},
    {"path": "saved"},
    {"path": "one"},
], ids=["json", "json-split-table", "parquet", "dataset-dict-dir", "dataset-dir"])
def test_a_local_dataset_gives_the_batches_of_the_same_text_file(sources, monkeypatch, source):
    monkeypatch.chdir(sources)
    tk = tokenizer()
    options = {"text_field": "body", "max_length": 6, "batch_size": 8}
    train, val = build_data(config(sources, {"dataset": {**source, **options}}), tk)
    reference, _ = build_data(config(sources, {"text": {"train": "train.jsonl", "field": "body", "max_length": 6,
                                                        "batch_size": 8}}), tk)
    assert val is None and batches(train) == batches(reference)  # same order (seeded), same tokens, same padding


def test_split_picks_another_split(sources):
    assert dataset_texts(str(sources / "saved"), split="validation", text_field="body") == TEXTS[:4]


@pytest.mark.parametrize("source, words", [
    ({"path": "imdb"}, "data.dataset.path must be one of 'json', 'parquet', 'csv', 'text', 'arrow' (with data_files) "
                       "or a local dataset directory (save_to_disk); 'imdb' is neither (distillx never loads from the Hub)"),
    ({"path": "json"}, "data.dataset: path = 'json' reads local files: give data_files"),
    ({"path": "json", "data_files": "https://example.com/a.jsonl"}, "data.dataset.data_files: "
                                                                   "'https://example.com/a.jsonl' is a URL"),
    ({"path": "json", "data_files": "nope.jsonl"}, "data.dataset.data_files: 'nope.jsonl' is not a file"),
    ({"path": "saved", "data_files": "train.jsonl"}, "data_files is for path = 'json'"),
    ({"path": "saved", "split": "test"}, "data.dataset.split: 'test' is not a split of 'saved'; its splits: 'train', "
                                         "'validation'"),
    ({"path": "json", "data_files": "train.jsonl", "text_field": "text"}, "data.dataset.text_field: 'text' is not a "
                                                                         "column of 'json' (split 'train'); its "
                                                                         "columns: 'body', 'n'"),
    ({"path": "json", "data_files": "train.jsonl", "text_field": "n"}, "row 0 of column 'n' is int, expected a string"),
    ({"path": "plain"}, "'plain' is a directory but not a saved dataset"),
    ({"path": "json", "data_files": "broken.jsonl"}, "data.dataset: datasets.load_dataset('json', "
                                                     "data_files='broken.jsonl') failed"),
], ids=["hub-name", "no-files", "url", "missing", "files-with-dir", "split", "column", "not-text", "plain-dir",
        "malformed"])
def test_mistakes_name_the_key(sources, monkeypatch, source, words):
    monkeypatch.chdir(sources)
    (sources / "plain").mkdir()
    (sources / "broken.jsonl").write_text('{"body": "a"}\n{not json\n')
    with pytest.raises(ConfigError) as info:
        build_data(config(sources, {"dataset": source}), tokenizer())
    assert words in str(info.value), str(info.value)


def test_the_schema_checks_the_table(tmp_path):
    for bad, words in (({"path": 3}, "data.dataset.path"), ({"path": "json", "data_files": 3}, "data.dataset.data_files"),
                       ({"path": "json", "data_files": []}, "data.dataset.data_files"),
                       ({"path": "json", "splt": "x"}, "data.dataset.splt"),
                       ({"text_field": "x"}, "data.dataset.path")):
        with pytest.raises(ConfigError, match=words.replace(".", r"\.")):
            config(tmp_path, {"dataset": bad})
    with pytest.raises(ConfigError, match="give exactly one of builder, text, chat, dataset"):
        config(tmp_path, {"dataset": {"path": "json"}, "text": {"train": "a.txt"}})
    with pytest.raises(ConfigError, match="data.dataset: the text is tokenized with the teacher's tokenizer"):
        build_data(config(tmp_path, {"dataset": {"path": "json", "data_files": "a"}}), None)


def test_distillx_run_distils_on_a_parquet_file(sources, capsys):
    torch.manual_seed(0)
    bert(2, 16, 2).save_pretrained(sources / "teacher")
    tokenizer().save_pretrained(sources / "teacher")
    cfg = {"output_dir": str(sources / "run"),
           "data": {"dataset": {"path": "parquet", "data_files": str(sources / "train.parquet"), "text_field": "body",
                                "batch_size": 5}},
           "teacher": {"pretrained": str(sources / "teacher")},
           "student": {"config": {"num_hidden_layers": 1}, "epochs": 1, "task_weight": 0.0},
           "methods": [{"name": "minilmv2"}]}
    (sources / "run.json").write_text(json.dumps(cfg))
    assert main([str(sources / "run.json"), "--quiet"]) == 0, capsys.readouterr().err
    steps = json.loads((sources / "run" / "metrics.json").read_text())["steps"]
    assert len(steps) == 4 and os.path.isfile(sources / "run" / "student" / "config.json")


def test_the_readme_config_runs_as_written(tmp_path, monkeypatch, capsys):
    import re
    from pathlib import Path

    text = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    block = re.search(r"```toml\n# example: dataset config\n(.*?)```", text, flags=re.S).group(1)
    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    bert(2, 16, 2).save_pretrained("models/teacher-encoder")
    tokenizer().save_pretrained("models/teacher-encoder")
    datasets.Dataset.from_dict({"sentence": TEXTS, "label": [0] * len(TEXTS)}).to_parquet("corpus.parquet")
    Path("run.toml").write_text(block)
    assert main(["run.toml", "--quiet"]) == 0, capsys.readouterr().err
    steps = json.loads(Path("runs/from-parquet/metrics.json").read_text())["steps"]
    assert len(steps) == 3 and Path("runs/from-parquet/student/config.json").is_file()  # 20 rows, batches of 8
