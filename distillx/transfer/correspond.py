"""Which teacher tensor corresponds to each student tensor.

Rules, first that applies wins:

1. an explicit ``mapping``: ``{student name: teacher name}`` where a name is a tensor
   (``"head.weight"``) or a module path (``"head"``, mapping every tensor under it, and composing
   with the layer rule below for what is under it), or a callable ``student tensor name ->
   teacher tensor name or None`` that replaces rules 2 and 3;
2. the **output layer** (:func:`~distillx.transfer.tensors.output_layer`, the last ``nn.Linear``)
   of the student takes the teacher's output layer even when the names differ (an MLP with fewer
   hidden layers); the teacher's output layer is then reserved for it. Not when the student's
   last Linear is inside a layer stack or a mapped module: rules 1 and 3 place it;
3. the **same name**, read through the *layer stacks*: a ``nn.ModuleList``/``nn.Sequential`` whose
   children all have one type (``encoder.layers``, ResNet's ``layer1``) is a stack of layers, and
   student layer ``i`` of a stack reads teacher layer ``layer_rule(stack, i, n_student,
   n_teacher)`` of the stack at the same path (``"first"``: ``i``; ``"uniform"``: evenly spaced;
   a ``layer_map``: given). A name match must also agree on the owning module's type, so a
   BatchNorm weight never reads a convolution's bias because indices shifted;
4. when that fails inside a mixed ``nn.Sequential``/``nn.ModuleList`` (a teacher with Dropout or
   activation layers the student lacks shifts the indices), the **same-type ordinal**: the student's
   k-th Linear (Conv, BatchNorm, ...) of that container reads the teacher's k-th module of the same
   type in the container at the same path.

Nothing here reads or writes values; strategies decide what to do with each :class:`Match`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Mapping, Optional, Union

import torch
from torch import nn

from .adapt import uniform_indices
from .errors import TransferError, close_names
from .tensors import output_layer, owner, tied_names, transferable_tensors

#: (stack path in the student, student layer index, student layers, teacher layers) -> teacher layer or None
LayerRule = Callable[[str, int, int, int], Optional[int]]
MappingSpec = Union[None, Mapping[str, str], Callable[[str], Optional[str]]]
LAYER_RULES = ("first", "uniform")


@dataclass(frozen=True)
class Match:
    """A student tensor and its teacher counterpart (``teacher_name`` None when there is none).

    ``reason`` says why they correspond (or why nothing does); ``output`` marks the output-layer pair.
    """

    name: str
    tensor: torch.Tensor
    kind: str
    teacher_name: Optional[str]
    teacher_tensor: Optional[torch.Tensor]
    reason: str
    output: bool = False


def layer_stacks(model: nn.Module) -> dict[str, int]:
    """``{module path: number of layers}`` of the homogeneous ModuleLists/Sequentials in ``model``."""
    stacks = {}
    for path, module in model.named_modules():
        if not isinstance(module, (nn.ModuleList, nn.Sequential)) or len(module) == 0:
            continue
        names = [n for n, _ in module.named_children()]
        types = {type(child) for child in module.children()}
        if names == [str(i) for i in range(len(names))] and len(types) == 1:
            stacks[path] = len(names)
    return stacks


def first_layers(stack: str, i: int, n_student: int, n_teacher: int) -> Optional[int]:
    """First-N layer selection: student layer ``i`` <- teacher layer ``i`` (none past the teacher's depth)."""
    return i if i < n_teacher else None


def uniform_layers(stack: str, i: int, n_student: int, n_teacher: int) -> Optional[int]:
    """Uniform layer selection: ``round(linspace(0, n_teacher - 1, n_student))[i]`` (repeats if the student is deeper)."""
    return uniform_indices(n_teacher, n_student)[i]


def layer_rule(name: Union[str, LayerRule]) -> LayerRule:
    """``"first"`` / ``"uniform"`` / a callable -> the layer rule."""
    if callable(name):
        return name
    if name == "first":
        return first_layers
    if name == "uniform":
        return uniform_layers
    raise ValueError(f"layers must be one of {', '.join(map(repr, LAYER_RULES))} or a callable, got {name!r}")


def _module_paths(model: nn.Module) -> set[str]:
    return {path for path, _ in model.named_modules() if path}


def _check_mapping(mapping: Mapping[str, str], s_tensors, t_tensors, student, teacher) -> tuple[dict, dict]:
    """Split ``mapping`` into tensor and module entries; raise TransferError naming any missing name."""
    if not isinstance(mapping, Mapping):
        raise TypeError(f"mapping must be a dict {{student name: teacher name}} or a callable, "
                        f"got {type(mapping).__name__}")
    s_modules, t_modules = _module_paths(student), _module_paths(teacher)
    tied = tied_names(student)
    tensors, modules = {}, {}
    for s_name, t_name in mapping.items():
        if not isinstance(s_name, str) or not isinstance(t_name, str):
            raise TypeError(f"mapping entries must be str -> str, got {s_name!r}: {t_name!r}")
        if s_name in tied:  # a tied student tensor is written once, under its first name
            first = tied[s_name]
            if tensors.get(first, t_name) != t_name or mapping.get(first, t_name) != t_name:
                raise TransferError(f"mapping {s_name!r} -> {t_name!r}: {s_name!r} is tied to {first!r} (the same "
                                    f"tensor), which the mapping gives another teacher tensor")
            s_name = first
        if s_name in s_tensors:
            if t_name not in t_tensors:
                raise TransferError(f"mapping {s_name!r} -> {t_name!r}: the teacher has no tensor {t_name!r}."
                                    + close_names(t_name, t_tensors))
            tensors[s_name] = t_name
        elif s_name in s_modules:
            if t_name not in t_modules:
                raise TransferError(f"mapping {s_name!r} -> {t_name!r}: the teacher has no module {t_name!r}."
                                    + close_names(t_name, t_modules))
            modules[s_name] = t_name
        else:
            raise TransferError(f"mapping names {s_name!r}, which is neither a tensor nor a module of the "
                                f"student." + close_names(s_name, list(s_tensors) + sorted(s_modules)))
    return tensors, modules


def _translate(name: str, s_stacks: dict, t_stacks: dict, modules: dict, rule: LayerRule
               ) -> tuple[Optional[str], str]:
    """Student tensor name -> teacher tensor name through module mappings and layer stacks."""
    parts = name.split(".")
    start, t_parts, via = 0, [], []
    for k in range(len(parts) - 1, 0, -1):  # the longest mapped module prefix
        prefix = ".".join(parts[:k])
        if prefix in modules:
            start, t_parts = k, modules[prefix].split(".")
            via.append(f"mapping {prefix!r} -> {modules[prefix]!r}")
            break
    for i in range(start, len(parts)):
        s_path, t_path = ".".join(parts[:i]), ".".join(t_parts)
        part = parts[i]
        if i < len(parts) - 1 and part.isdigit() and s_path in s_stacks and t_path in t_stacks:
            n_s, n_t = s_stacks[s_path], t_stacks[t_path]
            j = rule(s_path, int(part), n_s, n_t)
            if j is None:
                return None, (f"layer {part} of {s_path or 'the root'} ({n_s} layers) has no teacher layer "
                              f"({n_t} layers in {t_path or 'the root'})")
            if not 0 <= j < n_t:
                raise TransferError(f"the layer rule mapped student layer {part} of {s_path!r} to teacher layer "
                                    f"{j}, but the teacher's {t_path!r} has layers 0..{n_t - 1}")
            if (n_s, n_t) != (1, 1) or j != int(part):
                via.append(f"layer {part} <- teacher layer {j} of {t_path or 'the root'}")
            part = str(j)
        t_parts.append(part)
    return ".".join(t_parts), "; ".join(via)


def _ordinal(name: str, student: nn.Module, teacher: nn.Module) -> Optional[str]:
    """Rule 4: the teacher tensor of the same-type module with the same ordinal in the same container."""
    parts = name.split(".")
    for k in range(len(parts) - 2, -1, -1):
        if not parts[k].isdigit():
            continue
        parent = ".".join(parts[:k])
        try:
            s_parent, t_parent = student.get_submodule(parent), teacher.get_submodule(parent)
        except AttributeError:
            return None
        if not isinstance(s_parent, (nn.Sequential, nn.ModuleList)) or type(t_parent) is not type(s_parent):
            return None
        s_children, t_children = list(s_parent.children()), list(t_parent.children())
        index = int(parts[k])
        if index >= len(s_children):
            return None
        kind = type(s_children[index])
        ordinal = sum(1 for c in s_children[:index] if type(c) is kind)
        same = [i for i, c in enumerate(t_children) if type(c) is kind]
        if ordinal >= len(same):
            return None
        return ".".join(parts[:k] + [str(same[ordinal])] + parts[k + 1:])
    return None


def _governed(path: str, stacks: dict, modules: dict) -> bool:
    """Whether a module mapping or a layer stack already decides where ``path`` reads from: then the
    output-layer rule stays out (the last Linear of a stack of Linears is that stack's last layer)."""
    parts = path.split(".")
    prefixes = [".".join(parts[:k]) for k in range(len(parts) + 1)]
    return any(p in modules for p in prefixes[1:]) or any(
        p in stacks and parts[k].isdigit() for k, p in enumerate(prefixes[:-1]))


def correspond(teacher: nn.Module, student: nn.Module, *, mapping: MappingSpec = None,
               layers: Union[str, LayerRule] = "first", output: bool = True) -> list[Match]:
    """One :class:`Match` per student tensor (:func:`transferable_tensors` order).

    ``layers``: the layer rule for stacks (``"first"``, ``"uniform"`` or a :data:`LayerRule`).
    ``output``: apply the output-layer rule. Raises :class:`TransferError` for a ``mapping`` that
    names a missing tensor or module (with the close names).
    """
    rule = layer_rule(layers)
    # the student's tensors once each (written once); the teacher's under every name, so a tied
    # teacher's head.weight is found although it is the same tensor as its emb.weight
    s_tensors, t_tensors = transferable_tensors(student), transferable_tensors(teacher, aliases=True)
    s_stacks, t_stacks = layer_stacks(student), layer_stacks(teacher)
    fn = mapping if callable(mapping) else None
    tensor_map, module_map = _check_mapping(mapping, s_tensors, t_tensors, student, teacher) \
        if mapping is not None and fn is None else ({}, {})

    s_head = output_layer(student) if output and fn is None else None
    t_head = output_layer(teacher) if s_head is not None else None
    head_map = {}
    if s_head is not None and t_head is not None and not _governed(s_head, s_stacks, module_map):
        head_map = {f"{s_head}.{local}": f"{t_head}.{local}" for local, _ in
                    student.get_submodule(s_head).named_parameters(recurse=False)}
    reserved = {t for t in head_map.values() if t in t_tensors} if t_head != s_head else set()

    matches = []
    for name, (tensor, kind) in s_tensors.items():
        output_pair = name in head_map
        if name in tensor_map:
            t_name, reason = tensor_map[name], f"mapping {name!r} -> {tensor_map[name]!r}"
        elif fn is not None:
            t_name = fn(name)
            if t_name is not None and t_name not in t_tensors:
                raise TransferError(f"mapping callable returned {t_name!r} for {name!r}, which is not a teacher "
                                    f"tensor." + close_names(t_name, t_tensors))
            reason = "mapping callable" if t_name is not None else "mapping callable returned None"
        elif output_pair and head_map[name] in t_tensors:
            t_name = head_map[name]
            reason = "output layer" + ("" if s_head == t_head else f" (student {s_head} <- teacher {t_head})")
        else:
            t_name, via = _translate(name, s_stacks, t_stacks, module_map, rule)
            reason = via or "same name"
            if t_name is None:
                pass  # no teacher layer for this student layer: `via` says why
            elif t_name not in t_tensors:
                reason = f"the teacher has no tensor {t_name!r}" + (f" ({via})" if via else "")
                t_name = None
            elif t_name in reserved:
                reason = f"{t_name!r} is the teacher's output layer, reserved for the student's {s_head!r}"
                t_name = None
            elif not module_map or not any(name.startswith(p + ".") for p in module_map):
                s_owner, t_owner = owner(student, name)[0], owner(teacher, t_name)[0]
                if type(s_owner) is not type(t_owner):
                    reason = (f"{t_name!r} belongs to a {type(t_owner).__name__} in the teacher, "
                              f"not a {type(s_owner).__name__}")
                    t_name = None
        if t_name is None and not module_map and fn is None and name not in tensor_map:
            alt = _ordinal(name, student, teacher)
            if alt is not None and alt in t_tensors and alt not in reserved and alt != name and \
                    type(owner(student, name)[0]) is type(owner(teacher, alt)[0]):
                kind_name = type(owner(student, name)[0]).__name__
                t_name, reason = alt, f"same-type ordinal: {name!r} <- {alt!r} (the same {kind_name} in order)"
        if t_name is None:
            matches.append(Match(name, tensor, kind, None, None, reason, output_pair))
        else:
            matches.append(Match(name, tensor, kind, t_name, t_tensors[t_name][0], reason, output_pair))
    return matches
