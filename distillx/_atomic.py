"""Atomic file writes (checkpoints, caches, metrics, plots): write a temporary file in the target's
directory, then ``os.replace`` it.

A reader (or a crash) sees either the previous file or the complete new one, never a partial write;
on any error the temporary file is removed and the previous file is left untouched.
"""
from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import Iterator
from typing import IO, Union

import torch

PathLike = Union[str, "os.PathLike[str]"]


@contextlib.contextmanager
def atomic_open(path: PathLike, mode: str = "w", encoding: str | None = "utf-8") -> Iterator[IO]:
    """Open a temporary file next to ``path`` for writing; on a clean exit flush, fsync and rename it over ``path``.

    ``mode`` is ``"w"`` (text, ``encoding``) or ``"wb"``. The temporary file is created with mode
    0o666 minus the umask (like a plain ``open``), not the 0o600 of :func:`tempfile.mkstemp`.
    """
    if mode not in ("w", "wb"):
        raise ValueError(f"mode must be 'w' or 'wb', got {mode!r}")
    target = os.path.abspath(os.fspath(path))
    directory, name = os.path.split(target)
    if os.path.isdir(target):
        raise IsADirectoryError(f"{target} is a directory")
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)
    for _ in range(100):
        tmp = os.path.join(directory, f".{name}.{secrets.token_hex(6)}.tmp")
        try:
            fd = os.open(tmp, flags, 0o666)
            break
        except FileExistsError:  # pragma: no cover - 48 random bits colliding
            continue
    else:  # pragma: no cover
        raise FileExistsError(f"could not create a temporary file next to {target}")
    try:
        with os.fdopen(fd, mode, **({} if "b" in mode else {"encoding": encoding, "newline": "\n"})) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def save_atomic(obj, path: PathLike) -> None:
    """``torch.save(obj)`` to ``path`` atomically (see :func:`atomic_open`)."""
    os.makedirs(os.path.dirname(os.path.abspath(os.fspath(path))), exist_ok=True)
    with atomic_open(path, "wb") as f:
        torch.save(obj, f)
