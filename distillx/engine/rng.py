"""The random state exact resumption needs: what distillx captures, where it finds it, what it refuses.

Captured (saved in every checkpoint, restored on resume):

* torch's global CPU generator (and the CUDA generators once CUDA is initialised), Python's global
  ``random`` and NumPy's global ``numpy.random`` (when NumPy has been imported): whatever a model,
  a dataset's ``__getitem__``, a collate function or a sampler without a generator of its own draws;
* the augmentation generator of the Distiller;
* every ``torch.Generator`` :func:`loader_generators` finds in a data loader.

Where it looks (:func:`loader_generators`): the loader object itself and, recursively, every public
attribute of a searched object that is a ``DataLoader``, a ``Sampler`` (a ``BatchSampler``, a
``RandomSampler``, a sampler passed as ``sampler=`` or ``batch_sampler=``, a sampler inside a
custom sampler), a ``Dataset``, or any other object with ``__iter__`` (a wrapper around a loader),
including the items of a list, tuple or dict attribute of up to 256 items. So a generator held as
``loader.generator``, ``loader.sampler.generator``, ``loader.batch_sampler.sampler.generator`` or
``loader.sampler.sampler.generator`` (a ``BatchSampler`` given as ``sampler=``, as
:func:`distillx.data.tensor_loader` does), or deeper, is found. Private attributes (``_name``) are not
searched.

Cannot capture: a random-number generator of another kind held by one of those objects: a
``numpy.random.RandomState``, ``numpy.random.Generator`` or ``BitGenerator``, or a
``random.Random`` instance. Its state is not saved, so a resumed run would draw different numbers;
:func:`check_capturable` refuses such a loader (naming the attribute and its type) when a run writes
or reads checkpoints. Use a ``torch.Generator`` there instead. Randomness a worker process draws from
its own state across epochs (``persistent_workers=True`` with a dataset that draws random numbers)
is not captured either: with persistent workers, draw per-sample randomness from a generator seeded
per epoch or index.

All states are stored as tensors and plain Python values, so a checkpoint loads with
``torch.load(weights_only=True)``.
"""
from __future__ import annotations

import random
import sys
from typing import Any, Iterable, Iterator, Optional

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

MAX_ITEMS = 256  # list/tuple/dict attributes longer than this are not searched


def _numpy():
    return sys.modules.get("numpy")  # only if something imported it: no numpy dependency


def foreign_rng(value: Any) -> bool:
    """A random-number generator whose state distillx does not save."""
    if isinstance(value, random.Random):
        return True
    np = _numpy()
    if np is None:
        return False
    kinds = tuple(getattr(np.random, k) for k in ("RandomState", "Generator", "BitGenerator") if hasattr(np.random, k))
    return isinstance(value, kinds)


def _searched(value: Any) -> bool:
    if isinstance(value, (DataLoader, Sampler, Dataset)):
        return True
    if isinstance(value, (torch.Tensor, str, bytes, type)) or callable(value) and not hasattr(value, "__iter__"):
        return False
    return hasattr(type(value), "__iter__") and hasattr(value, "__dict__") and not isinstance(value, (dict, list, tuple))


def _children(obj: Any, path: str) -> Iterator[tuple[str, Any]]:
    attributes = getattr(obj, "__dict__", None)
    if not isinstance(attributes, dict):
        return
    for name, value in list(attributes.items()):
        if name.startswith("_"):
            continue
        if isinstance(value, (list, tuple)) and len(value) <= MAX_ITEMS:
            yield from ((f"{path}.{name}[{i}]", v) for i, v in enumerate(value))
        elif isinstance(value, dict) and len(value) <= MAX_ITEMS:
            yield from ((f"{path}.{name}[{k!r}]", v) for k, v in value.items())
        else:
            yield f"{path}.{name}", value


def _walk(loader: Any, name: str) -> tuple[list[torch.Generator], list[tuple[str, Any]]]:
    """The torch generators found in ``loader`` and the (path, rng) pairs that cannot be captured."""
    generators: list[torch.Generator] = []
    foreign: list[tuple[str, Any]] = []
    seen: set[int] = set()
    stack = [(name, loader)]
    while stack:
        path, obj = stack.pop(0)
        if obj is None or id(obj) in seen:
            continue
        seen.add(id(obj))
        if isinstance(obj, torch.Generator):
            generators.append(obj)
        elif foreign_rng(obj):
            foreign.append((path, obj))
        elif path == name or _searched(obj):
            stack.extend(_children(obj, path))
    return generators, foreign


