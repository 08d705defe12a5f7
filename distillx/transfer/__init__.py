"""Built-in weight-transfer strategies.

This module is the built-in transfers plugin (registered as ``distillx.transfer``). It implements
the registration hook already, so built-ins go through the same path as third-party strategies;
the strategies themselves (direct, distribution, selection, least-squares head) are not written
yet, so it registers none.
"""
from __future__ import annotations

from ..plugin.hookspecs import hookimpl

BUILTIN_TRANSFERS: dict = {}  # name -> strategy (teacher, student, **options) -> TransferReport


@hookimpl
def distillx_register_weight_transfers(registry):
    for name, strategy in BUILTIN_TRANSFERS.items():
        registry.add(name, strategy)
