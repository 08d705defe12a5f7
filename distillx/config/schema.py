"""The run-config schema: every key, its type, default and meaning, and :func:`validate`.

A config is a TOML or JSON document. :func:`validate` checks it against :data:`SCHEMA` and returns
the *resolved* config: a plain dict holding every key (defaults filled in, integers given for float
keys turned into floats), the same whether the file was TOML or JSON. The resolved config is itself
a valid config (``config.json`` in the output directory can be run again as is).

Errors (all collected, then raised together as one :class:`ConfigError`): an unknown key at any
level names the key and lists the valid keys at that level; a wrong type names the dotted key path
(``teacher.optimizer.lr``, ``methods.0.name``), the expected type and the value; a missing required
key names its dotted path. Values are checked here as far as the schema knows them; the options of
methods, transfers, augmentations and builders are checked by whoever receives them.

Key reference (``*`` = required; paths are dotted, list items by index: ``methods.0.T``)::

    seed = 0                 int >= 0. torch.manual_seed(seed) before the data and the models are
                             built (initial weights, dropout); also the Distiller's augmentation seed.
    output_dir *             string. Where checkpoint.pt, metrics.json, metrics.png, student.pt,
                             teacher.pt (when the teacher was trained) and config.json go; relative
                             paths are relative to the current directory.
    device = "cpu"           string, a torch device ("cpu", "cuda", "cuda:1").
    threads                  int >= 1: torch.set_num_threads for the run (default: leave it as is).

    [data] *                 one of builder, [data.text], [data.chat] or [data.dataset]:
    builder                  "module:callable"; callable(**options) returns {"train": loader, "val":
                             loader or None} or a (train, val) pair. Built-in:
                             "distillx.config.data:digits".
    options = {}             table, keyword arguments of the builder.
    [data.text]              text files tokenized with the teacher's tokenizer (teacher.pretrained):
    text.train *             a UTF-8 .txt (one example per non-empty line) or .jsonl file (one JSON
                             object per line, the text under text.field = "text"); mapping batches
                             without labels (no task loss), no validation loader.
    text.max_length = 128    int >= 1: examples are truncated to this many tokens.
    text.batch_size = 16     int >= 1.
    text.shuffle = true      bool (seeded with seed, so --resume sees the same order).
    text.tokenizer           string: a tokenizer directory instead of teacher.pretrained's.
    [data.chat]              prompt/completion data for causal LMs (distillx.hf.chat), tokenized
                             with the teacher's tokenizer: batches with input_ids, attention_mask,
                             labels (-100 on prompt and padding) and the prompt alone, left-padded
                             (prompt_input_ids, prompt_attention_mask); no validation loader.
    chat.train *             a UTF-8 .jsonl file, one object per line: {"prompt": str, "completion":
                             str} or {"messages": [{"role", "content"}, ...]} (the tokenizer's chat
                             template; the last message, the assistant's, is the completion).
    chat.prompt_field = "prompt", chat.completion_field = "completion", chat.messages_field =
                             "messages": the keys of those lines.
    chat.max_length = 512    int >= 2: prompt + completion tokens; the completion is cut to fit.
    chat.truncate_prompt = "error"  "error" (a prompt over max_length - 1 tokens is an error naming
                             its line) or "left" (such a prompt is cut from the left).
    chat.add_eos = true      bool: append the tokenizer's EOS token to a completion without it.
    chat.batch_size = 8      int >= 1.
    chat.shuffle = true      bool (seeded with seed, so --resume sees the same order).
    chat.tokenizer           string: a tokenizer directory instead of teacher.pretrained's.
    [data.dataset]           a local `datasets` source (the datasets extra), never the Hub, tokenized
                             as [data.text] is:
    dataset.path *           "json", "parquet", "csv", "text" or "arrow" (datasets.load_dataset with
                             data_files), or a directory written by save_to_disk (load_from_disk).
    dataset.data_files       a local file, an array of them, or a table of split -> file(s); only
                             with a file builder path.
    dataset.split = "train"  string: the split to train on.
    dataset.text_field = "text"  string: the column holding the text.
    dataset.max_length, dataset.batch_size, dataset.shuffle, dataset.tokenizer   as in [data.text].

    [teacher] *              one of builder or pretrained:
    builder                  "module:callable"; callable(**options) returns the teacher nn.Module.
    options = {}             table, keyword arguments of the builder.
    pretrained               string: a Hugging Face model directory (save_pretrained), loaded as the
                             class its config.json names (needs the hf extra: pip install 'distillx[hf]').
    checkpoint               string: a state dict file loaded into the built teacher
                             (torch.load(weights_only=True); a {"state_dict": ...} or {"model": ...}
                             wrapper is accepted).
    epochs = 0               int >= 0: epochs of the teacher phase (task loss only); 0 = the teacher
                             is used as built/loaded.
    optimizer                table, see [*.optimizer] below.
    scheduler                table, see [*.scheduler] below.

    [student] *              one of builder, pretrained or config:
    builder, options         as for the teacher.
    pretrained               string: a Hugging Face model directory (the student's own weights).
    config                   table: the teacher's class and config with these overrides
                             ({num_hidden_layers = 2, hidden_size = 256, ...}), randomly initialised
                             (a [transfer] such as layer_map or select then initialises it).
                             A Hugging Face student is written with save_pretrained into
                             output_dir/student/ (with the tokenizer) instead of student.pt.
    epochs *                 int >= 1: distillation epochs.
    optimizer, scheduler     tables, see below.
    task_weight = 1.0        float >= 0: weight of the task (cross-entropy) loss; 0 = pure distillation.
    input                    "teacher:PATH": a student that consumes the teacher's feature at PATH
                             (a layer path, "PATH@input", "penultimate") instead of the data
                             (Distiller(student_input=PATH)); the run then also writes composed.pt,
                             the teacher's trunk up to PATH and the student (distillx.load_composed).

    [teacher.optimizer] / [student.optimizer]
    name = "adamw"           "adamw", "adam" or "sgd".
    lr = 0.001               float > 0.
    weight_decay             float >= 0; default PyTorch's: 0.01 for adamw, 0.0 for adam and sgd.
    betas = [0.9, 0.999]     two floats in [0, 1); adam and adamw only.
    momentum = 0.0           float in [0, 1); sgd only.
    nesterov = false         bool (needs momentum > 0); sgd only.

    [teacher.scheduler] / [student.scheduler]   (the learning rate, per optimizer step)
    name = "cosine"          "cosine" (warm-up, then cosine decay to 0), "linear" (warm-up, then
                             linear decay to 0), "constant" (warm-up, then flat) or "none" (no
                             scheduler; warmup is ignored).
    warmup = 0.05            int >= 0 (steps) or float in [0, 1) (fraction of all steps).

    [[methods]]              array of tables, default []: the distillation losses, in order.
    name *                   a registered method ("kd", "at", ...; distillx plugins lists them).
    (any other key)          an option of the method (dx.method(name, **options)), e.g. T, weight,
                             student, teacher (feature layer paths).

    [transfer]               optional table: initialise the student from the teacher's weights.
    name *                   a registered weight transfer ("select", "direct", ...).
    (any other key)          an option of the strategy (dx.transfer(name, **options)).
    calibration              for the strategies that look at data (prune, layer_map with
                             map = "auto", head_fit): "train" or "val", the run's own data, read in
                             order without shuffling (the training order is not disturbed); with
                             max_batches = N to bound it.

    [[augmentations]]        optional array, default []: applied in order to every training batch.
    name *                   a registered augmentation ("random_crop", "flip", "noise", "mixup", ...).
    (any other key)          an option of the augmentation. A plain string is short for {name = ...}.

    [weight_schedules]       optional table: loss term ("task" or a method's key: its name, "kd#2"
                             for a second "kd") -> a schedule replacing that term's weight:
    <term>.kind = "linear"   the only kind: start + (end - start) * min(epoch / epochs, 1), at the
                             fractional epoch.
    <term>.start *           float >= 0.
    <term>.end *             float >= 0.
    <term>.epochs *          float > 0.

    [training]               optional Distiller settings
    amp                      "bf16" (CPU or CUDA) or "fp16" (CUDA); default: off.
    grad_clip                float > 0: clip the gradient norm; default: off.
    cache_teacher = false    bool: compute the teacher's outputs once over the training set.
    cache_dtype = "float16"  "float16" or "float32": storage of the teacher cache.
    cache_top_k              int >= 1: keep only the k largest teacher logits in the cache.
    progress                 bool: progress bars on/off; default: on when stderr is a terminal.
                             (``distillx run --quiet`` or DISTILLX_QUIET=1 turn them off.)
    strategy = "ddp"         "ddp" or "fsdp": how the student is spread over the processes of
                             ``torchrun ... distillx run`` (replicated, or sharded with FSDP2).
    shard_teacher = false    bool: with strategy "fsdp", shard the teacher too.
    balance                  "auto": loss terms that balance themselves (Distiller(balance="auto"),
                             distillx.engine.balance): every balance_every steps the auxiliary terms
                             are reweighted by how their gradients align with the primary term's;
                             default: off (the fixed weights as given).
    balance_primary          string: the primary term, "task" or a method's key ("kd", "kd#2");
                             default: the first method (the task term when there is none).
    balance_every            int >= 1: steps between two measurements; default 10 x (terms - 1),
                             so at most one extra backward pass per 10 steps.

    [logging]                optional: where the step and epoch metrics go besides metrics.json (rank 0)
    loggers = []             array of registered logger names or tables {name = ..., <options>}:
                             "tensorboard" writes TensorBoard scalars into output_dir/tensorboard
                             (the tensorboard extra; option log_dir = "DIR" elsewhere); plugins
                             register more (distillx plugins lists them).

In JSON, ``null`` is accepted for the keys whose default is "off"/unset (threads, checkpoint,
transfer, amp, grad_clip, cache_top_k, progress, balance, balance_primary, balance_every).
"""
from __future__ import annotations

