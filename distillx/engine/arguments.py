"""The Distiller's arguments checked and turned into objects, with errors that name the argument:
the models, methods and their weights (and their metric keys), AMP, gradient clipping, the teacher
cache's options, augmentations, the weight transfer, the metrics loggers."""
from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Optional

import torch
from torch import nn

from .. import _checks
from ..augment import any_changes_inputs
from ..features import PENULTIMATE, FeaturePathError, FeatureSpec, resolve_module
from ..features.paths import is_peft_model, unwrap_chain
from .distributed import STRATEGIES
from ..methods import Method
from ..loggers import Loggers, check_logger
from ..plugin import get_registries, logger as resolve_logger, resolve_augmentation, transfer as resolve_transfer
from ..transfer import Transfer, TransferReport
from .balance import PREFIX as WEIGHT_PREFIX, Balancer, check_balance
from .distributed import DistContext
from .step import TASK

AMP = {None: None, "bf16": torch.bfloat16, "fp16": torch.float16}


def check_models(teacher, student) -> None:
    for name, model in (("teacher", teacher), ("student", student)):
        if not isinstance(model, nn.Module):
            raise TypeError(f"{name} must be a torch.nn.Module, got {type(model).__name__}")
    if teacher is student:
        raise ValueError("teacher and student are the same module; the student needs its own parameters")
    shared = {id(p) for p in teacher.parameters()} & {id(p) for p in student.parameters()}
    if shared:
        raise ValueError(f"teacher and student share {len(shared)} parameter tensor(s); training the "
                         "student would change the teacher. Give the student its own copy.")


def check_amp(amp, device: torch.device) -> Optional[str]:
    if amp not in AMP:
        raise ValueError(f"amp must be None, 'bf16' or 'fp16', got {amp!r}")
    if amp == "fp16" and device.type != "cuda":
        raise ValueError("amp='fp16' needs CUDA (float16 training needs a gradient scaler); use amp='bf16' on CPU")
    return amp


def student_input_spec(student_input, teacher: nn.Module) -> Optional[FeatureSpec]:
    """``student_input`` as a :class:`FeatureSpec` of the teacher, its layer checked to exist."""
    if student_input is None:
        return None
    if isinstance(student_input, str):
        if not student_input:
            raise ValueError("student_input must be a teacher layer path such as 'layer3' or 'penultimate', got ''")
        spec = FeatureSpec.parse(student_input)
    elif isinstance(student_input, FeatureSpec):
        spec = student_input
    else:
        raise TypeError(f"student_input must be a teacher layer path (str) or a FeatureSpec, got "
                        f"{type(student_input).__name__}")
    if spec.path != PENULTIMATE:
        try:
            resolve_module(teacher, spec.path, name="teacher")
        except FeaturePathError as exc:
            raise FeaturePathError(f"student_input={student_input!r}: {exc}") from None
    return spec


def check_strategy(strategy, shard_teacher, optimizer) -> tuple[str, bool]:
    _checks.choice("strategy", strategy, STRATEGIES)
    _checks.boolean("shard_teacher", shard_teacher)
    if shard_teacher and strategy != "fsdp":
        raise ValueError("shard_teacher=True shards the teacher with FSDP2: it needs strategy='fsdp'")
    if strategy == "fsdp" and isinstance(optimizer, torch.optim.Optimizer):
        raise ValueError("strategy='fsdp' replaces the student's parameters by their shards, so the optimizer must be "
                         "built afterwards: pass a factory such as `lambda params: torch.optim.AdamW(params, lr=1e-3)`")
    return strategy, shard_teacher


def check_grad_clip(grad_clip) -> Optional[float]:
    return None if grad_clip is None else _checks.positive("grad_clip", grad_clip)


