"""Turn a resolved config (:func:`distillx.config.schema.validate`) into the objects of a run.

Every user mistake found here (a builder that cannot be imported or rejects its options, a loader
that is empty, a teacher checkpoint that does not load, a method/transfer/augmentation option the
plugin refuses, Distiller settings that do not go together) raises :class:`ConfigError` naming the
config key it comes from.
"""
from __future__ import annotations

import importlib
import os
from collections.abc import Iterable, Mapping
from typing import Any, Callable, NamedTuple, Optional

import torch
from torch import nn
from torch.utils.data import DataLoader
from torch.utils.data._utils.collate import default_collate, default_convert

from ..distiller import Distiller
from ..engine.checkpoint import CheckpointError, check_state_dict
from ..engine.schedules import linear
from ..hf.pretrained import load_pretrained, load_tokenizer, student_from_config
from ..hf.datasets_local import dataset_texts
from ..hf.text import chat_loader, text_loader, texts_loader
from ..plugin import get_registries, method, resolve_augmentation, transfer
from .schema import ConfigError, describe


class Run(NamedTuple):
    """What :func:`build` makes from a config (``tokenizer``: the Hugging Face tokenizer of
    ``teacher.pretrained``, ``data.text.tokenizer`` or ``data.chat.tokenizer``, else None)."""

    train: Iterable
    val: Optional[Iterable]
    teacher: nn.Module
    student: nn.Module
    distiller: Any  # distillx.Distiller
    tokenizer: Any = None


def _message(exc: BaseException) -> str:
    # KeyError's str() quotes its argument; the registries' errors are KeyErrors with a sentence.
    if (isinstance(exc, KeyError) and len(exc.args) == 1 and isinstance(exc.args[0], str)
            and type(exc).__str__ is KeyError.__str__):
        return exc.args[0]
    return str(exc)


def import_object(spec: str, key: str) -> Callable:
    """The callable named by ``"module:attr.path"`` (config key ``key``)."""
    module_name, _, attr = spec.partition(":")
    try:
        obj = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigError(f"{key}: cannot import module {module_name!r} of {spec!r}: {exc}") from exc
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise ConfigError(f"{key}: module {module_name!r} has no attribute {attr!r} ({spec!r})") from None
    if not callable(obj):
        raise ConfigError(f"{key}: {spec!r} is a {type(obj).__name__}, not a callable")
    return obj


def call_builder(section: dict, key: str) -> Any:
    """Call ``section["builder"](**section["options"])``; a TypeError/ValueError is a config error."""
    fn = import_object(section["builder"], f"{key}.builder")
    try:
        return fn(**section["options"])
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{key}: {section['builder']}(**{key}.options) failed: {type(exc).__name__}: "
                          f"{_message(exc)}") from exc


def _check_loader(loader: Any, which: str, builder: str) -> None:
    if not isinstance(loader, Iterable):
        raise ConfigError(f"data: the {which} loader of {builder!r} is {describe(loader)}, not an iterable of "
                          "(inputs, targets) batches")
    try:
        empty = len(loader) == 0  # type: ignore[arg-type]
    except TypeError:
        return  # no length: the Distiller notices emptiness when it iterates
    if empty:
        raise ConfigError(f"data: the {which} loader of {builder!r} is empty: it yields no batches "
                          "(check data.options: the data set may be empty or smaller than one batch with drop_last)")


def _hf(call: Callable, key: str, *args, **kwargs) -> Any:
    """``call(*args, **kwargs)`` of a Hugging Face helper, its mistakes as ConfigErrors naming ``key``."""
    try:
        return call(*args, **kwargs)
    except ImportError as exc:
        raise ConfigError(f"{key}: {exc}") from exc
    except (OSError, ValueError, TypeError, KeyError) as exc:
        raise ConfigError(f"{key}: {type(exc).__name__}: {_message(exc)}") from exc