from typing import Any, Callable, Optional

import torch

from .specs import (AnyTable, Bool, ConfigError, Float, Int, Key, ListOf, MapOf, OneOf, Spec, Str, Table, Warmup,
                    _join, describe)

__all__ = ["ConfigError", "SCHEMA", "validate", "check_path", "key_paths", "describe"]


# -- the schema ------------------------------------------------------------------------------------
OPTIMIZERS = ("adamw", "adam", "sgd")
SCHEDULERS = ("cosine", "linear", "constant", "none")
_BUILDER = r"[A-Za-z_][\w.]*:[A-Za-z_][\w.]*"


def _check_device(text: str) -> Optional[str]:
    try:
        torch.device(text)
    except (RuntimeError, ValueError):
        return f"expected a torch device such as 'cpu', 'cuda' or 'cuda:1', got {text!r}"
    return None


def _optimizer_post(out: dict, given: dict, path: str, errors: list) -> None:
    name = out.get("name")
    only = {"betas": ("adam", "adamw"), "momentum": ("sgd",), "nesterov": ("sgd",)}
    for key, names in only.items():
        if name in OPTIMIZERS and name not in names:
            if key in given:
                errors.append(f"{_join(path, key)}: applies to {' and '.join(names)} only, not {name!r}")
            out.pop(key, None)
    if name in OPTIMIZERS and "weight_decay" not in given:
        out["weight_decay"] = 0.01 if name == "adamw" else 0.0
    if name == "sgd" and out.get("nesterov") and not (out.get("momentum") or 0) > 0:
        errors.append(f"{_join(path, 'nesterov')}: needs momentum > 0")


