"""Run configs: a whole distillation described in one TOML or JSON file, run by ``distillx run``.

Quick start::

    distillx run digits                                   # the bundled example (distillx/configs/digits.toml)
    distillx run digits --print-config                    # its resolved config, every default filled in
    distillx run my.toml --set student.epochs=5 --set methods.0.T=4 --set output_dir=runs/t4
    distillx run my.toml --resume                         # continue from output_dir/checkpoint.pt

What a run does (:mod:`distillx.config.execute`): ``torch.manual_seed(seed)``; build the data, the
teacher (optionally loading ``teacher.checkpoint``) and the student from ``"module:callable"``
builders (or Hugging Face directories); ``Distiller(...).fit(train, student.epochs, val,
teacher_epochs=teacher.epochs)`` with a
checkpoint after every epoch in ``output_dir``; then write ``metrics.json``, ``metrics.png``,
``student.pt`` (state dict; ``teacher.pt`` too when the teacher was trained) and print the teacher's
and the student's validation accuracy. ``config.json`` holds the resolved config of the run and can
be run again as is. Relative paths (``output_dir``, ``teacher.checkpoint``) are relative to the
current directory.

A config with every key (``*`` required; the rest show their defaults or are off when left out)::

    seed = 0                            # torch.manual_seed before building data and models
    output_dir = "runs/digits"          # * checkpoint.pt, config.json, metrics.json/.png, student.pt, teacher.pt
    device = "cpu"                      # a torch device string
    threads = 1                         # torch.set_num_threads for the run (left as is when unset)

    [data]                              # *
    builder = "distillx.config.data:digits"   # * "module:callable"(**options) -> {"train": loader, "val": loader|None}
    options = { batch_size = 64, test_fraction = 0.25, seed = 0 }

    [teacher]                           # *
    builder = "distillx.demo:mlp"       # * "module:callable"(**options) -> nn.Module
    options = { widths = [64, 256, 256, 10], dropout = 0.5 }
    checkpoint = "teacher.pt"           # a state dict to load (weights_only=True)
    epochs = 20                         # teacher phase (task loss); 0 = use the teacher as given
    optimizer = { name = "adamw", lr = 1e-3, weight_decay = 0.01, betas = [0.9, 0.999] }
    scheduler = { name = "cosine", warmup = 0.05 }

    [student]                           # *
    builder = "distillx.demo:mlp"       # *
    options = { widths = [64, 32, 10] }
    epochs = 40                         # * distillation epochs
    optimizer = { name = "sgd", lr = 0.1, weight_decay = 0.0, momentum = 0.9, nesterov = true }
    scheduler = { name = "constant", warmup = 0 }
    task_weight = 0.0                   # weight of the task loss (default 1.0)
    # input = "teacher:4"               # a head on the teacher's feature at layer 4 (writes composed.pt too)

    [[methods]]                         # name + the method's options: dx.method(name, **options)
    name = "kd"
    T = 2.0
    weight = 1.0

    [transfer]                          # name + the strategy's options: dx.transfer(name, **options)
    name = "select"

    [[augmentations]]                   # name + options (distillx.plugin.resolve_augmentation); or a plain name
    name = "noise"
    std = 0.05

    [weight_schedules]                  # loss term ("task" or a method's key) -> a linear ramp
    kd = { kind = "linear", start = 0.0, end = 1.0, epochs = 5 }

    [training]                          # Distiller settings
    amp = "bf16"                        # "bf16" or "fp16"; off when unset
    grad_clip = 1.0                     # off when unset
    cache_teacher = false
    cache_dtype = "float16"
    cache_top_k = 5                     # off when unset
    progress = true                     # default: on when stderr is a terminal
    strategy = "ddp"                    # under torchrun: "ddp" (replicated student) or "fsdp" (sharded)
    shard_teacher = false               # with "fsdp": shard the teacher too
    balance = "auto"                    # loss terms that balance themselves; off when unset
    balance_primary = "kd"              # the primary term (default: the first method)
    balance_every = 10                  # steps between measurements (default 10 x (terms - 1))

    [logging]                           # where the metrics go besides metrics.json (rank 0 only)
    loggers = ["tensorboard"]           # names or {name = ..., options}: output_dir/tensorboard event files

Optimizer names: ``adamw``/``adam`` (``lr``, ``weight_decay``, ``betas``) and ``sgd`` (``lr``,
``weight_decay``, ``momentum``, ``nesterov``); ``weight_decay`` defaults to PyTorch's (0.01 for
adamw, else 0). Scheduler names: ``cosine``, ``linear``, ``constant``, ``none``; ``warmup`` is a
number of steps (int) or a fraction of all steps (float < 1). The full key reference, with types
and bounds, is in :mod:`distillx.config.schema`.

Checks: an unknown key at any level is an error listing the valid keys at that level; a wrong type
names the dotted key path (``teacher.optimizer.lr``), the expected type and the value; missing
required keys are named. Options of methods, transfers, augmentations and builders are checked by
their receivers, and their errors name the config key (``methods.0 ('kd'): ...``). ``distillx run``
prints ``distillx run: <message>`` and exits with 2 for such mistakes, 3 when a loss becomes NaN/inf
(the last checkpoint is kept), 1 when training fails otherwise.

Hugging Face models (the ``hf`` extra): ``[teacher] pretrained = "DIR"`` loads a model directory;
the student is ``pretrained = "DIR"`` too, or ``config = {num_hidden_layers = 2, ...}`` (the
teacher's class and config with these overrides, randomly initialised: add a ``[transfer]``);
``[data.text]`` reads ``train = "corpus.txt"`` (or ``.jsonl`` with ``field``) and tokenizes it with
the teacher's tokenizer (``max_length``, ``batch_size``, ``shuffle``, ``tokenizer``);
``[data.chat]`` reads prompt/completion data for causal LMs, ``train = "chat.jsonl"`` with
``{"prompt", "completion"}`` or ``{"messages": [...]}`` lines (the tokenizer's chat template), into
batches whose ``labels`` hold only the completion and with the prompt alone, left-padded, for
generation (``max_length``, ``truncate_prompt``, ``add_eos``, ``prompt_field``,
``completion_field``, ``messages_field``, ``batch_size``, ``shuffle``, ``tokenizer``;
:mod:`distillx.hf.chat` has the rules).
``[data.dataset]`` takes a local ``datasets`` source instead (the ``datasets`` extra, never the Hub):
``path = "json"`` (or ``"parquet"``, ``"csv"``, ``"text"``, ``"arrow"``) with ``data_files``, or a
``save_to_disk`` directory, and ``split``, ``text_field``, tokenized the same way. Such a
student is written with ``save_pretrained`` into ``output_dir/student/``, with the tokenizer::

    output_dir = "runs/mini"
    [data.text]
    train = "corpus.txt"
    max_length = 128
    [teacher]
    pretrained = "models/bert-base"
    [student]
    config = { num_hidden_layers = 4 }
    epochs = 3
    task_weight = 0.0
    [[methods]]
    name = "minilmv2"
    [transfer]
    name = "layer_map"

From Python::

    from distillx.config import load, build
    cfg = load("digits", overrides=["student.epochs=5"])      # resolved config (a dict)
    run = build(cfg)                                          # .train, .val, .teacher, .student, .distiller
    run.distiller.fit(run.train, cfg["student"]["epochs"], run.val, teacher_epochs=cfg["teacher"]["epochs"])
"""
from __future__ import annotations

from .build import Run, build
from .execute import execute
from .files import load
from .schema import SCHEMA, ConfigError, validate

__all__ = ["ConfigError", "SCHEMA", "validate", "load", "build", "Run", "execute"]
