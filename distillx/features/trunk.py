"""A model run up to a cut: the feature at one layer, with the layers after it never run.

``Trunk(model, at)`` is an ``nn.Module`` whose forward returns the feature a
:class:`~distillx.features.FeatureSpec` names (``"layer3"``, ``"blocks.1@input"``, ``"encoder:0"``,
``"penultimate"``, with an optional capture-time reduction). It is the teacher's half of a student
that consumes the teacher's features (``Distiller(student_input=...)``, :func:`distillx.compose`).
Three ways, the first that applies:

1. **slice**: the path walks ``nn.Sequential`` containers only, so the trunk is the chain of children
   before the cut (shared, not copied);
2. **graph**: ``torch.fx`` traces the model with the cut module kept as a leaf; the graph's output
   becomes that call's output (or input) and dead code is removed, so the ``GraphModule`` holds only the
   modules the cut needs;
3. **stop**: for models ``torch.fx`` cannot trace (data-dependent control flow, keyword-only
   forwards), the model runs with a hook at the cut that ends its forward pass there. One probe
   forward on ``example_inputs`` finds the modules that run before the cut; the trunk's
   ``state_dict`` holds only those.

Slices and graphs are ``torch.compile``-able and ``torch.export``-able; a stopped trunk runs eagerly.
In every way the layers after the cut never run and are never saved with the trunk.
"""
from __future__ import annotations

import operator
from typing import Any, Mapping, Optional, Sequence, Union

import torch
import torch.fx
from torch import nn

from .paths import FeaturePathError, resolve_module, unwrap_model
from .penultimate import find_penultimate
from .spec import PENULTIMATE, FeatureSpec


class CutError(ValueError):
    """A cut that cannot be made: a path that does not exist or a layer the forward pass never calls."""


class _Reached(Exception):
    """Raised by the stop hook to end the forward pass at the cut, carrying the feature."""

    def __init__(self, value):
        super().__init__()
        self.value = value


def _as_spec(at: Union[str, FeatureSpec], reduction=None, reduction_kwargs=None) -> FeatureSpec:
    if isinstance(at, FeatureSpec):
        return at
    if not isinstance(at, str) or not at:
        raise TypeError(f"at must be a layer path such as 'layer3' (optionally 'PATH@input' or 'PATH:INDEX') or a "
                        f"FeatureSpec, got {at!r}")
    return FeatureSpec.parse(at, reduction=reduction, reduction_kwargs=reduction_kwargs or {})


def _sequential_chain(model: nn.Module, path: str) -> Optional[list[tuple[nn.Sequential, int]]]:
    """``[(container, index), ...]`` from ``model`` down to the cut when every step is a Sequential child."""
    chain, module = [], model
    for segment in path.split("."):
        if not isinstance(module, nn.Sequential):
            return None
        names = list(module._modules)
        if segment not in names:
            return None
        chain.append((module, names.index(segment)))
        module = module._modules[segment]
    return chain


def _slice(chain: list[tuple[nn.Sequential, int]], capture: str) -> nn.Sequential:
    """The children before (``input``) or up to and including (``output``) the cut, at every depth."""
    parts: list[nn.Module] = []
    for depth, (container, index) in enumerate(chain):
        children = list(container.children())
        last = depth == len(chain) - 1
        stop = index + (1 if last and capture == "output" else 0)
        parts.extend(children[:stop])
    return nn.Sequential(*parts)


class _LeafTracer(torch.fx.Tracer):
    def __init__(self, leaf: str):
        super().__init__()
        self.leaf = leaf

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return qualname == self.leaf or super().is_leaf_module(m, qualname)


def _graph(model: nn.Module, spec: FeatureSpec, path: str) -> Optional[torch.fx.GraphModule]:
    """The traced model cut at ``path``; None when torch.fx cannot trace it or express the selection."""
    try:
        graph = _LeafTracer(path).trace(model)
    except Exception:  # noqa: BLE001 - untraceable models take the stop path
        return None
    calls = [n for n in graph.nodes if n.op == "call_module" and n.target == path]
    if not calls:
        return None
    node = calls[0]
    if spec.capture == "input":
        selectors = spec.select if isinstance(spec.select, tuple) else ((spec.select,) if spec.select is not None
                                                                         else (0,))
        head, rest = selectors[0], selectors[1:]
        if isinstance(head, int) and head < len(node.args):
            value = node.args[head]
        elif isinstance(head, str) and head in node.kwargs:
            value = node.kwargs[head]
        else:
            return None
    else:
        value, rest = node, spec.select if isinstance(spec.select, tuple) else (
            (spec.select,) if spec.select is not None else ())
    with graph.inserting_after(value if isinstance(value, torch.fx.Node) else node):
        for selector in rest:
            value = graph.call_function(operator.getitem, (value, selector))
    for output in [n for n in graph.nodes if n.op == "output"]:
        graph.erase_node(output)
    graph.output(value)
    module = torch.fx.GraphModule(model, graph)
    module.graph.eliminate_dead_code()
    module.delete_all_unused_submodules()  # the layers after the cut: never run, never saved
    module.recompile()
    return module


