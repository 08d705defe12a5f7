"""chat_loader: prompt/completion and chat-template lines to batches with completion-only labels and
left-padded prompts; EOS, truncation and padding rules; errors naming file:line; deterministic
shuffling; the batches in a Distiller; [data.chat] in run configs."""
from __future__ import annotations

import json

import pytest
import torch

import distillx as dx
from distillx.cli.run import main
from distillx.config.build import build_data
from distillx.config.schema import ConfigError, validate
from distillx.engine.batches import model_kwargs
from distillx.engine.rng import loader_generators
from distillx.hf.text import chat_loader

from .models import WORDS, chat_tokenizer, llama, transformers

BOS, EOS, END, ASSISTANT = 1, 2, 7, 6


def write(path, lines) -> str:
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines), encoding="utf-8")
    return str(path)


def words(g: torch.Generator, low: int, high: int) -> str:
    n = int(torch.randint(low, high + 1, (1,), generator=g))
    return " ".join(WORDS[int(i)] for i in torch.randint(0, len(WORDS), (n,), generator=g))


def ids(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


def expect_batch(batch: dict, rows: list[tuple[list[int], list[int]]]) -> None:
    """``batch`` is exactly the padded form of ``rows`` = [(prompt ids, completion ids), ...] (pad 0)."""
    L = max(len(p) + len(c) for p, c in rows)
    P = max(len(p) for p, _ in rows)
    assert sorted(batch) == ["attention_mask", "input_ids", "labels", "prompt_attention_mask", "prompt_input_ids"]
    assert all(v.dtype == torch.long for v in batch.values())
    for i, (p, c) in enumerate(rows):
        n = len(p) + len(c)
        assert batch["input_ids"][i].tolist() == p + c + [0] * (L - n)
        assert batch["attention_mask"][i].tolist() == [1] * n + [0] * (L - n)
        assert batch["labels"][i].tolist() == [-100] * len(p) + c + [-100] * (L - n)
        assert batch["prompt_input_ids"][i].tolist() == [0] * (P - len(p)) + p
        assert batch["prompt_attention_mask"][i].tolist() == [0] * (P - len(p)) + [1] * len(p)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_prompt_completion_lines(tmp_path, seed):
    g = torch.Generator().manual_seed(seed)
    tok = chat_tokenizer()
    lines = [{"prompt": words(g, 1, 6), "completion": words(g, 0, 6)} for _ in range(7)]
    loader = chat_loader(write(tmp_path / "d.jsonl", lines), tok, max_length=64, batch_size=3, shuffle=False)
    # the prompt with the tokenizer's BOS, the completion without, then EOS
    want = [([BOS] + ids(tok, x["prompt"]), ids(tok, x["completion"]) + [EOS]) for x in lines]
    batches = list(loader)
    assert [len(b["input_ids"]) for b in batches] == [3, 3, 1]
    for k, b in enumerate(batches):
        expect_batch(b, want[3 * k:3 * k + 3])


def test_messages_lines_through_the_chat_template(tmp_path):
    tok = chat_tokenizer()
    lines = [{"messages": [{"role": "user", "content": "a dog"}, {"role": "assistant", "content": "ran fast"}]},
             {"messages": [{"role": "system", "content": "the cat"}, {"role": "user", "content": "sat"},
                           {"role": "assistant", "content": "on the mat"}, {"role": "user", "content": "where"},
                           {"role": "assistant", "content": "under the tree"}]},
             {"prompt": "the bird", "completion": " flew"}]  # the two forms mix
    batch = next(iter(chat_loader(write(tmp_path / "d.jsonl", lines), tok, 64, 3, shuffle=False)))
    tokens = [[tok.convert_ids_to_tokens(i) for i in row] for row in
              (batch["prompt_input_ids"].tolist(), batch["labels"].clamp(min=0).tolist())]
    # the template writes the BOS; the prompt ends with the generation prompt; earlier turns are prompt
    assert [t for t in tokens[0][0] if t != "[PAD]"] == ["<s>", "<|user|>", "a", "dog", "<|end|>", "<|assistant|>"]
    assert [t for t in tokens[0][1] if t != "[PAD]"] == [
        "<s>", "<|system|>", "the", "cat", "<|end|>", "<|user|>", "sat", "<|end|>", "<|assistant|>", "on", "the", "mat",
        "<|end|>", "<|user|>", "[UNK]", "<|end|>", "<|assistant|>"]
    # the completion is the last turn as the template closes it (<|end|>), then the EOS
    completion = [[t for t, lab in zip(row, labels) if lab != -100]
                  for row, labels in zip(tokens[1], batch["labels"].tolist())]
    assert completion == [["ran", "fast", "<|end|>", "</s>"], ["under", "the", "tree", "<|end|>", "</s>"],
                          ["flew", "</s>"]]
    prompts = [row[m.bool()].tolist() for row, m in zip(batch["prompt_input_ids"], batch["prompt_attention_mask"])]
    expect_batch(batch, [(p, [x for x in lab if x != -100]) for p, lab in zip(prompts, batch["labels"].tolist())])


def test_eos_is_added_once(tmp_path):
    tok = chat_tokenizer()
    # a template that closes the assistant's turn with the EOS token itself: nothing more is added
    tok.chat_template = tok.chat_template.replace("<|end|>", "{{ eos_token if m['role'] == 'assistant' else "
                                                             "'<|end|>' }}")
    lines = [{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "dog"}]},
             {"prompt": "the", "completion": "cat </s>"}, {"prompt": "the", "completion": ""}]
    path = write(tmp_path / "d.jsonl", lines)
    labels = next(iter(chat_loader(path, tok, 64, 3, shuffle=False)))["labels"].tolist()
    assert [[x for x in row if x != -100] for row in labels] == [ids(tok, "dog </s>"), ids(tok, "cat </s>"), [EOS]]
    labels = next(iter(chat_loader(path, tok, 64, 3, shuffle=False, add_eos=False)))["labels"].tolist()
    assert [[x for x in row if x != -100] for row in labels] == [ids(tok, "dog </s>"), ids(tok, "cat </s>"), []]


