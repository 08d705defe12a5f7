"""Examples from a local ``datasets`` source, never the Hub: ``datasets.load_dataset`` with a file
builder (``"json"``, ``"parquet"``, ``"csv"``, ``"text"``, ``"arrow"``) and local ``data_files``, or
``datasets.load_from_disk`` of a directory written by ``save_to_disk`` (the ``datasets`` extra:
``pip install 'distillx[datasets]'``). A path that is neither is refused, so a typo cannot turn into
a download.
"""
from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any, Optional, Union

BUILDERS = ("json", "parquet", "csv", "text", "arrow")
DataFiles = Union[str, Sequence[str], Mapping[str, Union[str, Sequence[str]]]]


def _datasets():
    try:
        import datasets
    except ImportError as exc:
        raise ImportError(f"[data.dataset] needs the datasets package: pip install 'distillx[datasets]' ({exc})") from None
    return datasets


def _files(data_files: Any, key: str) -> list[str]:
    """Every file ``data_files`` names (a path, a list, or a split -> path(s) mapping), each checked
    to be a local file (a URL or a missing file is an error naming ``key``)."""
    if isinstance(data_files, str):
        names = [data_files]
    elif isinstance(data_files, Mapping):
        names = [f for v in data_files.values() for f in ([v] if isinstance(v, str) else list(v))]
    elif isinstance(data_files, Sequence):
        names = list(data_files)
    else:
        raise TypeError(f"{key} must be a path, a list of paths or a table of split -> path(s), got "
                        f"{type(data_files).__name__}")
    if not names:
        raise ValueError(f"{key} names no file")
    for name in names:
        if not isinstance(name, str) or not name:
            raise TypeError(f"{key} must hold paths (strings), got {name!r}")
        if "://" in name:
            raise ValueError(f"{key}: {name!r} is a URL; distillx reads local files only (download it first)")
        if not os.path.isfile(name):
            raise FileNotFoundError(f"{key}: {name!r} is not a file")
    return names


def load_local(path: str, data_files: Optional[DataFiles] = None, split: str = "train", key: str = "data.dataset"):
    """The ``split`` of a local dataset (a ``datasets.Dataset``); errors name ``key`` and what was expected."""
    if not isinstance(path, str) or not path:
        raise TypeError(f"{key}.path must be a file builder ({', '.join(BUILDERS)}) or a dataset directory, got {path!r}")
    if not isinstance(split, str) or not split:
        raise TypeError(f"{key}.split must be a split name such as 'train', got {split!r}")
    datasets = _datasets()
    if path in BUILDERS:
        if data_files is None:
            raise ValueError(f"{key}: path = {path!r} reads local files: give data_files = \"train.{path}\" (or a "
                             "list, or a table of split -> files)")
        _files(data_files, f"{key}.data_files")
        try:
            loaded = datasets.load_dataset(path, data_files=data_files)
        except Exception as exc:  # noqa: BLE001 - datasets' own errors (a malformed file) name neither key nor file
            raise ValueError(f"{key}: datasets.load_dataset({path!r}, data_files={data_files!r}) failed: "
                             f"{type(exc).__name__}: {exc}") from exc
    elif os.path.isdir(path):
        if data_files is not None:
            raise ValueError(f"{key}: data_files is for path = {' | '.join(map(repr, BUILDERS))}; {path!r} is a "
                             "dataset directory (save_to_disk) and holds its own files")
        if not any(os.path.isfile(os.path.join(path, f)) for f in ("dataset_info.json", "dataset_dict.json",
                                                                    "state.json")):
            raise ValueError(f"{key}.path: {path!r} is a directory but not a saved dataset (save_to_disk writes "
                             "dataset_dict.json or state.json there); for files use path = \"json\"/\"parquet\" "
                             "with data_files")
        loaded = datasets.load_from_disk(path)
    else:
        raise ValueError(f"{key}.path must be one of {', '.join(map(repr, BUILDERS))} (with data_files) or a "
                         f"local dataset directory (save_to_disk); {path!r} is neither (distillx never loads from "
                         "the Hub)")
    if isinstance(loaded, Mapping):  # a DatasetDict
        if split not in loaded:
            raise ValueError(f"{key}.split: {split!r} is not a split of {path!r}; its splits: "
                             f"{', '.join(map(repr, loaded))}")
        loaded = loaded[split]
    elif split != "train" and path in BUILDERS:
        raise ValueError(f"{key}.split: {path!r} has no split {split!r}")
    return loaded


def dataset_texts(path: str, data_files: Optional[DataFiles] = None, split: str = "train", text_field: str = "text",
                  key: str = "data.dataset") -> list[str]:
    """The strings of column ``text_field`` of :func:`load_local`'s split; a missing column, an
    empty split or a value that is not a string is an error naming the key (and the row)."""
    dataset = load_local(path, data_files, split, key)
    columns = list(getattr(dataset, "column_names", None) or [])
    if text_field not in columns:
        raise ValueError(f"{key}.text_field: {text_field!r} is not a column of {path!r} (split {split!r}); its "
                         f"columns: {', '.join(map(repr, columns)) or 'none'}")
    texts = list(dataset[text_field])
    if not texts:
        raise ValueError(f"{key}: split {split!r} of {path!r} holds no examples")
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise ValueError(f"{key}.text_field: row {i} of column {text_field!r} is {type(text).__name__}, "
                             "expected a string")
    return texts


__all__ = ["BUILDERS", "load_local", "dataset_texts"]
