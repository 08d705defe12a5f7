"""Reading the UTF-8 data files of :mod:`distillx.hf.text` and :mod:`distillx.hf.chat`: errors that
name the file and, for its content, the line."""
from __future__ import annotations

import io
import os
from typing import Iterator


def decode(path: str, data: bytes) -> str:
    """``data`` as UTF-8; a ``ValueError`` naming the file, the line and the column of the first byte
    that is not (line ends counted as text mode counts them: ``\n``, ``\r\n`` or ``\r``)."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        before = data[:exc.start].decode("utf-8").replace("\r\n", "\n").replace("\r", "\n")
        line, column = before.count("\n") + 1, len(before) - before.rfind("\n")
        raise ValueError(f"{path}:{line}: not UTF-8 text (byte {data[exc.start]:#04x} at column {column}); save it "
                         "as UTF-8") from None


def check_file(path: str, what: str, expected: str, extensions: tuple[str, ...]) -> str:
    """The lower-case extension of ``path``, one of ``extensions``; else ``FileNotFoundError`` /
    ``IsADirectoryError`` / ``ValueError`` naming ``what`` (``"text file"``), ``path`` and the
    ``expected`` kind of file."""
    if os.path.isdir(path):
        raise IsADirectoryError(f"{what} {path!r} is a directory; expected {expected}")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what} {path!r} does not exist")
    ext = os.path.splitext(path)[1].lower()
    if ext not in extensions:
        raise ValueError(f"{what} {path!r}: expected {expected}, got {ext or 'no extension'!r}")
    return ext


def numbered_lines(path: str) -> Iterator[tuple[int, str]]:
    """``(line number, line)`` of a UTF-8 file, counting from 1, universal newlines, ends kept."""
    with open(path, "rb") as f:
        content = decode(path, f.read())
    # newline=None: the universal newlines of a file opened in text mode
    with io.StringIO(content, newline=None) as f:
        yield from enumerate(f, 1)