class Betas(Spec):
    expected = "an array of two floats in [0, 1)"

    def resolve(self, value, path, errors):
        item = Float(0.0, maximum=1.0, exclusive_max=True)
        if not isinstance(value, list) or len(value) != 2 or not all(item.check(v) for v in value):
            self.fail(value, path, errors)
            return None
        return [float(v) for v in value]


class DataFiles(Spec):
    expected = "a path, an array of paths or a table of split -> path(s)"

    def resolve(self, value, path, errors):
        def paths(v):
            return (isinstance(v, str) and bool(v)) or (isinstance(v, list) and bool(v) and
                                                        all(isinstance(x, str) and x for x in v))
        if paths(value) or (isinstance(value, dict) and value and all(paths(v) for v in value.values())):
            return value
        self.fail(value, path, errors)
        return None


def _optimizer(default_lr: float = 1e-3) -> Table:
    return Table({
        "name": Key(Str(OPTIMIZERS), default="adamw", doc="adamw, adam or sgd"),
        "lr": Key(Float(0.0, exclusive_min=True), default=default_lr, doc="learning rate"),
        "weight_decay": Key(Float(0.0), default=None, doc="0.01 for adamw, else 0"),
        "betas": Key(Betas(), default=[0.9, 0.999], doc="adam/adamw"),
        "momentum": Key(Float(0.0, maximum=1.0, exclusive_max=True), default=0.0, doc="sgd"),
        "nesterov": Key(Bool(), default=False, doc="sgd"),
    }, expected="a table (name, lr, weight_decay, betas, momentum, nesterov)", post=_optimizer_post)


def _scheduler() -> Table:
    return Table({
        "name": Key(Str(SCHEDULERS), default="cosine"),
        "warmup": Key(Warmup(), default=0.05),
    }, expected="a table (name, warmup)")


