"""The graph walk behind :func:`distillx.transfer.channels.channel_groups`: union-find over channel
spaces, one rule per kind of fx node (the rules are listed in :mod:`distillx.transfer.channels`).

Conservative by design: a node not known to keep channels apart makes the spaces it reads fixed,
so an unknown model loses prunable widths, never correctness.
"""
from __future__ import annotations

import math
import operator
from dataclasses import dataclass
from typing import Any, Mapping, Optional

import torch
import torch.fx
from torch import nn

from .errors import TransferError
from .tensors import transferable_tensors

#: measurement kinds, best first: a space is measured at its activations, else its norms, else its producers
POINT_KINDS = ("activation", "norm", "producer")

_ACTIVATIONS = (nn.ReLU, nn.ReLU6, nn.GELU, nn.SiLU, nn.Sigmoid, nn.Tanh, nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU,
                nn.Hardswish, nn.Hardsigmoid, nn.Hardtanh, nn.Mish, nn.Softplus, nn.PReLU)
_PASS = (nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout)
_POOLS = {nn.MaxPool1d: 1, nn.MaxPool2d: 2, nn.MaxPool3d: 3, nn.AvgPool1d: 1, nn.AvgPool2d: 2, nn.AvgPool3d: 3,
          nn.AdaptiveAvgPool1d: 1, nn.AdaptiveAvgPool2d: 2, nn.AdaptiveAvgPool3d: 3, nn.AdaptiveMaxPool1d: 1,
          nn.AdaptiveMaxPool2d: 2, nn.AdaptiveMaxPool3d: 3}
_CHANNEL_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm, nn.InstanceNorm1d,
                  nn.InstanceNorm2d, nn.InstanceNorm3d)
