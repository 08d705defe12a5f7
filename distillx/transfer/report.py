"""What a weight transfer did to each student tensor: :class:`TransferReport`."""
from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass, replace
from typing import Any, Iterable, Iterator, Optional

from .errors import TransferError
from .tensors import tied_names, transferable_tensors

#: What can happen to a student tensor, in the order reports list their counts.
#: copied: set to a teacher tensor of the same shape; adapted: set from a teacher tensor of another
#: shape (``how`` says how); sampled: drawn from a distribution fitted to teacher tensors;
#: fitted: solved from teacher outputs (least squares); skipped: left as it was.
ACTIONS = ("copied", "adapted", "sampled", "fitted", "skipped")


@dataclass(frozen=True)
class TensorRecord:
    """The fate of one student tensor.

    ``source``/``source_shape``: the teacher tensor it came from (copied, adapted, sampled) or what
    it was fitted to (fitted). ``how``: the adaptation (``"truncate"``, ``"select-uniform"``,
    ``"svd"``, ``"ridge"``, ...). ``distribution``/``seed``: for sampled tensors. ``reason``: why,
    in words, always set (for skipped tensors, why nothing corresponded).
    """

    name: str
    action: str
    shape: tuple[int, ...]
    reason: str
    kind: str = "parameter"
    source: Optional[str] = None
    source_shape: Optional[tuple[int, ...]] = None
    how: Optional[str] = None
    distribution: Optional[str] = None
    seed: Optional[int] = None

    def __post_init__(self):
        if self.action not in ACTIONS:
            raise ValueError(f"unknown transfer action {self.action!r}; one of {', '.join(ACTIONS)}")
        if not self.reason:
            raise ValueError(f"the record of {self.name!r} needs a reason")
        if self.kind not in ("parameter", "buffer"):
            raise ValueError(f"kind must be 'parameter' or 'buffer', got {self.kind!r}")

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["shape"] = list(self.shape)
        out["source_shape"] = None if self.source_shape is None else list(self.source_shape)
        return out

    def detail(self) -> str:
        """The ``source`` column of :meth:`TransferReport.summary`: where from, and how."""
        if self.action == "skipped":
            return ""
        text = self.source or ""
        if self.source_shape is not None and tuple(self.source_shape) != tuple(self.shape):
            text += f" {_shape(self.source_shape)}->{_shape(self.shape)}"
        if self.how:
            text += f" [{self.how}]"
        if self.distribution:
            text += f" ~ {self.distribution}"
        if self.seed is not None:
            text += f" seed={self.seed}"
        return text.strip()


def _shape(shape: Iterable[int]) -> str:
    return "(" + ",".join(str(int(d)) for d in shape) + ")"


