"""RouterParts: the one record of what a router is made of (what a checkpoint holds, what a change replaces).

Checked once when built: a checkpoint reader, a lifecycle change and Router.from_parts all go through
the same consistency rules (unique names, a gate that fits the experts, stats for every expert).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from moe_router.checks import check_bool, check_decide_weight, check_prior_weight, check_real, ensure_unique
from moe_router.embed.base import Embedder
from moe_router.gate.model import Gate
from moe_router.index.expert import Expert
from moe_router.routing.backends import ExpertBackend, LocalBackend
from moe_router.routing.stats import RoutingStats
from moe_router.store import MetadataStore
from moe_router.vectors import as_matrix, check_dim, check_metric


def check_abstain_threshold(value: Any) -> float | None:
    """None (no abstention) or a finite in-scope score threshold."""
    if value is None:
        return None
    return check_real(value, "abstain_threshold", expected="a finite number (an in-scope score) or None")


def json_object(value: Any, what: str) -> dict:
    """A dict (a training config or metrics) as saved in a manifest: str keys, or a ValueError."""
    if value is None:
        return {}
    if not isinstance(value, Mapping) or any(not isinstance(k, str) for k in value):
        raise ValueError(f"{what} must be a mapping with str keys, got {type(value).__name__}")
    return dict(value)


@dataclass(frozen=True, eq=False)
class CalibrationSet:
    """Judged queries the gate was calibrated on, kept to replay and recalibrate after a change.

    x (n, d) float32, prepared as the router prepares queries; experts[i] names the expert query i
    belongs to. `load_floor` and `bias` are the calibration settings they were fitted with
    (train.calibrate.calibrate_router), so a later recalibration fits the same way.
    """

    x: np.ndarray
    experts: tuple[str, ...]
    load_floor: float | None = None
    bias: bool = False

    def __post_init__(self) -> None:
        x = np.asarray(self.x)
        if x.ndim != 2:
            raise ValueError(f"calibration queries must be a 2-d (n, d) array, got shape {x.shape}")
        x = as_matrix(x, None, "calibration queries") if len(x) else np.empty(x.shape, np.float32)
        x = np.array(x, dtype=np.float32, order="C")  # a private copy
        object.__setattr__(self, "x", x)
        experts = tuple(self.experts)
        if any(not isinstance(e, str) for e in experts):
            raise ValueError("calibration experts must be expert names (str)")
        if len(experts) != len(x):
            raise ValueError(f"calibration set: {len(x)} queries but {len(experts)} experts; expected one per query")
        object.__setattr__(self, "experts", experts)
        if self.load_floor is not None:
            object.__setattr__(
                self, "load_floor", check_real(self.load_floor, "calibration load_floor", 0.0, expected="a number >= 0")
            )
        object.__setattr__(self, "bias", bool(check_bool(self.bias, "calibration bias")))

    @classmethod
    def empty(cls, dim: int) -> CalibrationSet:
        return cls(np.empty((0, dim), np.float32), ())

    def __len__(self) -> int:
        return len(self.experts)

    @property
    def dim(self) -> int:
        return self.x.shape[1]

    def keep(self, rows: np.ndarray) -> CalibrationSet:
        """Only the queries at `rows` (a boolean mask or indices)."""
        rows = np.asarray(rows)
        idx = np.flatnonzero(rows) if rows.dtype == bool else rows
        return dataclasses.replace(self, x=self.x[idx], experts=tuple(self.experts[i] for i in idx))

    def without(self, names: Sequence[str]) -> CalibrationSet:
        """The queries of experts not in `names` (those experts were removed)."""
        return self.keep(np.array([e not in set(names) for e in self.experts], dtype=bool))

    def renamed(self, mapping: Mapping[str, str]) -> CalibrationSet:
        """Queries of expert a now belong to mapping[a] (a merge); others unchanged."""
        return dataclasses.replace(self, experts=tuple(mapping.get(e, e) for e in self.experts))

    def reassigned(self, rows: np.ndarray, names: Sequence[str]) -> CalibrationSet:
        """Query rows[i] now belongs to names[i] (a split: each query to the part nearest it)."""
        experts = list(self.experts)
        for r, n in zip(np.asarray(rows).tolist(), names):
            experts[r] = n
        return dataclasses.replace(self, experts=tuple(experts))

    def added(self, x: np.ndarray, experts: Sequence[str]) -> CalibrationSet:
        """These queries appended (judged later: feedback, a judged file)."""
        more = CalibrationSet(x, tuple(experts))
        if len(self) and more.dim != self.dim:
            raise ValueError(f"calibration queries are {self.dim}-d; got {more.dim}-d ones")
        return dataclasses.replace(self, x=np.concatenate([self.x, more.x]), experts=(*self.experts, *more.experts))


@dataclass(frozen=True)
class RouterParts:
    """Everything a router holds. `experts` are in routing order (the gate's outputs)."""

    dim: int
    metric: str = "ip"
    experts: tuple[Expert, ...] = ()
    gate: Gate | None = None
    embedder: Embedder | None = None
    store: MetadataStore = field(default_factory=MetadataStore)
    stats: RoutingStats | None = None  # None: zeros (nothing routed yet)
    abstain_threshold: float | None = None  # in-scope score under which abstain=True answers "no expert"
    prior_weight: float = 0.0  # merge: score + prior_weight * log p(expert); 0 = by score alone
    decide_weight: float = 0.0  # > 0: keep one searched expert's hits, re-decided from them (index.merge.redecide)
    config: dict = field(default_factory=dict)  # the resolved training config (saved with the checkpoint)
    metrics: dict = field(default_factory=dict)  # what training measured
    backend: ExpertBackend = field(default_factory=LocalBackend)  # where the experts' indexes live
    calibration: CalibrationSet | None = None  # judged queries the gate was calibrated on; None: none kept

    def __post_init__(self) -> None:
        object.__setattr__(self, "dim", check_dim(self.dim))
        check_metric(self.metric)
        object.__setattr__(self, "experts", tuple(self.experts))
        ensure_unique(e.name for e in self.experts)
        for e in self.experts:
            if e.dim != self.dim or e.metric != self.metric:
                raise ValueError(
                    f"expert {e.name!r} holds {e.dim}-d {e.metric!r} vectors; the router's are {self.dim}-d "
                    f"{self.metric!r}"
                )
        if self.embedder is not None and self.embedder.dim != self.dim:
            raise ValueError(
                f"embedder {self.embedder.name!r} gives {self.embedder.dim}-d vectors, "
                f"but the router's dim is {self.dim}"
            )
        if self.gate is not None and (self.gate.dim != self.dim or self.gate.num_experts != len(self.experts)):
            raise ValueError(
                f"the gate has dim {self.gate.dim} and {self.gate.num_experts} outputs; "
                f"the router needs dim {self.dim} and {len(self.experts)}"
            )
        stats = self.stats if self.stats is not None else RoutingStats.zeros(len(self.experts))
        if len(stats.counts) != len(self.experts):
            raise ValueError(f"stats for {len(stats.counts)} experts, but {len(self.experts)} experts given")
        object.__setattr__(self, "stats", stats)
        object.__setattr__(self, "abstain_threshold", check_abstain_threshold(self.abstain_threshold))
        object.__setattr__(self, "prior_weight", check_prior_weight(self.prior_weight))
        object.__setattr__(self, "decide_weight", check_decide_weight(self.decide_weight))
        object.__setattr__(self, "config", json_object(self.config, "config"))
        object.__setattr__(self, "metrics", json_object(self.metrics, "metrics"))
        cal = self.calibration if self.calibration is not None else CalibrationSet.empty(self.dim)
        if not isinstance(cal, CalibrationSet):
            raise TypeError(f"calibration must be a CalibrationSet, got {type(cal).__name__}")
        if len(cal) and cal.dim != self.dim:
            raise ValueError(f"the calibration queries are {cal.dim}-d; the router's dim is {self.dim}")
        unknown = sorted(set(cal.experts) - set(self.names))
        if unknown:
            raise ValueError(
                f"calibration queries belong to {unknown[0]!r}, which is not an expert; known experts: {self.names}"
            )
        object.__setattr__(self, "calibration", cal)

    def replace(self, **changes: Any) -> RouterParts:
        return dataclasses.replace(self, **changes)

    @property
    def names(self) -> list[str]:
        return [e.name for e in self.experts]

    def position(self, name: str) -> int:
        """Index of the expert called `name`; KeyError naming the known experts."""
        for i, e in enumerate(self.experts):
            if e.name == name:
                return i
        raise KeyError(f"unknown expert {name!r}; known experts: {self.names}")

    def next_id(self) -> int:
        """The first global id no expert and no stored row uses."""
        return max([self.store.max_id(), *(e.max_id for e in self.experts)]) + 1

    def counts(self) -> np.ndarray:
        return self.stats.counts


@dataclass(frozen=True)
class Change:
    """A change to a router's parts, applied by Router.update in one step: store moves first, in one
    transaction, then the parts swapped in (nothing changes if the store fails)."""

    parts: RouterParts
    item_moves: Sequence[tuple[Sequence[int], str]] = ()  # (ids, the expert now holding them)
    feedback_moves: Sequence[tuple[Sequence[int], str]] = ()  # (feedback seqs, their expert now)
    created: tuple[str, ...] = ()  # names of the experts the change made