def _named(kind: str, example: str) -> Table:
    return Table({"name": Key(Str(), required=True, doc=f"the registered {kind}, e.g. {example}")},
                 expected=f"a table with name = <{kind}> and its options", open=True)


def _one_source(names: tuple) -> Callable:
    def post(out: dict, given: dict, path: str, errors: list) -> None:
        chosen = [n for n in names if given.get(n) is not None]  # given (a bad value is reported on its own)
        if len(chosen) != 1:
            what = "none" if not chosen else " and ".join(chosen)
            errors.append(f"{path}: give exactly one of {', '.join(names)} (got {what})")
    return post


def _model(student: bool) -> Table:
    keys = {
        "builder": Key(Str(pattern=_BUILDER, what='"module:callable" (e.g. "distillx.demo:mlp")'), nullable=True,
                       doc='"module:callable" returning an nn.Module'),
        "options": Key(AnyTable(), default={}),
        "pretrained": Key(Str(), nullable=True, doc="a Hugging Face model directory"),
    }
    if student:
        keys["config"] = Key(AnyTable(), nullable=True, doc="overrides of the teacher's config")
    else:
        keys["checkpoint"] = Key(Str(), nullable=True)
    keys["epochs"] = (Key(Int(1), required=True, doc="distillation epochs, an integer >= 1") if student
                      else Key(Int(0), default=0))
    keys["optimizer"] = Key(_optimizer(), default=lambda t: _default_of(_optimizer()))
    keys["scheduler"] = Key(_scheduler(), default=lambda t: _default_of(_scheduler()))
    if student:
        keys["task_weight"] = Key(Float(0.0), default=1.0)
        keys["input"] = Key(Str(pattern=r"teacher:\S+", what='"teacher:PATH" (a teacher layer path, e.g. '
                                                           '"teacher:layer3")'), nullable=True)
    sources = ("builder", "pretrained", "config") if student else ("builder", "pretrained")
    return Table(keys, expected="a table", post=_one_source(sources))


def _default_of(table: Table) -> dict:
    errors: list = []
    out = table.resolve({}, "", errors)
    assert not errors, errors
    return out