def cache_options(cache_teacher, augmentations, cache_dir, cache_dtype, cache_top_k) -> Optional[dict]:
    """The teacher cache's options, or None without ``cache_teacher``."""
    _checks.boolean("cache_teacher", cache_teacher)
    if cache_dtype not in ("float16", "float32"):
        raise ValueError(f"cache_dtype must be 'float16' or 'float32', got {cache_dtype!r}")
    if not cache_teacher:
        return None
    if any_changes_inputs(augmentations):
        raise ValueError("cache_teacher=True stores the teacher's outputs for the original inputs, but "
                         "augmentations that change the inputs are set, so the cached outputs would not "
                         "match what the student sees; drop the augmentations or cache_teacher")
    return {"directory": cache_dir, "dtype": getattr(torch, cache_dtype), "top_k": cache_top_k}


REWRITE_SEED_OFFSET = 0x5EED  # the batch-rewriting generator's seed: the run's seed + rank + this


def check_rewriting(methods: Sequence[str], cache: Optional[dict], strategy: str) -> None:
    """Refuse what cannot follow methods that rewrite the batch (``methods``: their names)."""
    names = ", ".join(map(repr, methods))
    if cache is not None:
        raise ValueError(f"cache_teacher=True stores the teacher's outputs for the loader's batches, but method(s) "
                         f"{names} rewrite each batch before the forward pass (the teacher must score the new "
                         "one); drop cache_teacher")
    if strategy == "fsdp":
        raise ValueError(f"method(s) {names} sample from the student between steps, and each process stops sampling "
                         "at its own step, which FSDP's sharded collectives cannot follow: use strategy='ddp'")


def build_augmentations(augmentations) -> list:
    if augmentations is None:
        return []
    if isinstance(augmentations, (str, bytes)) or callable(augmentations):
        augmentations = [augmentations]
    out = []
    for i, a in enumerate(augmentations):
        if isinstance(a, (str, dict)):
            a = resolve_augmentation(a)
        if not callable(a):
            raise TypeError(f"augmentations[{i}] must be a registered name, a {{'name': ..., **options}} mapping or a "
                            f"callable (inputs, targets, generator) -> (inputs, targets), got {type(a).__name__}")
        out.append(a)
    return out


def build_loggers(loggers, run_dir: Optional[str], is_main: bool) -> Loggers:
    """The metrics loggers of ``loggers=``: a registered name (``"tensorboard"``), a mapping
    ``{"name": ..., **options}``, or a logger object (``log_step``/``log_epoch``), alone or in a
    list. Every process checks the names; only the main process (rank 0) builds them, so a plugin's
    logger never starts on the other ranks. ``run_dir`` (the checkpoint directory) is each factory's
    default place to write."""
    if loggers is None:
        return Loggers()
    if isinstance(loggers, (str, Mapping)) or not isinstance(loggers, Iterable):
        loggers = [loggers]
    specs = []
    for i, spec in enumerate(loggers):
        what = f"loggers[{i}]"
        if isinstance(spec, str):
            name, options = spec, {}
        elif isinstance(spec, Mapping):
            options = dict(spec)
            name = options.pop("name", None)
            if not isinstance(name, str):
                raise ValueError(f"{what}: a logger given as a mapping needs a 'name' string (a registered logger "
                                 f"such as 'tensorboard'), got {spec!r}")
        else:
            specs.append((getattr(spec, "name", None) or type(spec).__name__, None, check_logger(spec, what)))
            continue
        get_registries().loggers.get(name)  # unknown names fail on every rank, listing the known ones
        specs.append((name, options, None))
    if not is_main:
        return Loggers()
    built = [obj if obj is not None else resolve_logger(name, run_dir=run_dir, **options)
             for name, options, obj in specs]
    return Loggers(built, [name for name, _, _ in specs])