class TransferReport:
    """One record per student tensor: what a weight transfer did to it and why.

    Strategies create it with the student's tensor names (:meth:`for_model`), then call
    :meth:`copied`, :meth:`adapted`, :meth:`sampled`, :meth:`fitted` or :meth:`skipped` once per
    tensor. :meth:`check_complete` verifies that every expected name got exactly one record;
    :func:`distillx.transfer` calls it before it accepts a strategy's result.

    Tied tensors (``aliases``: ``{alias: first name}``, e.g. ``{"head.weight": "emb.weight"}``) are
    one tensor, written once under its first name; recording that name also records every alias,
    with the same action and source and a reason saying it is tied, so the report has one honest
    row per name (:meth:`for_model` finds the aliases of a model).

    >>> print(report)                      # doctest: +SKIP  (the summary table)
    >>> report.counts()["copied"]          # doctest: +SKIP
    >>> json.dumps(report.to_dict())       # doctest: +SKIP
    """

    def __init__(self, strategy: str, expected: Iterable[str] = (), kinds: Optional[dict[str, str]] = None,
                 aliases: Optional[dict[str, str]] = None):
        self.strategy = strategy
        self.expected: tuple[str, ...] = tuple(expected)
        self._kinds = dict(kinds or {})
        self.aliases: dict[str, str] = dict(aliases or {})  # tied tensors: {alias: first name}
        self.records: list[TensorRecord] = []
        self.notes: list[str] = []  # strategy-wide remarks (the ridge used, the layer map, ...)
        # what a data-aware strategy measured, JSON-ready: {"layers": {stack: {...}}, "heads": ..., ...}
        self.importance: dict[str, Any] = {}

    @classmethod
    def for_model(cls, strategy: str, student) -> "TransferReport":
        """An empty report expecting every name of every tensor of
        :func:`~distillx.transfer.tensors.transferable_tensors` (tied tensors under all their names)."""
        tensors = transferable_tensors(student, aliases=True)
        return cls(strategy, tensors, {name: kind for name, (_, kind) in tensors.items()}, tied_names(student))

    # -- recording -----------------------------------------------------------------------------
    def add(self, record: TensorRecord) -> TensorRecord:
        """Append ``record``, and one record per alias of its tensor (tied names share its fate)."""
        self.records.append(record)
        for alias, first in self.aliases.items():
            if first == record.name:
                why = f"tied to {first!r} (the same tensor, written once: it holds what {first!r} got): {record.reason}"
                self.records.append(replace(record, name=alias, reason=why, kind=self._kinds.get(alias, record.kind)))
        return record

    def _record(self, name: str, action: str, shape, reason: str, **fields: Any) -> TensorRecord:
        shape = tuple(int(d) for d in shape)
        if fields.get("source_shape") is not None:
            fields["source_shape"] = tuple(int(d) for d in fields["source_shape"])
        return self.add(TensorRecord(name, action, shape, reason, kind=self._kinds.get(name, "parameter"), **fields))

    def copied(self, name: str, shape, source: str, reason: str = "same shape") -> TensorRecord:
        return self._record(name, "copied", shape, reason, source=source, source_shape=shape)

    def adapted(self, name: str, shape, source: str, source_shape, how: str, reason: str) -> TensorRecord:
        return self._record(name, "adapted", shape, reason, source=source, source_shape=source_shape, how=how)

    def sampled(self, name: str, shape, source: str, source_shape, distribution: str, seed: Optional[int],
                reason: str) -> TensorRecord:
        return self._record(name, "sampled", shape, reason, source=source, source_shape=source_shape,
                            distribution=distribution, seed=seed)

    def fitted(self, name: str, shape, source: str, how: str, reason: str) -> TensorRecord:
        return self._record(name, "fitted", shape, reason, source=source, how=how)

    def skipped(self, name: str, shape, reason: str) -> TensorRecord:
        return self._record(name, "skipped", shape, reason)

    # -- reading -------------------------------------------------------------------------------
    def __iter__(self) -> Iterator[TensorRecord]:
        return iter(self.records)

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, name: str) -> TensorRecord:
        for record in self.records:
            if record.name == name:
                return record
        raise KeyError(f"no record for {name!r} in the {self.strategy!r} transfer report")

    def names(self, action: Optional[str] = None) -> list[str]:
        """Recorded tensor names, all or those with ``action``."""
        if action is not None and action not in ACTIONS:
            raise ValueError(f"unknown action {action!r}; one of {', '.join(ACTIONS)}")
        return [r.name for r in self.records if action is None or r.action == action]

    def counts(self) -> dict[str, int]:
        """``{action: number of tensors}`` for every action in :data:`ACTIONS` (zeros included)."""
        counter = Counter(r.action for r in self.records)
        return {action: counter.get(action, 0) for action in ACTIONS}

    @property
    def transferred(self) -> int:
        """Number of tensors that received something from the teacher (every action but skipped)."""
        return sum(1 for r in self.records if r.action != "skipped")

    def problems(self) -> list[str]:
        """Why the report is incomplete: expected names without a record, duplicates, unknown names."""
        counts = Counter(r.name for r in self.records)
        expected = set(self.expected)
        problems = []
        missing = [n for n in self.expected if n not in counts]
        if missing:
            problems.append(f"no record for {len(missing)} student tensor(s): {', '.join(missing)}")
        duplicated = [n for n, c in counts.items() if c > 1]
        if duplicated:
            problems.append(f"more than one record for: {', '.join(duplicated)}")
        unknown = [n for n in counts if n not in expected]
        if unknown:
            problems.append(f"records for names that are not student tensors: {', '.join(unknown)}")
        return problems

    @property
    def complete(self) -> bool:
        """Every expected student tensor is named by exactly one record, and nothing else is."""
        return not self.problems()

    def check_complete(self) -> "TransferReport":
        """Return ``self`` if :attr:`complete`, else raise :class:`TransferError` listing the problems."""
        problems = self.problems()
        if problems:
            raise TransferError(f"weight transfer {self.strategy!r} returned an incomplete report: "
                                + "; ".join(problems))
        return self

    # -- output --------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable: strategy, counts, completeness, notes and one dict per tensor."""
        return {
            "strategy": self.strategy,
            "counts": self.counts(),
            "complete": self.complete,
            "notes": list(self.notes),
            "importance": self.importance,
            "tensors": [r.to_dict() for r in self.records],
        }

    def headline(self) -> str:
        counts = ", ".join(f"{n} {a}" for a, n in self.counts().items() if n or a in ("copied", "skipped"))
        return f"weight transfer {self.strategy!r}: {counts} ({len(self.records)} tensors)"

    def summary(self) -> str:
        """A readable table, one row per student tensor: name, shape, action, source, reason."""
        header = ("student tensor", "shape", "action", "source", "reason")
        rows = [(r.name + ("" if r.kind == "parameter" else " (buffer)"), _shape(r.shape), r.action,
                 r.detail(), r.reason) for r in self.records]
        widths = [max([len(h)] + [len(row[i]) for row in rows]) for i, h in enumerate(header[:-1])]

        def line(row) -> str:
            return "  ".join(cell.ljust(w) for cell, w in zip(row, widths)) + "  " + row[-1]

        lines = [self.headline(), line(header), line(tuple("-" * w for w in widths) + ("-" * 6,))]
        lines += [line(row) for row in rows]
        lines += [f"note: {note}" for note in self.notes]
        if not self.complete:
            lines.append("INCOMPLETE: " + "; ".join(self.problems()))
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.summary()

    def __repr__(self) -> str:
        counts = ", ".join(f"{a}={n}" for a, n in self.counts().items())
        return f"TransferReport({self.strategy!r}, {counts})"
