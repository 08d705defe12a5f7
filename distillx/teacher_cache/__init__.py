"""Offline distillation: run the teacher once over a dataset and keep its outputs on disk.

::

    from distillx.teacher_cache import TeacherCache, indexed_loader

    cache = TeacherCache.build_or_open(teacher, train_loader, "cache/teacher", dtype=torch.float16)
    for indices, inputs, targets in indexed_loader(train_loader):       # same shuffling as train_loader
        t = cache.lookup(indices, device="cuda")                          # {"logits": (B, C) float32, ...}
        loss = kd_loss(student(inputs.cuda()), t["logits"], temperature=4.0)

Sample identity: a cached output belongs to dataset item ``i``. :class:`IndexedDataset` makes item
``i`` come out as ``(i, *dataset[i])`` and :func:`indexed_loader` rebuilds a DataLoader around it
with the original sampler (the same object, so the same shuffling), batch size, ``drop_last`` and
collate function, yielding ``(indices, inputs, targets)``; ``cache.lookup(indices)`` then returns
the teacher outputs of exactly those samples. Only map-style datasets have stable indices, so
iterable datasets and plain iterables of batches are refused.

Building: :meth:`TeacherCache.build` runs the teacher once per sample, in ``eval()`` mode under
``torch.no_grad()``, over the loader's dataset in index order (its own non-shuffled loader, same
batch size and collate function, no ``drop_last``: every sample is cached). It stores the logits
``(N, *logit_shape)`` or, with ``top_k=k``, only the ``k`` largest logits and their class indices
``(N, ..., k)``, plus every feature returned by the optional ``capture(inputs)`` callable (a tensor
with the batch as first dim; batch-level statistics cannot be cached per sample and are refused).
Floating-point tensors are stored as ``dtype`` (float16 halves the size; a value that overflows
float16 is an error naming the tensor), integer/bool features keep their dtype, top-k class
indices are stored as int32.

On disk (``directory``)::

    manifest.json          format/version, N, fingerprint, dtype, top_k, per-tensor file/shape/dtype
    000-logits.bin         raw C-order array, shape (N, C), no header (numpy.memmap layout)
    001-<feature>.bin      ...

The data files are raw arrays written and read with :class:`numpy.memmap` (read-only when
opened), so opening a cache loads nothing: :meth:`TeacherCache.lookup` reads only the rows asked
for (numpy fancy indexing on the map copies those rows out) and converts them to float32 tensors
on the requested device (the upcast from float16 happens after the transfer, so half the bytes
move). ``manifest.json`` is written last, atomically (temporary file, fsync, rename), after the
data files were flushed: a directory without a manifest is never a cache, so an interrupted build
is rebuilt by :meth:`TeacherCache.build_or_open`. A build first removes the old manifest, then
unlinks (never truncates) the old data files, so a cache object still open on the old files keeps
reading valid data.

Validity: :meth:`TeacherCache.open` checks the manifest, the data files (present, right size), and
optionally the sample count, the fingerprint and the inputs' hash; any problem is a
:class:`CacheMismatchError` naming what does not match (expected vs found). A cached value depends
on the teacher, on the inputs and on what is captured, so :meth:`TeacherCache.build_or_open` reuses
a cache only when all three match:

- the fingerprint (default :func:`teacher_fingerprint`) hashes the teacher's ``state_dict``
  (names, dtypes, shapes and values; buffers included), its code as far as it can be known (each
  submodule's name, class and ``extra_repr``; each class's source), the dataset length and an
  optional ``extra`` string; :func:`~distillx.teacher_cache.cache_for_run` (``Distiller(cache_teacher=True)``)
  puts the capture points, selections and reductions there. A ``fingerprint=`` string of your own
  replaces the default entirely;
- the inputs' hash (:func:`inputs_fingerprint`): the inputs of every sample in index order, as
  the build batches them (targets left out), stored by the build; ``build_or_open`` recomputes it
  with one pass over the data (no teacher) before reusing a cache, unless ``verify_inputs=False``.

A rebuild deletes only what a teacher cache manifest lists, and of that only files named like its
data files (``NNN-<key>.bin``); a ``manifest.json`` of another format stops the build. Caches of
format version 1 (no inputs' hash) are rebuilt.

Concurrency: building is not locked. With several processes (DDP ranks) build on one rank, wait
(a barrier), then :meth:`TeacherCache.open` everywhere.
"""
from __future__ import annotations

from .cache import TeacherCache
from .fingerprint import inputs_fingerprint, teacher_fingerprint
from .for_run import cache_for_run
from .indexed import IndexedDataset, indexed_loader
from .storage import FORMAT, FORMAT_VERSION, MANIFEST, CacheMismatchError

__all__ = ["TeacherCache", "cache_for_run", "CacheMismatchError", "IndexedDataset", "indexed_loader", "teacher_fingerprint",
           "inputs_fingerprint",
           "FORMAT", "FORMAT_VERSION", "MANIFEST"]