def load_tokenizer_for(cfg: dict) -> Any:
    """The tokenizer of ``data.text.tokenizer``/``data.chat.tokenizer``/``data.dataset.tokenizer`` or
    ``teacher.pretrained`` (None when none is set)."""
    for section in ("text", "chat", "dataset"):
        table = cfg["data"].get(section) or {}
        if table.get("tokenizer"):
            key = f"data.{section}.tokenizer"
            return _hf(load_tokenizer, key, table["tokenizer"], key)
    if cfg["teacher"].get("pretrained"):
        return _hf(load_tokenizer, "teacher.pretrained", cfg["teacher"]["pretrained"], "teacher.pretrained")
    return None


def build_data(cfg: dict, tokenizer: Any = None) -> tuple[Iterable, Optional[Iterable]]:
    """``(train, val)`` from ``[data]``: a builder's loaders, or ``[data.text]``/``[data.chat]``/
    ``[data.dataset]`` tokenized (no val)."""
    for section in ("text", "chat", "dataset"):
        table = cfg["data"].get(section)
        if table is not None and tokenizer is None:
            raise ConfigError(f"data.{section}: the text is tokenized with the teacher's tokenizer: set "
                              f"teacher.pretrained (a Hugging Face directory) or data.{section}.tokenizer")
    text, chat = cfg["data"].get("text"), cfg["data"].get("chat")
    if text is not None:
        train = _hf(text_loader, "data.text.train", text["train"], tokenizer, max_length=text["max_length"],
                    batch_size=text["batch_size"], field=text["field"], shuffle=text["shuffle"], seed=cfg["seed"])
        return train, None
    if chat is not None:
        options = {k: chat[k] for k in ("max_length", "batch_size", "shuffle", "truncate_prompt", "add_eos",
                                        "prompt_field", "completion_field", "messages_field")}
        return _hf(chat_loader, "data.chat.train", chat["train"], tokenizer, seed=cfg["seed"], **options), None
    dataset = cfg["data"].get("dataset")
    if dataset is not None:
        texts = _hf(dataset_texts, "data.dataset", dataset["path"], dataset["data_files"], dataset["split"],
                    dataset["text_field"])
        train = _hf(texts_loader, "data.dataset", texts, tokenizer, max_length=dataset["max_length"],
                    batch_size=dataset["batch_size"], shuffle=dataset["shuffle"], seed=cfg["seed"])
        return train, None
    builder = cfg["data"]["builder"]
    result = call_builder(cfg["data"], "data")
    if isinstance(result, Mapping):
        extra = sorted(set(result) - {"train", "val"})
        if extra or "train" not in result:
            raise ConfigError(f"data: {builder!r} must return {{'train': loader, 'val': loader or None}}, got a "
                              f"mapping with keys {sorted(result)}")
        train, val = result["train"], result.get("val")
    elif isinstance(result, (tuple, list)) and len(result) == 2:
        train, val = result
    else:
        raise ConfigError(f"data: {builder!r} must return {{'train': loader, 'val': loader or None}} or a "
                          f"(train, val) pair, got {type(result).__name__}")
    _check_loader(train, "train", builder)
    if val is not None:
        _check_loader(val, "val", builder)
    return train, val


def build_model(section: dict, key: str, teacher: Optional[nn.Module] = None) -> nn.Module:
    """The model of a ``[teacher]``/``[student]`` table: a builder's, a Hugging Face directory's
    (``pretrained``), or the teacher's class with its config overridden (``config``)."""
    if section.get("pretrained"):
        return _hf(load_pretrained, f"{key}.pretrained", section["pretrained"], f"{key}.pretrained")
    if section.get("config") is not None:
        return _hf(student_from_config, f"{key}.config", teacher, section["config"], f"{key}.config")
    model = call_builder(section, key)
    if not isinstance(model, nn.Module):
        raise ConfigError(f"{key}: {section['builder']!r} returned {type(model).__name__}, not a torch.nn.Module")
    return model