def test_padding_without_a_pad_token(tmp_path):
    path = write(tmp_path / "d.jsonl", [{"prompt": "the cat sat", "completion": "on"},
                                        {"prompt": "a", "completion": "b"}])
    batch = next(iter(chat_loader(path, chat_tokenizer(pad=False), 64, 2, shuffle=False)))
    # the EOS pads (the masks say what is padding)
    assert batch["input_ids"][1].tolist() == [BOS, ids(chat_tokenizer(), "a")[0], 3, EOS, EOS, EOS]
    assert batch["prompt_input_ids"][1].tolist() == [EOS, EOS, BOS, ids(chat_tokenizer(), "a")[0]]
    assert batch["labels"][1].tolist() == [-100, -100, 3, EOS, -100, -100]
    with pytest.raises(ValueError, match=r"tokenizer \(\w+\) has neither a pad token nor an EOS "
                                         r"token to pad chat batches with; set tokenizer.pad_token"):
        chat_loader(path, chat_tokenizer(pad=False, eos=False), 64, 2)


def test_truncation(tmp_path):
    tok = chat_tokenizer()
    path = write(tmp_path / "d.jsonl", [{"prompt": "the cat", "completion": "sat on the mat"},
                                        {"prompt": "a dog ran under the tree", "completion": "fast"}])
    # prompt (BOS + 6 words = 7 tokens) fits in max_length - 1 = 7; the completions are cut to fit 8
    batch = next(iter(chat_loader(path, tok, 8, 2, shuffle=False)))
    expect_batch(batch, [([BOS] + ids(tok, "the cat"), ids(tok, "sat on the mat") + [EOS]),
                         ([BOS] + ids(tok, "a dog ran under the tree"), ids(tok, "fast"))])
    assert batch["input_ids"].shape[1] == 8
    # one token less: the second prompt is too long
    with pytest.raises(ValueError, match=r"d.jsonl:2: the prompt is 7 tokens but max_length=7 leaves it at most 6 "
                                         r"\(one token at least is the completion's\); raise max_length, shorten the "
                                         r"prompt, or cut it from the left with truncate_prompt='left'"):
        chat_loader(path, tok, 7, 2)
    batch = next(iter(chat_loader(path, tok, 7, 2, shuffle=False, truncate_prompt="left")))
    expect_batch(batch, [([BOS] + ids(tok, "the cat"), ids(tok, "sat on the mat")),
                         (ids(tok, "a dog ran under the tree"), ids(tok, "fast"))])  # the BOS is cut first
    with pytest.raises(ValueError, match=r"truncate_prompt must be one of"):
        chat_loader(path, tok, 7, 2, truncate_prompt="right")
    with pytest.raises(ValueError, match=r"max_length must be"):
        chat_loader(path, tok, 1, 2)