def check_transfer_target(transfer, student: nn.Module) -> None:
    """A ``ValueError`` for ``transfer=`` onto a PEFT student: the strategies write the student's
    weights by name and shape, and a PEFT student's base weights are frozen (what a transfer would
    initialise never trains) and named through the wrapper; the transfer belongs on the base model,
    before ``get_peft_model``."""
    if transfer is not None and any(is_peft_model(m) for m in unwrap_chain(student)):
        name = transfer if isinstance(transfer, str) else getattr(transfer, "name", type(transfer).__name__)
        raise ValueError(f"transfer={name!r}: the student is a PEFT model ({type(student).__name__}), whose base "
                         "weights are frozen; apply the transfer to the base model before wrapping it: "
                         f"dx.transfer({name!r}, teacher, base), then peft.get_peft_model(base, config), and "
                         "pass no transfer=")


def apply_transfer(transfer, teacher: nn.Module, student: nn.Module):
    """Run ``transfer`` (a name, a Transfer or a callable) on the models; return its report or None."""
    if transfer is None:
        return None
    if isinstance(transfer, str):
        transfer = resolve_transfer(transfer)
    if isinstance(transfer, Transfer) and transfer.n is not None:
        raise ValueError(f"transfer={transfer.name!r} with n={transfer.n} makes an ensemble of students; the "
                         "Distiller trains one student: drop n= (or distil each ensemble member separately)")
    if not callable(transfer):
        raise TypeError("transfer must be a strategy name, a distillx.transfer.Transfer or a callable "
                        f"(teacher, student) -> TransferReport, got {type(transfer).__name__}")
    report = transfer(teacher, student)
    if not isinstance(report, TransferReport):
        raise TypeError(f"transfer returned {type(report).__name__}, expected a TransferReport")
    return report


def check_weight(weight, name: str) -> float:
    return _checks.number(name, weight, ge=0)


def check_methods(methods) -> list[Method]:
    if methods is None:
        return []
    if isinstance(methods, Method):
        raise TypeError("methods must be a list of methods; wrap the single method in a list: methods=[...]")
    if isinstance(methods, (str, bytes)) or not isinstance(methods, Iterable):
        raise TypeError(f"methods must be a list of distillx methods, got {type(methods).__name__}")
    methods = list(methods)
    for i, m in enumerate(methods):
        if not isinstance(m, Method):
            raise TypeError(f"methods[{i}] must be a distillx Method (build it with distillx.method(name, ...)), "
                            f"got {type(m).__name__}")
        check_weight(m.weight, f"methods[{i}].weight ({method_name(m)})")
    return methods


def method_name(method: Method) -> str:
    return getattr(method, "name", None) or type(method).__name__


def metric_keys(methods: Sequence[Method]) -> list[str]:
    """One metrics key per method: its name, suffixed ``#2``, ``#3``… when a name repeats."""
    keys, counts = [], {}
    for m in methods:
        base = method_name(m)
        counts[base] = counts.get(base, 0) + 1
        keys.append(base if counts[base] == 1 else f"{base}#{counts[base]}")
    if TASK in keys or "loss" in keys or "lr" in keys:
        raise ValueError(f"a method may not be named {TASK!r}, 'loss' or 'lr' (reserved metrics keys)")
    if any(k.startswith("lr/") for k in keys):
        raise ValueError("a method's name may not start with 'lr/' (the metrics keys of learning rates)")
    if any(k.startswith(WEIGHT_PREFIX) for k in keys):
        raise ValueError(f"a method's name may not start with {WEIGHT_PREFIX!r} (the metrics keys of balance factors)")
    return keys


def balancer(balance, primary, every, task_weight: float, methods: Sequence[Method], keys: Sequence[str],
             schedules: dict, strategy: str, ctx: DistContext) -> Optional[Balancer]:
    """The loss balancer of ``balance=`` (None without), its options checked (errors name them)."""
    terms = [TASK, *keys]
    weights = [task_weight, *(m.weight for m in methods)]
    candidates = [k for k, w in zip(terms, weights) if w or k in schedules]
    spec = check_balance(balance, primary, every, terms, candidates, strategy)
    if spec is None:
        return None
    return Balancer(terms, spec["primary"], spec["every"], logged=candidates, ctx=ctx)