def load_state_dict_file(model: nn.Module, file: str, key: str) -> None:
    """Load the state dict in ``file`` (``weights_only=True``) into ``model``; ConfigError naming
    ``file`` and what does not match otherwise."""
    if not os.path.isfile(file):
        raise ConfigError(f"{key}: {file!r} does not exist" + (" (it is a directory)" if os.path.isdir(file) else ""))
    try:
        obj = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as exc:  # not a torch file, truncated, or a pickled whole model
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise ConfigError(f"{key}: {file!r} does not load as a state dict with torch.load(weights_only=True) "
                          f"({type(exc).__name__}: {first[:300]}); save it with "
                          "torch.save(model.state_dict(), path)") from exc
    state = obj
    if isinstance(obj, Mapping):
        for wrapper in ("state_dict", "model"):
            if isinstance(obj.get(wrapper), Mapping):
                state = obj[wrapper]
                break
    if not isinstance(state, Mapping) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ConfigError(f"{key}: {file!r} holds a {type(obj).__name__} that is not a state dict (a mapping of "
                          "parameter names to tensors)")
    try:
        check_state_dict(dict(state), model, "teacher built by teacher.builder", file)
        model.load_state_dict(state)
    except (CheckpointError, RuntimeError) as exc:
        raise ConfigError(f"{key}: {exc}") from exc


def optimizer_factory(opt: dict) -> Callable[[list], torch.optim.Optimizer]:
    """A factory ``params -> Optimizer`` for a resolved ``optimizer`` table."""
    name = opt["name"]
    kwargs: dict = {"lr": opt["lr"], "weight_decay": opt["weight_decay"]}
    if name == "sgd":
        cls = torch.optim.SGD
        kwargs.update(momentum=opt["momentum"], nesterov=opt["nesterov"])
    else:
        cls = torch.optim.AdamW if name == "adamw" else torch.optim.Adam
        kwargs["betas"] = tuple(opt["betas"])

    def factory(params):
        return cls(params, **kwargs)

    factory.__qualname__ = f"{cls.__name__}({', '.join(f'{k}={v!r}' for k, v in kwargs.items())})"
    return factory


def scheduler_args(sched: dict) -> tuple[Optional[str], Any]:
    return (None if sched["name"] == "none" else sched["name"]), sched["warmup"]


def _split_named(table: dict) -> tuple[str, dict]:
    options = dict(table)
    return options.pop("name"), options


def build_methods(cfg: dict) -> list:
    methods = []
    for i, entry in enumerate(cfg["methods"]):
        name, options = _split_named(entry)
        try:
            methods.append(method(name, **options))
        except (TypeError, ValueError, KeyError) as exc:
            raise ConfigError(f"methods.{i} ({name!r}): {_message(exc)}") from exc
    return methods


def calibration_loader(loader: Any) -> DataLoader:
    """The run's ``loader`` read in order, with its batch size and collate function, so that a
    calibration pass draws nothing from the training loader's random state."""
    if not isinstance(loader, DataLoader):
        return loader
    batch_size, collate = loader.batch_size, loader.collate_fn
    if batch_size is None:  # a batch sampler given as the sampler (distillx.data.tensor_loader)
        batch_size = getattr(loader.batch_sampler or loader.sampler, "batch_size", None)
        collate = default_collate if collate is default_convert else collate
    if batch_size is None:
        raise ConfigError("transfer.calibration: cannot tell the batch size of the run's loader")
    # its own generator: iterating a DataLoader draws a worker seed, which must not come from the global one
    return DataLoader(loader.dataset, batch_size=batch_size, shuffle=False, collate_fn=collate,
                      generator=torch.Generator().manual_seed(0))


def build_transfer(cfg: dict, data: Optional[dict] = None):
    if cfg["transfer"] is None:
        return None
    name, options = _split_named(cfg["transfer"])
    if isinstance(options.get("calibration"), str):
        which = options["calibration"]
        if which not in ("train", "val") or (data or {}).get(which) is None:
            raise ConfigError(f"transfer.calibration: expected \"train\" or \"val\" (the run's data"
                              f"{'' if (data or {}).get('val') is not None else '; this run has no val data'}), "
                              f"got {which!r}")
        options["calibration"] = calibration_loader(data[which])
    try:
        return transfer(name, **options)
    except (TypeError, ValueError, KeyError) as exc:
        raise ConfigError(f"transfer ({name!r}): {_message(exc)}") from exc


