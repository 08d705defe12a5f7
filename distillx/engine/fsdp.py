"""FSDP2 for students too big to replicate (``Distiller(strategy="fsdp")``).

Sharding: :func:`shard` applies ``torch.distributed.fsdp.fully_shard`` to each block of a model (the
modules of its longest ``nn.ModuleList``, the transformer layers; else its top-level children that
hold parameters) and then to the model itself, so a block's parameters are gathered only while it
runs. The student, and every method module that holds parameters (adapters), are sharded this way;
the teacher is replicated in ``eval()``, or sharded too with ``shard_teacher=True`` (gathered block by
block for its forward passes, freed after). Mixed precision is FSDP2's policy
(``MixedPrecisionPolicy(param_dtype=..., reduce_dtype=float32)``), not autocast.

Checkpoints: :func:`save` writes the student's and the methods' sharded state and the optimizer's as
a ``torch.distributed.checkpoint`` directory (every rank writes its shards), a new one per position:
``checkpoint.pt``, written atomically after it, names the complete one, and :func:`prune` then removes
the others, so an interruption mid-save leaves the previous checkpoint whole. :func:`load` reads it
back into any world size (also into one process without a process group, into plain modules).
"""
from __future__ import annotations

import os
import shutil
from typing import Any, Optional

import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor

DCP_DIR = "checkpoint.dcp"  # the sharded part of a checkpoint, beside checkpoint.pt


def blocks(model: nn.Module) -> list[nn.Module]:
    """The units to shard: the modules of the model's longest ModuleList (its layer stack), else its
    top-level children that hold parameters."""
    lists = [m for m in model.modules() if isinstance(m, nn.ModuleList) and len(m) > 0]
    if lists:
        return list(max(lists, key=len))
    return [child for child in model.children() if any(True for _ in child.parameters())]


def shard(model: nn.Module, param_dtype: Optional[torch.dtype] = None, reshard_after_forward: bool = True
          ) -> nn.Module:
    """``model`` with ``fully_shard`` on each of its :func:`blocks` and on itself (in place)."""
    policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32 if param_dtype else None)
    for block in blocks(model):
        fully_shard(block, mp_policy=policy, reshard_after_forward=reshard_after_forward)
    fully_shard(model, mp_policy=policy, reshard_after_forward=reshard_after_forward)
    return model


def full_state_dict(module: nn.Module) -> dict:
    """``module``'s whole state on CPU: gathered from every rank when it is sharded (then every rank
    must call it), else its plain ``state_dict``."""
    if any(isinstance(p, DTensor) for p in module.parameters()):
        return get_model_state_dict(module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return {k: v.detach().cpu() for k, v in module.state_dict().items()}


def has_parameters(module: nn.Module) -> bool:
    return any(True for _ in module.parameters())


def shard_leaves(module: nn.Module, param_dtype: Optional[torch.dtype] = None) -> nn.Module:
    """``fully_shard`` on every submodule of ``module`` that holds parameters of its own (the layers of
    a method's adapters, which the method calls as modules inside its loss)."""
    policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32 if param_dtype else None)
    for sub in module.modules():
        if any(True for _ in sub.parameters(recurse=False)):
            fully_shard(sub, mp_policy=policy)
    return module


def _state(modules: dict[str, nn.Module], optimizer) -> dict[str, Any]:
    options = StateDictOptions(ignore_frozen_params=False)
    state = {name: get_model_state_dict(m, options=options) for name, m in modules.items()}
    if optimizer is not None:
        state["optimizer"] = get_optimizer_state_dict(_Named(modules), optimizer, options=options)
    return state


class _Named(nn.Module):
    """The checkpointed modules under one root, so the optimizer's state is keyed by their names."""

    def __init__(self, modules: dict[str, nn.Module]):
        super().__init__()
        for name, m in modules.items():
            self.add_module(name, m)


def save(directory: str, name: str, modules: dict[str, nn.Module], optimizer) -> str:
    """Write the modules' and the optimizer's (sharded) state to ``directory/name`` (every rank calls it)."""
    path = os.path.join(directory, name)
    dcp.save(_state(modules, optimizer), checkpoint_id=path)
    return name


def prune(directory: str, keep: str) -> None:
    """Remove the sharded checkpoints in ``directory`` other than ``keep`` (rank 0, after the file
    naming ``keep`` was written)."""
    for entry in os.listdir(directory):
        if entry.startswith(DCP_DIR) and entry != keep:
            shutil.rmtree(os.path.join(directory, entry), ignore_errors=True)


def load(directory: str, name: str, modules: dict[str, nn.Module], optimizer) -> None:
    """Read ``directory/name`` into the modules and the optimizer, whatever the world size it was
    written at."""
    path = os.path.join(directory, name)
    state = _state(modules, optimizer)
    dcp.load(state, checkpoint_id=path)
    for name, m in modules.items():
        set_model_state_dict(m, state[name])
    if optimizer is not None:
        set_optimizer_state_dict(_Named(modules), optimizer, state["optimizer"])


__all__ = ["blocks", "shard", "shard_leaves", "save", "load", "prune", "DCP_DIR", "has_parameters",
           "full_state_dict"]