SCHEMA = Table({
    "seed": Key(Int(0), default=0),
    "output_dir": Key(Str(), required=True, doc="where checkpoints, metrics and the final student go"),
    "device": Key(Str(check=_check_device, what="a torch device string"), default="cpu"),
    "threads": Key(Int(1), nullable=True),
    "data": Key(Table({
        "builder": Key(Str(pattern=_BUILDER, what='"module:callable" (e.g. "distillx.config.data:digits")'),
                       nullable=True, doc='"module:callable" returning {"train": loader, "val": loader}'),
        "options": Key(AnyTable(), default={}),
        "text": Key(Table({
            "train": Key(Str(), required=True, doc="a UTF-8 .txt or .jsonl file"),
            "field": Key(Str(), default="text"),
            "max_length": Key(Int(1), default=128),
            "batch_size": Key(Int(1), default=16),
            "shuffle": Key(Bool(), default=True),
            "tokenizer": Key(Str(), nullable=True),
        }, expected="a table (train, field, max_length, batch_size, shuffle, tokenizer)"), nullable=True),
        "chat": Key(Table({
            "train": Key(Str(), required=True, doc="a UTF-8 .jsonl file of prompt/completion or messages lines"),
            "prompt_field": Key(Str(), default="prompt"),
            "completion_field": Key(Str(), default="completion"),
            "messages_field": Key(Str(), default="messages"),
            "max_length": Key(Int(2), default=512),
            "truncate_prompt": Key(Str(("error", "left")), default="error"),
            "add_eos": Key(Bool(), default=True),
            "batch_size": Key(Int(1), default=8),
            "shuffle": Key(Bool(), default=True),
            "tokenizer": Key(Str(), nullable=True),
        }, expected="a table (train, prompt_field, completion_field, messages_field, max_length, truncate_prompt, "
                    "add_eos, batch_size, shuffle, tokenizer)"), nullable=True),
        "dataset": Key(Table({
            "path": Key(Str(), required=True, doc='"json", "parquet", "csv", "text", "arrow" or a save_to_disk directory'),
            "data_files": Key(DataFiles(), nullable=True),
            "split": Key(Str(), default="train"),
            "text_field": Key(Str(), default="text"),
            "max_length": Key(Int(1), default=128),
            "batch_size": Key(Int(1), default=16),
            "shuffle": Key(Bool(), default=True),
            "tokenizer": Key(Str(), nullable=True),
        }, expected="a table (path, data_files, split, text_field, max_length, batch_size, shuffle, tokenizer)"),
            nullable=True),
    }, post=_one_source(("builder", "text", "chat", "dataset"))), required=True,
        doc='a table: [data] with builder = "module:callable", a [data.text], [data.chat] or [data.dataset] table'),
    "teacher": Key(_model(False), required=True,
                   doc='a table: [teacher] with builder = "module:callable" or pretrained = "DIR"'),
    "student": Key(_model(True), required=True,
                   doc='a table: [student] with builder, pretrained or config, and epochs'),
    "methods": Key(ListOf(_named("method", "kd"), "an array of tables ([[methods]] with name and options)"),
                   default=[]),
    "transfer": Key(_named("weight transfer", "select"), nullable=True),
    "augmentations": Key(ListOf(OneOf(_named("augmentation", "flip"), "an augmentation name or a table with name "
                                      "and options"),
                                "an array of augmentations ([[augmentations]] with name and options)"), default=[]),
    "weight_schedules": Key(MapOf(Table({
        "kind": Key(Str(("linear",)), default="linear"),
        "start": Key(Float(0.0), required=True),
        "end": Key(Float(0.0), required=True),
        "epochs": Key(Float(0.0, exclusive_min=True), required=True),
    }, expected="a table (kind, start, end, epochs)"), "a table of loss term -> {kind, start, end, epochs}"),
        default={}),
    "training": Key(Table({
        "amp": Key(Str(("bf16", "fp16")), nullable=True),
        "grad_clip": Key(Float(0.0, exclusive_min=True), nullable=True),
        "cache_teacher": Key(Bool(), default=False),
        "cache_dtype": Key(Str(("float16", "float32")), default="float16"),
        "cache_top_k": Key(Int(1), nullable=True),
        "progress": Key(Bool(), nullable=True),
        "strategy": Key(Str(("ddp", "fsdp")), default="ddp"),
        "shard_teacher": Key(Bool(), default=False),
        "balance": Key(Str(("auto",)), nullable=True),
        "balance_primary": Key(Str(), nullable=True),
        "balance_every": Key(Int(1), nullable=True),
    }), default=lambda t: _default_of(SCHEMA.keys["training"].spec)),
    "logging": Key(Table({
        "loggers": Key(ListOf(OneOf(_named("logger", "tensorboard"), "a logger name or a table with name and options"),
                              "an array of loggers (names, or tables with name and options)"), default=[]),
    }, expected="a table (loggers)"), default=lambda t: _default_of(SCHEMA.keys["logging"].spec)),
})
"""The whole schema (see the module docstring for every key)."""


def validate(raw: Any, source: Optional[str] = None) -> dict:
    """Check ``raw`` (a parsed TOML/JSON document) against :data:`SCHEMA`; return the resolved config.

    Raises :class:`ConfigError` listing every problem found (``source`` prefixes the message).
    """
    errors: list = []
    if not isinstance(raw, dict):
        raise ConfigError(f"the config must be a table (a JSON object), got {describe(raw)}", source)
    out = SCHEMA.resolve(raw, "", errors)
    if errors:
        raise ConfigError(errors, source)
    return out


def check_path(parts: list, raw: dict) -> None:
    """Raise :class:`ConfigError` unless the dotted path ``parts`` names a key the schema allows
    (used by ``--set``; list indices are checked against ``raw``'s lists by the caller)."""
    spec: Optional[Spec] = SCHEMA
    path = ""
    for part in parts:
        if spec is None:  # below a free-form table: anything goes
            return
        if isinstance(spec, ListOf) and not str(part).isdigit():
            raise ConfigError(f"{path} is an array: index it with a number ({path}.0), not {part!r}")
        spec = spec.child(str(part), path)
        path = _join(path, part)


def key_paths(spec: Spec = SCHEMA, path: str = "") -> list:
    """Every documented key path of the schema (``teacher.optimizer.lr``, ``methods.N.name``...)."""
    out = []
    if isinstance(spec, Table):
        for name, key in spec.keys.items():
            sub = _join(path, name)
            out.append(sub)
            out.extend(key_paths(key.spec, sub))
    elif isinstance(spec, ListOf):
        out.extend(key_paths(spec.item, _join(path, "N")))
    elif isinstance(spec, OneOf):
        out.extend(key_paths(spec.table, path))
    elif isinstance(spec, MapOf):
        out.extend(key_paths(spec.value, _join(path, "TERM")))
    return out