def build_augmentations(cfg: dict) -> list:
    out = []
    for i, entry in enumerate(cfg["augmentations"]):
        try:
            out.append(resolve_augmentation(entry))
        except (TypeError, ValueError, KeyError) as exc:
            raise ConfigError(f"augmentations.{i} ({entry['name']!r}): {_message(exc)}") from exc
    return out


def build_loggers(cfg: dict) -> list:
    """``[logging] loggers`` as the Distiller's ``loggers=`` specs, each name checked against the
    registry here so that an unknown one names its config key."""
    registry = get_registries().loggers
    for i, entry in enumerate(cfg["logging"]["loggers"]):
        if entry["name"] not in registry:
            raise ConfigError(f"logging.loggers.{i}: unknown logger {entry['name']!r}; registered loggers: "
                              f"{', '.join(map(repr, registry.names())) or 'none'}")
    return [dict(entry) for entry in cfg["logging"]["loggers"]]


def build_weight_schedules(cfg: dict) -> dict:
    return {term: linear(s["start"], s["end"], s["epochs"]) for term, s in cfg["weight_schedules"].items()}


def check_device(device: str) -> None:
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device: {device!r} is not available (torch.cuda.is_available() is False); use 'cpu'")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ConfigError(f"device: {device!r} does not exist; this machine has {torch.cuda.device_count()} "
                          "CUDA device(s)")


def build(cfg: dict, progress: Optional[bool] = None) -> Run:
    """Data, models and the Distiller of a resolved config. Seeds torch with ``cfg["seed"]`` first."""
    check_device(cfg["device"])
    torch.manual_seed(cfg["seed"])
    tokenizer = load_tokenizer_for(cfg)
    train, val = build_data(cfg, tokenizer)
    teacher = build_model(cfg["teacher"], "teacher")
    if cfg["teacher"]["checkpoint"] is not None:
        load_state_dict_file(teacher, cfg["teacher"]["checkpoint"], "teacher.checkpoint")
    student = build_model(cfg["student"], "student", teacher)
    methods = build_methods(cfg)
    transfer = build_transfer(cfg, {"train": train, "val": val})
    augmentations = build_augmentations(cfg)
    schedules = build_weight_schedules(cfg)
    t, s, tr = cfg["teacher"], cfg["student"], cfg["training"]
    scheduler, warmup = scheduler_args(s["scheduler"])
    teacher_scheduler, teacher_warmup = scheduler_args(t["scheduler"])
    try:
        distiller = Distiller(
            teacher, student, methods=methods, task_weight=s["task_weight"],
            optimizer=optimizer_factory(s["optimizer"]), device=cfg["device"], transfer=transfer,
            scheduler=scheduler, warmup=warmup, teacher_optimizer=optimizer_factory(t["optimizer"]),
            teacher_scheduler=teacher_scheduler, teacher_warmup=teacher_warmup, weight_schedules=schedules,
            augmentations=augmentations, amp=tr["amp"], grad_clip=tr["grad_clip"],
            cache_teacher=tr["cache_teacher"], cache_dtype=tr["cache_dtype"], cache_top_k=tr["cache_top_k"],
            strategy=tr["strategy"], shard_teacher=tr["shard_teacher"], balance=tr["balance"],
            balance_primary=tr["balance_primary"], balance_every=tr["balance_every"],
            student_input=s["input"][len("teacher:"):] if s["input"] else None,
            checkpoint_dir=cfg["output_dir"], progress=progress, seed=cfg["seed"], loggers=build_loggers(cfg))
    except ImportError as exc:  # an optional package a logger needs (tensorboard)
        raise ConfigError(f"logging.loggers: {exc}") from exc
    except (TypeError, ValueError, KeyError) as exc:
        raise ConfigError(f"cannot set up the distillation: {_message(exc)}") from exc
    return Run(train, val, teacher, student, distiller, tokenizer)