_LAST_NORMS = (nn.LayerNorm,) + ((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ())
_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
F = torch.nn.functional
_ACT_FUNCTIONS = {torch.relu, F.relu, F.relu6, F.gelu, F.silu, torch.sigmoid, F.sigmoid, torch.tanh, F.tanh,
                  F.leaky_relu, F.elu, F.selu, F.hardswish, F.hardsigmoid, F.hardtanh, F.mish, F.softplus}
_ACT_METHODS = {"relu", "relu_", "sigmoid", "sigmoid_", "tanh", "tanh_"}
_PASS_FUNCTIONS = {F.dropout, F.dropout1d, F.dropout2d, F.dropout3d}
_PASS_METHODS = {"contiguous", "clone", "detach", "float", "double", "half", "bfloat16", "to", "type_as"}
_POOL_FUNCTIONS = {F.max_pool1d: 1, F.max_pool2d: 2, F.max_pool3d: 3, F.avg_pool1d: 1, F.avg_pool2d: 2,
                   F.avg_pool3d: 3, F.adaptive_avg_pool1d: 1, F.adaptive_avg_pool2d: 2, F.adaptive_avg_pool3d: 3,
                   F.adaptive_max_pool1d: 1, F.adaptive_max_pool2d: 2, F.adaptive_max_pool3d: 3}
_ELEMENTWISE = {operator.add, operator.sub, operator.mul, operator.truediv, operator.iadd, operator.isub,
                operator.imul, operator.itruediv, torch.add, torch.sub, torch.mul, torch.div}
_ELEMENTWISE_METHODS = {"add", "add_", "sub", "sub_", "mul", "mul_", "div", "div_"}
_RESHAPES = {torch.flatten, torch.reshape, torch.squeeze, torch.unsqueeze}
_RESHAPE_METHODS = {"flatten", "view", "reshape", "squeeze", "unsqueeze"}
_REDUCTIONS = {torch.mean, torch.sum, torch.amax}
_REDUCTION_METHODS = {"mean", "sum", "amax"}
_METADATA = {"size", "dim"}  # reading a shape constrains nothing


@dataclass(frozen=True)
class ChannelSpace:
    """One set of tensor dimensions that index the same channels.

    ``members``: ``(tensor name, dim)`` pairs in graph order; ``fixed``: why its size must stay (None
    when prunable); ``points``: ``(fx node name, channel dim, kind)`` where :func:`channel_importance`
    measures it (the best :data:`POINT_KINDS` present; empty for a fixed space).
    """

    index: int
    size: int
    members: tuple[tuple[str, int], ...]
    fixed: Optional[str]
    points: tuple[tuple[str, int, str], ...]

    @property
    def name(self) -> str:
        """``"<first member>:<dim>"``, e.g. ``"conv1.weight:0"``: how errors and reports name the space."""
        return f"{self.members[0][0]}:{self.members[0][1]}"


@dataclass(frozen=True)
class ChannelPlan:
    """The channel spaces of one model (:func:`channel_groups`); ``shapes``: its member tensors'
    shapes when planned, so a plan applied to another model is caught."""

    spaces: tuple[ChannelSpace, ...]
    shapes: Mapping[str, tuple[int, ...]]

    def space_of(self, name: str, dim: int) -> Optional[ChannelSpace]:
        """The space that dimension ``dim`` of tensor ``name`` indexes, or None (in no space)."""
        return next((s for s in self.spaces if (name, dim) in s.members), None)

    @property
    def prunable(self) -> list[ChannelSpace]:
        """The spaces that may change size (not fixed): the ones :func:`channel_importance` scores."""
        return [s for s in self.spaces if s.fixed is None]


def _shape(node: Any) -> Optional[tuple[int, ...]]:
    meta = node.meta.get("tensor_meta") if isinstance(node, torch.fx.Node) else None
    return tuple(meta.shape) if meta is not None and hasattr(meta, "shape") else None


def _what(node: torch.fx.Node) -> str:
    if node.op == "call_module":
        return f"module {node.target!r}"
    if node.op == "call_method":
        return f".{node.target}() (node {node.name})"
    return f"{getattr(node.target, '__name__', node.target)} (node {node.name})"


def _reshaped_dim(before: tuple, c: int, after: tuple) -> Optional[int]:
    """Where channel dim ``c`` of ``before`` lands in ``after`` when it stays one axis there (the
    elements before and after it keep their counts), else None."""
    pre, post = math.prod(before[:c]), math.prod(before[c + 1:])
    for j, d in enumerate(after):
        if d == before[c] and math.prod(after[:j]) == pre and math.prod(after[j + 1:]) == post:
            return j
    return None


class SpaceBuilder:
    """Union-find over channel spaces, walking an fx graph with recorded shapes."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.tensors = transferable_tensors(model, aliases=True)
        self.parent: list[int] = []
        self.size: list[int] = []
        self.fixed: dict[int, str] = {}
        self.members: dict[tuple[str, int], int] = {}
        self.points: list[tuple[int, str, int, str]] = []
        self.vals: dict[torch.fx.Node, tuple[int, int]] = {}  # node -> (space, channel dim of its output)

    # -- union-find ----------------------------------------------------------------------------
    def new(self, size: int, fixed: Optional[str] = None) -> int:
        self.parent.append(len(self.parent))
        self.size.append(int(size))
        if fixed:
            self.fixed[len(self.parent) - 1] = fixed
        return len(self.parent) - 1

    def find(self, a: int) -> int:
        while self.parent[a] != a:
            self.parent[a] = self.parent[self.parent[a]]
            a = self.parent[a]
        return a

    def union(self, a: int, b: int) -> int:
        a, b = self.find(a), self.find(b)
        if a == b:
            return a
        if self.size[a] != self.size[b]:  # shapes that broadcast never get here; guard against a bug
            raise TransferError(f"channel spaces of sizes {self.size[a]} and {self.size[b]} were joined")
        self.parent[b] = a
        if b in self.fixed:
            self.fixed.setdefault(a, self.fixed.pop(b))
        return a

    def fix(self, a: int, reason: str) -> None:
        self.fixed.setdefault(self.find(a), reason)

    def member(self, space: int, module: str, local: str, dim: int) -> None:
        name = f"{module}.{local}" if module else local
        tensor = self.tensors.get(name, (None,))[0]
        if tensor is None or tensor.dim() <= dim or tensor.shape[dim] != self.size[self.find(space)]:
            return  # absent (bias=False, affine=False) or not indexed by the channels
        key = (name, dim)
        self.members[key] = self.union(self.members[key], space) if key in self.members else space

    # -- values --------------------------------------------------------------------------------
    def read(self, arg: Any, dim: int, node: torch.fx.Node, size: int) -> int:
        """The space of ``arg``'s channels that ``node`` reads at ``dim`` (``size`` of them); a new
        fixed space when they are not tracked there."""
        shape, val = _shape(arg), self.vals.get(arg)
        if shape is not None and -len(shape) <= dim < len(shape):
            dim %= len(shape)
            if val is not None and val[1] == dim:
                return val[0]
        if val is not None:
            self.fix(val[0], f"{_what(node)} reads dim {dim} of a tensor whose channels are dim {val[1]}")
        why = "the model's input" if getattr(arg, "op", None) == "placeholder" else \
            f"the output of {_what(arg)}" if isinstance(arg, torch.fx.Node) else "a constant"
        return self.new(size, f"{_what(node)} reads {why}, whose channels are not tracked")

    def opaque(self, node: torch.fx.Node, reason: str) -> None:
        """``node`` is not known to keep channels apart: every space it reads becomes fixed."""
        for arg in node.all_input_nodes:
            if arg in self.vals:
                self.fix(self.vals[arg][0], reason)

    def passed(self, node: torch.fx.Node, arg: Any, kind: Optional[str] = None) -> None:
        """``node``'s output carries ``arg``'s space at the same dim (checked: the dims up to and
        including the channel dim are unchanged)."""
        val, before, after = self.vals.get(arg), _shape(arg), _shape(node)
        if val is None:
            return  # nothing tracked goes in, nothing comes out
        c = val[1]
        if before is None or after is None or before[:c + 1] != after[:c + 1]:
            self.fix(val[0], f"{_what(node)} does not keep its channels (dim {c}) as they are")
            return
        self.vals[node] = val
        if kind:
            self.points.append((val[0], node.name, c, kind))

    def produced(self, node: torch.fx.Node, space: int, dim: int, kind: str = "producer") -> None:
        """``node``'s output carries ``space`` at ``dim``, and is a measurement point of ``kind``."""
        self.vals[node] = (space, dim)
        self.points.append((space, node.name, dim, kind))

    # -- nodes ---------------------------------------------------------------------------------
    def module(self, node: torch.fx.Node) -> None:
        m, path, x = self.model.get_submodule(node.target), node.target, node.args[0] if node.args else None
        out = _shape(node)
        if isinstance(m, _CONVS) and out is not None:
            transposed = isinstance(m, (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d))
            w_out, w_in = (1, 0) if transposed else (0, 1)
            space_in = self.read(x, 1, node, m.in_channels)
            if m.groups == 1:
                self.member(space_in, path, "weight", w_in)
                space = self.new(m.out_channels)
                self.member(space, path, "weight", w_out)
            elif m.groups == m.in_channels == m.out_channels:  # depthwise: channel c in, channel c out
                space = space_in
                self.member(space, path, "weight", 0)  # (C, 1, k...) for both conv and transposed conv
            else:
                self.fix(space_in, f"{m.groups}-group {type(m).__name__} {path!r} mixes channels within groups")
                space = self.new(m.out_channels, f"output of the {m.groups}-group {type(m).__name__} {path!r}")
                self.member(space_in, path, "weight", w_in)  # only where that dim has all the channels
                self.member(space, path, "weight", w_out)
            self.member(space, path, "bias", 0)
            self.produced(node, space, 1)
        elif isinstance(m, nn.Linear) and out is not None:
            self.member(self.read(x, -1, node, m.in_features), path, "weight", 1)
            space = self.new(m.out_features)
            self.member(space, path, "weight", 0)
            self.member(space, path, "bias", 0)
            self.produced(node, space, len(out) - 1)
        elif isinstance(m, nn.Embedding) and out is not None:
            space = self.new(m.embedding_dim)
            self.member(space, path, "weight", 1)
            self.produced(node, space, len(out) - 1)
        elif isinstance(m, _CHANNEL_NORMS + _LAST_NORMS) and out is not None:
            last = isinstance(m, _LAST_NORMS)
            if last and len(m.normalized_shape) != 1:
                self.opaque(node, f"{type(m).__name__} {path!r} normalises over several dims")
                return
            size = m.normalized_shape[0] if last else m.num_features
            space = self.read(x, -1 if last else 1, node, size)
            for local in ("weight", "bias", "running_mean", "running_var"):
                self.member(space, path, local, 0)
            self.produced(node, space, len(out) - 1 if last else 1, "norm")
        elif isinstance(m, nn.PReLU) and m.num_parameters > 1:
            if self.vals.get(x, (0, -1))[1] == 1:
                self.member(self.vals[x][0], path, "weight", 0)
                self.passed(node, x, "activation")
            else:
                self.opaque(node, f"PReLU {path!r} has one weight per dim-1 channel, not per tracked channel")
        elif isinstance(m, _ACTIVATIONS):
            self.passed(node, x, "activation")
        elif isinstance(m, _PASS):
            self.passed(node, x)
        elif type(m) in _POOLS:
            self._pool(node, x, _POOLS[type(m)])
        elif isinstance(m, (nn.Flatten, nn.Unflatten)):
            self._reshape(node, x)
        else:
            self.opaque(node, f"{_what(node)} ({type(m).__name__}) is not known to keep channels apart")

    def _pool(self, node: torch.fx.Node, x: Any, k: int) -> None:
        val, shape = self.vals.get(x), _shape(x)
        if val is not None and shape is not None and val[1] < len(shape) - k:  # pools only the last k dims
            self.passed(node, x)
        else:
            self.opaque(node, f"{_what(node)} pools over the channel dim")

    def _reshape(self, node: torch.fx.Node, x: Any) -> None:
        val, before, after = self.vals.get(x), _shape(x), _shape(node)
        if val is None:
            return
        dim = _reshaped_dim(before, val[1], after) if before is not None and after is not None else None
        if dim is None:
            self.fix(val[0], f"{_what(node)} reshapes {before} to {after}, merging the channels (dim {val[1]}) "
                             f"with other dims")
        else:
            self.vals[node] = (val[0], dim)

    def _reduce(self, node: torch.fx.Node, x: Any) -> None:
        val, before, after = self.vals.get(x), _shape(x), _shape(node)
        if val is None:
            return
        dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
        dims = [dims] if isinstance(dims, int) else list(dims) if isinstance(dims, (list, tuple)) else None
        if dims is None or before is None or after is None or not all(isinstance(d, int) for d in dims):
            self.fix(val[0], f"{_what(node)} reduces over all dims, the channels included")
            return
        dims = {d % len(before) for d in dims}
        c = val[1]
        new = c if len(after) == len(before) else c - sum(d < c for d in dims)
        if c in dims or not 0 <= new < len(after) or after[new] != before[c]:
            self.fix(val[0], f"{_what(node)} reduces over the channels (dim {c})")
        else:
            self.vals[node] = (val[0], new)

    def _elementwise(self, node: torch.fx.Node) -> None:
        out = _shape(node)
        operands = [a for a in node.args[:2] if isinstance(a, torch.fx.Node)]
        spaced = [a for a in operands if a in self.vals]
        if not spaced or out is None:
            self.opaque(node, f"{_what(node)} combines tensors of unknown shapes")
            return
        # align from the right, as broadcasting does: every space must land on the same output dim
        where = {len(out) - len(_shape(a)) + self.vals[a][1] for a in spaced}
        sizes = {_shape(a)[self.vals[a][1]] for a in spaced}
        if len(where) > 1 or sizes != {out[next(iter(where))]}:
            self.opaque(node, f"{_what(node)} combines channels that do not line up")
            return
        p = where.pop()
        space = self.vals[spaced[0]][0]
        for a in spaced[1:]:
            space = self.union(space, self.vals[a][0])
        for a in operands:
            shape = _shape(a)
            if a in self.vals or shape is None:
                continue
            d = p - (len(out) - len(shape))
            if d < 0 or shape[d] == 1:
                continue  # broadcast along the channels: each channel gets the same
            if a.op == "get_attr" and a.target in self.tensors:  # a layer scale, a per-channel bias
                name, local = a.target.rpartition(".")[0], a.target.rpartition(".")[2]
                self.member(space, name, local, d)
            else:
                self.fix(space, f"{_what(node)} combines the channels with {_what(a)}, whose channels are not "
                                f"tracked")
        self.vals[node] = (space, p)

    def node(self, node: torch.fx.Node) -> None:
        x = node.args[0] if node.args else None
        if node.op == "call_module":
            self.module(node)
        elif node.op == "output":
            for arg in node.all_input_nodes:
                if arg in self.vals:
                    self.fix(self.vals[arg][0], "the model's output")
        elif node.op in ("placeholder", "get_attr"):
            return
        elif node.op == "call_function" and node.target in _ELEMENTWISE or \
                node.op == "call_method" and node.target in _ELEMENTWISE_METHODS:
            self._elementwise(node)
        elif node.op == "call_function" and node.target in _ACT_FUNCTIONS or \
                node.op == "call_method" and node.target in _ACT_METHODS:
            self.passed(node, x, "activation")
        elif node.op == "call_function" and node.target in _PASS_FUNCTIONS or \
                node.op == "call_method" and node.target in _PASS_METHODS:
            self.passed(node, x)
        elif node.op == "call_function" and node.target in _POOL_FUNCTIONS:
            self._pool(node, x, _POOL_FUNCTIONS[node.target])
        elif node.op == "call_function" and node.target in _RESHAPES or \
                node.op == "call_method" and node.target in _RESHAPE_METHODS:
            self._reshape(node, x)
        elif node.op == "call_function" and node.target in _REDUCTIONS or \
                node.op == "call_method" and node.target in _REDUCTION_METHODS:
            self._reduce(node, x)
        elif node.op == "call_method" and node.target in _METADATA or \
                node.op == "call_function" and node.target is getattr and len(node.args) > 1 \
                and node.args[1] in ("shape", "dtype", "device"):
            return
        else:
            self.opaque(node, f"{_what(node)} is not known to keep channels apart")

    def plan(self) -> ChannelPlan:
        """The spaces that have members, in the order their first member was met; fixed ones unmeasured."""
        groups: dict[int, list[tuple[str, int]]] = {}
        for key, space in self.members.items():
            groups.setdefault(self.find(space), []).append(key)
        points: dict[int, list[tuple[str, int, str]]] = {}
        for space, name, dim, kind in self.points:
            points.setdefault(self.find(space), []).append((name, dim, kind))
        spaces = []
        for root, members in groups.items():
            fixed = self.fixed.get(root)
            measured = points.get(root, [])
            best = next((k for k in POINT_KINDS if any(p[2] == k for p in measured)), None)
            chosen = () if fixed else tuple(p for p in measured if p[2] == best)
            spaces.append(ChannelSpace(len(spaces), self.size[root], tuple(members), fixed, chosen))
        shapes = {name: tuple(self.tensors[name][0].shape) for s in spaces for name, _ in s.members}
        return ChannelPlan(tuple(spaces), shapes)


def trace(model: nn.Module) -> torch.fx.GraphModule:
    """``torch.fx.symbolic_trace(model)``, or a :class:`TransferError` saying why it cannot be traced."""
    try:
        return torch.fx.symbolic_trace(model)
    except Exception as exc:  # noqa: BLE001 - fx raises many kinds; all mean the same to the caller
        raise TransferError(f"cannot trace {type(model).__name__} with torch.fx to find its channel spaces "
                            f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); channel "
                            f"pruning needs a model torch.fx can trace (no data-dependent control flow)") from exc


def positional(gm: torch.fx.GraphModule, inputs: Any, what: str) -> list[Any]:
    """``inputs`` (a tensor, a tuple of positional inputs, or a mapping of keyword inputs) as the
    graph's placeholders in order; a missing input without a default is a TransferError naming ``what``."""
    if isinstance(inputs, torch.Tensor):
        return [inputs]
    if isinstance(inputs, (tuple, list)):
        return list(inputs)
    if not isinstance(inputs, Mapping):
        raise TypeError(f"{what} must be a tensor, a tuple of inputs or a mapping of keyword inputs, "
                        f"got {type(inputs).__name__}")
    out = []
    for node in (n for n in gm.graph.nodes if n.op == "placeholder"):
        if node.target in inputs:
            out.append(inputs[node.target])
        elif node.args:  # the argument's default
            out.append(node.args[0])
        else:
            raise TransferError(f"{what} has no input {node.target!r} (it holds {sorted(map(str, inputs))})")
    return out