class Trunk(nn.Module):
    """``model`` run up to the feature ``at``; see the module docstring.

    Args:
        model: the (teacher) model; its parameters are shared, never copied.
        at: the cut: a path shorthand ``"PATH[@input][:SELECT]"``, ``"penultimate"`` or a
            :class:`FeatureSpec` (whose reduction, if any, is applied to the feature).
        example_inputs: positional inputs of one forward pass, needed for ``"penultimate"`` and
            for models only a stop hook can cut.
        reduction / reduction_kwargs: a capture-time reduction applied to the feature (for a string ``at``).
    """

    def __init__(self, model: nn.Module, at: Union[str, FeatureSpec], example_inputs: Optional[Sequence] = None,
                 reduction=None, reduction_kwargs=None):
        super().__init__()
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        spec = _as_spec(at, reduction, reduction_kwargs)
        base = unwrap_model(model)
        examples = None if example_inputs is None else (
            dict(example_inputs) if isinstance(example_inputs, Mapping) else
            tuple(example_inputs if isinstance(example_inputs, (tuple, list)) else (example_inputs,)))
        if spec.path == PENULTIMATE:
            if examples is None:
                raise CutError("at='penultimate' needs example_inputs: the output layer is found by one forward pass")
            output_layer = (find_penultimate(base, **examples) if isinstance(examples, dict)
                            else find_penultimate(base, *examples))
            spec = FeatureSpec(output_layer, capture="input", reduction=spec.reduction,
                               reduction_kwargs=spec.reduction_kwargs)
        try:
            cut, self.path = resolve_module(base, spec.path, name="model")
        except FeaturePathError as e:
            raise CutError(str(e)) from None
        self.__dict__["_cut"] = cut  # not a submodule: its parameters belong to the body (or to no trunk)
        if self.path == "":
            raise CutError("at must name a layer inside the model, not the model itself")
        self.spec, self.at = spec, spec.shorthand
        self._reduce = spec.reduction_fn
        chain = _sequential_chain(base, self.path)
        if chain is not None and spec.select is None:
            self.kind, self.body = "slice", _slice(chain, spec.capture)
        else:
            graph = _graph(base, spec, self.path)
            if graph is not None:
                self.kind, self.body = "graph", graph
            else:
                self.kind, self.body = "stop", base
                self._stop_setup(examples)

    # -- the stop path -----------------------------------------------------------------------
    def _stop_setup(self, examples) -> None:
        self._kept: Optional[set] = None
        if examples is not None:
            reached: set = set()
            names = {m: n for n, m in self.body.named_modules()}
            handles = [m.register_forward_pre_hook(lambda mod, args: reached.add(names[mod]))
                       for m in self.body.modules()]
            try:
                with torch.no_grad():
                    self(**examples) if isinstance(examples, dict) else self(*examples)
            finally:
                for h in handles:
                    h.remove()
            self._kept = reached
        self._register_state_dict_hook(self._drop_unreached)
        self.register_load_state_dict_post_hook(self._ignore_unreached)

    def _unreached(self, key: str, prefix: str) -> bool:
        if self._kept is None or not key.startswith(prefix + "body."):
            return False
        module = key[len(prefix) + len("body."):].rpartition(".")[0]
        return module not in self._kept

    @staticmethod
    def _drop_unreached(self, state, prefix, local_metadata):
        for key in [k for k in state if self._unreached(k, prefix)]:
            del state[key]
        return state

    @staticmethod
    def _ignore_unreached(self, incompatible):
        incompatible.missing_keys[:] = [k for k in incompatible.missing_keys if not self._unreached(k, "")]

    def _stop_hook(self):
        # Registered for the trunk's own forward only: the model shared with it runs whole elsewhere.
        if self.spec.capture == "input":
            def hook(module, args, kwargs):
                raise _Reached((args, kwargs))
            return self._cut.register_forward_pre_hook(hook, with_kwargs=True)

        def hook(module, args, output):
            raise _Reached(output)
        return self._cut.register_forward_hook(hook)

    def _run_stopped(self, *args, **kwargs):
        handle = self._stop_hook()
        try:
            self.body(*args, **kwargs)
        except _Reached as reached:
            value = reached.value
            if self.spec.capture == "input":
                call_args, call_kwargs = value
                head = self.spec.select
                selectors = head if isinstance(head, tuple) else ((head,) if head is not None else (0,))
                first, rest = selectors[0], selectors[1:]
                value = call_args[first] if isinstance(first, int) else call_kwargs[first]
            else:
                selectors = self.spec.select if isinstance(self.spec.select, tuple) else (
                    (self.spec.select,) if self.spec.select is not None else ())
                rest = selectors
            for s in rest:
                value = value[s] if isinstance(s, int) or not hasattr(value, s) else getattr(value, s)
            return value
        finally:
            handle.remove()
        raise CutError(f"the forward pass never called layer {self.path!r} (the cut {self.at!r}): the model does "
                       "not reach it, so nothing can be cut there")

    def forward(self, *args, **kwargs):
        value = self._run_stopped(*args, **kwargs) if self.kind == "stop" else self.body(*args, **kwargs)
        if self._reduce is not None:
            value = self._reduce(value, **self.spec.reduction_kwargs)
        return value

    def extra_repr(self) -> str:
        return f"at={self.at!r}, kind={self.kind!r}"


def trunk(model: nn.Module, at: Union[str, FeatureSpec], example_inputs: Any = None, **kwargs) -> Trunk:
    """:class:`Trunk` of ``model`` cut at ``at`` (see there)."""
    return Trunk(model, at, example_inputs, **kwargs)


__all__ = ["Trunk", "trunk", "CutError"]