@pytest.mark.parametrize("line, message", [
    ("{not json", r"not a JSON object \("),
    ('{"prompt": "a"}', r"expected an object with string 'prompt' and 'completion' \(prompt_field=, "
                        r"completion_field=\) or a 'messages' list \(messages_field=\), got \{prompt: str\}"),
    ('{"prompt": "a", "completion": 3}', r"expected an object .* got \{prompt: str, completion: int\}"),
    ("[1, 2]", r"expected an object .* got \{list\}"),
    ('{"messages": []}', r"'messages' must be a non-empty list of \{'role', 'content'\} objects"),
    ('{"messages": [{"role": "user", "content": ["a"]}, {"role": "assistant", "content": "b"}]}',
     r"messages\[0\] must be an object with string 'role' and 'content', got \{role: str, content: list\}"),
    ('{"messages": [{"role": "assistant", "content": "a"}, {"role": "user", "content": "b"}]}',
     r"the last message of 'messages' must be the assistant's \(it is the completion\), got role 'user'"),
    ('{"messages": [{"role": "assistant", "content": "a"}], "prompt": "b"}',
     r"give either 'messages' or 'prompt' and 'completion', not both"),
    ('{"prompt": "", "completion": "a"}', r"the prompt has no tokens"),
])
def test_a_bad_line_is_named(tmp_path, line, message):
    tok = chat_tokenizer()
    tok.add_bos_token = False
    tok._tokenizer.post_processor = None  # no BOS: an empty prompt is empty
    path = write(tmp_path / "bad.jsonl", [{"prompt": "a", "completion": "b"}, "", line])
    with pytest.raises(ValueError, match=rf"bad.jsonl:3: {message}"):
        chat_loader(path, tok, 16, 2)