def loader_generators(*loaders: Any) -> list[torch.Generator]:
    """Every ``torch.Generator`` the loaders hold (see the module docstring), each once, in a fixed order."""
    found: list[torch.Generator] = []
    for loader in loaders:
        for g in _walk(loader, "loader")[0]:
            if all(g is not h for h in found):
                found.append(g)
    return found


def check_capturable(loader: Any, name: str) -> None:
    """Refuse a loader holding random state distillx cannot save (``ValueError`` naming where and what)."""
    if loader is None:
        return
    foreign = _walk(loader, name)[1]
    if foreign:
        where = ", ".join(f"{path} ({type(rng).__module__}.{type(rng).__qualname__})" for path, rng in foreign)
        raise ValueError(
            f"{name} draws from random state distillx cannot save in a checkpoint: {where}. A run resumed from a "
            "checkpoint would draw different numbers there and not continue exactly. Give that sampler/loader a "
            "torch.Generator instead (e.g. torch.Generator().manual_seed(seed)): distillx saves and restores every "
            "torch.Generator it finds in the loader")


# -- states ----------------------------------------------------------------------------------------
def _numpy_state(np) -> dict:
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {"name": str(name), "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
            "has_gauss": int(has_gauss), "cached_gaussian": float(cached)}


def _set_numpy_state(np, state: dict) -> None:
    np.random.set_state((state["name"], state["keys"].numpy().astype(np.uint32), state["pos"], state["has_gauss"],
                         state["cached_gaussian"]))


def rng_state(extra: Iterable[torch.Generator] = ()) -> dict:
    """Every generator's state (torch CPU/CUDA, Python, NumPy if imported, and ``extra``), as tensors
    and plain Python values."""
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "extra": [g.get_state() for g in extra]}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    np = _numpy()
    if np is not None:
        state["numpy"] = _numpy_state(np)
    return state


def set_rng_state(state: dict, extra: Iterable[torch.Generator] = (), error: type = ValueError) -> None:
    """Restore what :func:`rng_state` returned; ``error`` (the checkpoint's error type) when the
    number of ``extra`` generators differs from the saved run's."""
    extra = list(extra)
    if len(extra) != len(state["extra"]):
        raise error(f"the checkpoint saved {len(state['extra'])} data/augmentation generator(s) but this run has "
                    f"{len(extra)}: the data loaders or augmentations differ from the saved run")
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    np = _numpy()
    if "numpy" in state and np is not None:
        _set_numpy_state(np, state["numpy"])
    for g, s in zip(extra, state["extra"]):
        g.set_state(s)


def check_state(state: Any, where: str) -> Optional[str]:
    """What is wrong with a saved :func:`rng_state`, or ``{"ranks": [state, ...]}`` (every rank's, under
    several processes), None when nothing."""
    if not isinstance(state, dict):
        return f"{where} is a {type(state).__name__}, not a random state"
    if set(state) == {"ranks"}:
        if not isinstance(state["ranks"], list) or not state["ranks"]:
            return f"{where}.ranks is not a non-empty list of random states"
        return next((p for i, s in enumerate(state["ranks"]) if (p := check_state(s, f"{where}.ranks[{i}]"))), None)
    missing = [k for k in ("torch", "python", "extra") if k not in state]
    if missing:
        return f"{where} lacks {', '.join(missing)}"
    if not isinstance(state["torch"], torch.Tensor) or state["torch"].dtype != torch.uint8:
        return f"{where}.torch is not a uint8 tensor"
    python = state["python"]
    if not (isinstance(python, tuple) and len(python) == 3 and isinstance(python[1], tuple)):
        return f"{where}.python is not a state of Python's random module"
    if not isinstance(state["extra"], list) or not all(isinstance(s, torch.Tensor) for s in state["extra"]):
        return f"{where}.extra is not a list of generator states"
    numpy = state.get("numpy")
    if numpy is not None and not (isinstance(numpy, dict) and isinstance(numpy.get("keys"), torch.Tensor)
                                  and {"name", "pos", "has_gauss", "cached_gaussian"} <= set(numpy)):
        return f"{where}.numpy is not a NumPy random state"
    return None
