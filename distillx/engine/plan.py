"""Which features each method needs, how they map to the two models' extractors, and their views;
which output layers a step may skip."""
from __future__ import annotations

import contextlib
from typing import Iterator, Optional, Sequence

import torch
from torch import nn

from ..features import (FeatureExtractor, FeaturePathError, FeatureSpec, MissingFeatureError, resolve_module,
                        unwrap_model)
from ..features.spec import PENULTIMATE
from ..methods import Method

SIDES = ("student", "teacher")


class FeaturePlan:
    """Which features each method needs, how they map to the two extractors, and their views.

    Capture keys are ``"<method key>.<request key>"``; a request identical to an earlier one (same
    path, capture, selection and reduction on that side) reuses the earlier capture. Each method is
    bound to the models first (:meth:`Method.bind`: layers, heads and output layers found in them).
    """

    def __init__(self, teacher: nn.Module, student: nn.Module, methods: Sequence[Method], keys: Sequence[str],
                 teacher_extra: Optional[dict] = None):
        """``teacher_extra``: further teacher captures {key: FeatureSpec} no method asked for (the
        feature a student consumes, ``Distiller(student_input=...)``)."""
        self.models = {"student": student, "teacher": teacher}
        self.keys = list(keys)
        for mkey, m in zip(keys, methods):
            try:
                m.bind(unwrap_model(student), unwrap_model(teacher))
            except (TypeError, ValueError, LookupError) as e:
                if str(e).startswith("method "):
                    raise
                raise type(e)(f"method {mkey!r}: {e}") from None
        # side -> output layers some method applies itself (skipped when no term reads that side's logits)
        self.heads: dict[str, list[nn.Module]] = {side: [] for side in SIDES}
        for m in methods:
            for side, path in m.output_layers().items():
                module = resolve_module(student if side == "student" else teacher, path, name=side)[0]
                if all(module is not h for h in self.heads[side]):
                    self.heads[side].append(module)
        self.requests: list[list] = []
        # per method: {side: {request key: capture key}}
        self.maps: list[dict[str, dict[str, str]]] = []
        specs: dict[str, dict[str, FeatureSpec]] = {side: {} for side in SIDES}
        self.paths: dict[str, dict[str, str]] = {side: {} for side in SIDES}  # capture key -> layer path
        for mkey, m in zip(keys, methods):
            requests = list(m.features())
            self.requests.append(requests)
            mapping: dict[str, dict[str, str]] = {side: {} for side in SIDES}
            seen_keys = set()
            for req in requests:
                if req.key == "logits":
                    raise ValueError(f"method {mkey!r}: feature key 'logits' is reserved for the model outputs")
                if req.key in seen_keys:
                    raise ValueError(f"method {mkey!r}: two feature requests share the key {req.key!r}")
                seen_keys.add(req.key)
                for side in SIDES:
                    try:
                        spec = FeatureSpec.from_request(req, side)
                    except (TypeError, ValueError) as e:
                        raise type(e)(f"method {mkey!r}, feature {req.key!r}: bad {side} request "
                                      f"{req.path(side)!r}: {e}") from None
                    if spec.path != PENULTIMATE:
                        try:
                            resolve_module(self.models[side], spec.path, name=side)
                        except FeaturePathError as e:
                            raise FeaturePathError(f"method {mkey!r}, feature {req.key!r}: unknown {side} layer "
                                                   f"{spec.path!r}: {e}") from None
                    bare = spec.with_key("_")
                    existing = next((k for k, v in specs[side].items() if v.with_key("_") == bare), None)
                    if existing is None:
                        existing = f"{mkey}.{req.key}"
                        specs[side][existing] = spec.with_key(existing)
                        self.paths[side][existing] = spec.shorthand
                    mapping[side][req.key] = existing
            self.maps.append(mapping)
        for key, spec in (teacher_extra or {}).items():
            specs["teacher"][key] = spec.with_key(key)
            self.paths["teacher"][key] = spec.shorthand
        self.teacher_extra = dict(teacher_extra or {})
        self.extractors: dict[str, Optional[FeatureExtractor]] = {
            side: FeatureExtractor(self.models[side], specs[side], name=side, detach=side == "teacher")
            if specs[side] else None for side in SIDES}

    def capture_keys(self, side: str) -> list[str]:
        """The capture keys of one side's extractor (what a teacher cache must hold besides logits)."""
        ex = self.extractors[side]
        return sorted(ex.specs) if ex is not None else []

    def describe(self, side: str) -> str:
        """One side's captures as a stable string, ``key=identity`` per line (a teacher cache's
        fingerprint records it: a changed layer, selection or reduction is another cache)."""
        ex = self.extractors[side]
        return "\n".join(f"{k}={ex.specs[k].identity}" for k in self.capture_keys(side)) if ex is not None else ""

    def attach(self) -> None:
        for ex in self.extractors.values():
            if ex is not None and not ex.attached:
                ex.attach()

    def close(self) -> None:
        for ex in self.extractors.values():
            if ex is not None:
                ex.close()
                ex.clear()

    def collect(self, side: str) -> dict:
        ex = self.extractors[side]
        if ex is None:
            return {}
        try:
            return ex.collect()
        except MissingFeatureError as e:
            users = []
            for mkey, mapping in zip(self.keys, self.maps):
                for rkey, ckey in mapping[side].items():
                    try:
                        ex[ckey]
                    except MissingFeatureError:
                        users.append(f"method {mkey!r} (feature {rkey!r}, {side} layer {self.paths[side][ckey]!r})")
            if side == "teacher":
                for key, spec in self.teacher_extra.items():
                    try:
                        ex[key]
                    except MissingFeatureError:
                        users.append(f"the student, which consumes the teacher feature {spec.shorthand!r} (the "
                                     "teacher's forward pass never reached that layer)")
            raise MissingFeatureError(f"{e}. Needed by: {'; '.join(users)}") from None

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """While active, neither model's hooks capture anything (a model called to sample a
        completion between two training forward passes)."""
        with contextlib.ExitStack() as stack:
            for ex in self.extractors.values():
                if ex is not None:
                    stack.enter_context(ex.paused())
            yield

    @contextlib.contextmanager
    def skipping(self, side: str, skip: bool) -> Iterator[None]:
        """While active (and ``skip``), ``side``'s output layers named by methods do not compute: they
        return an empty (..., 0) tensor. Their forward hooks still run, so their inputs are captured."""
        modules = self.heads[side] if skip else []
        saved = [(m, m.__dict__.get("forward")) for m in modules]
        for m in modules:
            m.forward = _skipped
        try:
            yield
        finally:
            for m, forward in saved:
                if forward is None:
                    del m.forward
                else:
                    m.forward = forward

    def views(self, i: int, student_logits, student_feats, teacher_logits, teacher_feats):
        """The ``(student, teacher)`` dicts method ``i`` receives, under its own keys (``"logits"``
        only where the model produced them)."""
        s = {} if student_logits is None else {"logits": student_logits}
        t = {} if teacher_logits is None else {"logits": teacher_logits}
        for rkey, ckey in self.maps[i]["student"].items():
            s[rkey] = student_feats[ckey]
        for rkey, ckey in self.maps[i]["teacher"].items():
            t[rkey] = teacher_feats[ckey]
        return s, t

    def non_finite(self, i: int, outs) -> Optional[str]:
        """Where method ``i``'s inputs hold NaN/inf, teacher first, or None."""
        student_logits, student_feats, teacher_logits, teacher_feats = outs
        for side, logits, feats in (("teacher", teacher_logits, teacher_feats),
                                    ("student", student_logits, student_feats)):
            for rkey, ckey in self.maps[i][side].items():
                value = feats[ckey]
                if isinstance(value, torch.Tensor) and value.is_floating_point() and not bool(torch.isfinite(value).all()):
                    return (f"the {side} feature {rkey!r} captured at {side} layer {self.paths[side][ckey]!r} "
                            "holds NaN/inf values")
            if logits is not None and not bool(torch.isfinite(logits).all()):
                return f"the {side} logits hold NaN/inf values"
        return None


def _skipped(*args, **kwargs) -> torch.Tensor:
    """The forward of a skipped output layer: (..., 0) of its input, no computation."""
    x = args[0] if args else next(iter(kwargs.values()))
    return x.new_empty((*x.shape[:-1], 0))