def test_file_errors(tmp_path):
    tok = chat_tokenizer()
    with pytest.raises(ValueError, match=r"chat file '.*empty.jsonl' holds no examples"):
        chat_loader(write(tmp_path / "empty.jsonl", ["", "  "]), tok)
    with pytest.raises(FileNotFoundError, match=r"chat file 'missing.jsonl' does not exist"):
        chat_loader("missing.jsonl", tok)
    with pytest.raises(IsADirectoryError, match=r"is a directory; expected a .jsonl file"):
        chat_loader(str(tmp_path), tok)
    with pytest.raises(ValueError, match=r"chat file '.*d.txt': expected a .jsonl file .*, got '.txt'"):
        chat_loader(write(tmp_path / "d.txt", ["a"]), tok)
    (tmp_path / "latin1.jsonl").write_bytes(b'{"prompt": "a", "completion": "b"}\n{"prompt": "caf\xe9"}\n')
    with pytest.raises(ValueError, match=r"latin1.jsonl:2: not UTF-8 text \(byte 0xe9"):
        chat_loader(str(tmp_path / "latin1.jsonl"), tok)
    chat = write(tmp_path / "chat.jsonl", [{"prompt": "a", "completion": "b"}, {"messages": [
        {"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}])
    with pytest.raises(ValueError, match=r"chat.jsonl:2: a 'messages' line needs the tokenizer's chat template, but "
                                         r"\w+ has none: set tokenizer.chat_template"):
        chat_loader(chat, chat_tokenizer(template=False))
    tok.chat_template = "{{ raise_exception('roles must alternate') }}"
    with pytest.raises(ValueError, match=r"chat.jsonl:2: the tokenizer's chat template failed: .*roles must alternate"):
        chat_loader(chat, tok)
    tok.chat_template = ("{% for m in messages %}{{ m['content'] }}{% endfor %}"
                         "{% if add_generation_prompt %}X{% endif %}")
    with pytest.raises(ValueError, match=r"chat.jsonl:2: the chat template's rendering of the conversation does not "
                                         r"start with its rendering of the prompt"):
        chat_loader(chat, tok)


def test_the_order_is_seeded_and_checkpointable(tmp_path):
    tok = chat_tokenizer()
    g = torch.Generator().manual_seed(0)
    path = write(tmp_path / "d.jsonl", [{"prompt": words(g, 1, 3), "completion": str(i)} for i in range(12)])

    def order(loader):
        return [tuple(b["prompt_input_ids"][:, -1].tolist()) for b in loader]

    a, b = chat_loader(path, tok, 16, 4, seed=3), chat_loader(path, tok, 16, 4, seed=3)
    generators = loader_generators(a)
    assert len(generators) == 1  # what checkpoints save
    state = generators[0].get_state()
    first = order(a)
    assert first == order(b) and order(a) != first  # same seed, same order; the next epoch another
    generators[0].set_state(state)
    assert order(a) == first  # restored state, same epoch again


def test_chat_batches_in_a_distiller(tmp_path):
    torch.manual_seed(0)
    tok = chat_tokenizer()
    g = torch.Generator().manual_seed(1)
    path = write(tmp_path / "d.jsonl", [{"prompt": words(g, 1, 5), "completion": words(g, 1, 5)} for _ in range(4)])
    batch = next(iter(chat_loader(path, tok, 32, 4, shuffle=False)))
    teacher, student = llama(2, 32, 4, 2).eval(), llama(1, 16, 4, 1)
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    assert sorted(model_kwargs(student, inputs)) == ["attention_mask", "input_ids"]  # no prompt_* keys
    d = dx.Distiller(teacher, student, [dx.method("lm_kd")], task_weight=1.0)
    losses = d.losses(batch)
    logits = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    # the task loss counts the completion tokens only
    want = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                             batch["labels"][:, 1:].reshape(-1), ignore_index=-100)
    torch.testing.assert_close(losses["task"], want)
    assert torch.isfinite(losses["lm_kd"]) and losses["lm_kd"] > 0
    d.close()


# -- [data.chat] in run configs -----------------------------------------------------------------
def config(**chat):
    return {"output_dir": "out", "data": {"chat": {"train": "d.jsonl", **chat}},
            "teacher": {"pretrained": "t"}, "student": {"config": {}, "epochs": 1}}


def test_data_chat_config(tmp_path):
    cfg = validate(config())
    assert cfg["data"]["chat"] == {"train": "d.jsonl", "prompt_field": "prompt", "completion_field": "completion",
                                   "messages_field": "messages", "max_length": 512, "truncate_prompt": "error",
                                   "add_eos": True, "batch_size": 8, "shuffle": True, "tokenizer": None}
    assert validate(json.loads(json.dumps(cfg))) == cfg  # the resolved config is a config
    for chat, message in [({"max_len": 8}, r"unknown key 'data.chat.max_len' in \[data.chat\] \(did you mean "
                                           r"'max_length'\?\)"),
                          ({"truncate_prompt": "right"}, r"data.chat.truncate_prompt: expected one of"),
                          ({"max_length": 1}, r"data.chat.max_length: expected an integer >= 2"),
                          ({"add_eos": "yes"}, r"data.chat.add_eos: expected a boolean")]:
        with pytest.raises(ConfigError, match=message):
            validate(config(**chat))
    both = config()
    both["data"]["text"] = {"train": "x.txt"}
    with pytest.raises(ConfigError, match=r"data: give exactly one of builder, text, chat, dataset \(got text and chat\)"):
        validate(both)
    path = write(tmp_path / "d.jsonl", [{"prompt": "the", "completion": "cat"}, {"prompt": "a", "completion": "dog"},
                                        {"prompt": "a", "completion": 1}])
    cfg = validate(config(train=path, batch_size=2, shuffle=False, max_length=4, completion_field="answer"))
    with pytest.raises(ConfigError, match=r"data.chat.train: ValueError: .*d.jsonl:1: expected an object with string "
                                          r"'prompt' and 'answer'"):
        build_data(cfg, chat_tokenizer())
    with pytest.raises(ConfigError, match=r"data.chat: the text is tokenized with the teacher's tokenizer: set "
                                          r"teacher.pretrained \(a Hugging Face directory\) or data.chat.tokenizer"):
        build_data(cfg, None)
    write(tmp_path / "d.jsonl", [{"prompt": "the", "answer": "cat sat on"}, {"prompt": "a", "answer": "dog"}])
    train, val = build_data(cfg, chat_tokenizer())
    assert val is None
    tok = chat_tokenizer()
    expect_batch(next(iter(train)), [([BOS] + ids(tok, "the"), ids(tok, "cat sat")),
                                     ([BOS] + ids(tok, "a"), ids(tok, "dog") + [EOS])])


def test_distillx_run_with_data_chat_and_a_padded_student_vocabulary(tmp_path, capsys):
    torch.manual_seed(0)
    llama(2, 32, 4, 2).save_pretrained(tmp_path / "teacher")  # 96 output rows
    chat_tokenizer().save_pretrained(tmp_path / "teacher")  # with its chat template
    g = torch.Generator().manual_seed(0)
    lines = [{"messages": [{"role": "user", "content": words(g, 1, 4)},
                           {"role": "assistant", "content": words(g, 1, 4)}]}
             if i % 2 else {"prompt": words(g, 1, 4), "completion": words(g, 1, 4)} for i in range(8)]
    cfg = {"output_dir": str(tmp_path / "run"), "data": {"chat": {"train": write(tmp_path / "d.jsonl", lines),
                                                                  "max_length": 16, "batch_size": 4}},
           "teacher": {"pretrained": str(tmp_path / "teacher")},
           "student": {"config": {"num_hidden_layers": 1, "vocab_size": 128}, "epochs": 1},  # padded to 128 rows
           "methods": [{"name": "lm_kd", "divergence": "jsd"}]}
    (tmp_path / "run.json").write_text(json.dumps(cfg))
    assert main([str(tmp_path / "run.json"), "--quiet"]) == 0, capsys.readouterr().err
    history = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert history
    student = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "student")
    assert student.lm_head.weight.shape[0] == 128
