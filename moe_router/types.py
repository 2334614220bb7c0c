"""The records the library hands back: routing choices, hits, array results, per-expert stats."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np


@dataclass(frozen=True)
class ExpertScore:
    """One expert chosen for a query."""

    expert: str
    probability: float  # gate softmax probability over all experts: the routing confidence
    weight: float  # probability renormalised over the experts chosen for this query
    specialization: str = ""
    parent: str | None = None


@dataclass(frozen=True)
class Hit:
    """One search result."""

    id: int
    score: float  # inner product (metric 'ip', higher is closer) or squared L2 distance ('l2', lower is closer)
    expert: str
    specialization: str
    parent: str | None
    routing_score: float  # the gate's probability for this hit's expert
    text: str | None = None
    metadata: dict = field(default_factory=dict)


class SearchHits(list):
    """One query's hits (a plain list of Hit, best first) and the chosen experts that did not answer.

    `missing_experts` is empty unless an expert could not be reached (an expert actor of the Ray
    backend that died or ran past its timeout): the hits are then the other chosen experts' only,
    and the caller can tell a short answer from a complete one. Slicing keeps it.
    """

    def __init__(self, hits: Iterable[Hit] = (), missing_experts: Sequence[str] = ()) -> None:
        super().__init__(hits)
        self.missing_experts: tuple[str, ...] = tuple(missing_experts)

    def __getitem__(self, item):  # type: ignore[override]
        got = super().__getitem__(item)
        return SearchHits(got, self.missing_experts) if isinstance(item, slice) else got

    def __repr__(self) -> str:
        return f"SearchHits({list.__repr__(self)}, missing_experts={self.missing_experts!r})"


@dataclass(frozen=True)
class RoutedSearch:
    """Array form of a routed search; -1 in I and E where fewer than k vectors were reachable."""

    D: np.ndarray  # (nq, k) scores, best first
    I: np.ndarray  # (nq, k) global ids
    E: np.ndarray  # (nq, k) index of the expert holding each hit
    scanned: np.ndarray  # (nq,) vectors compared per query
    # (nq, t) index of each chosen expert that did not answer (its hits are absent), -1 where it
    # did; None when every chosen expert answered. Only a remote backend leaves experts out.
    missing: np.ndarray | None = None

    def missing_of(self, q: int) -> list[int]:
        """Indices of the experts chosen for query q that did not answer."""
        return [] if self.missing is None else [int(e) for e in self.missing[q] if e >= 0]


@dataclass(frozen=True)
class ExpertStats:
    name: str
    specialization: str
    parent: str | None
    vectors: int
    queries: int  # queries routed to this expert (among each query's chosen experts)
    load_share: float  # share of all (query, expert) assignments
    mean_confidence: float  # mean gate probability when chosen (0.0 if never chosen)


@dataclass(frozen=True)
class FeedbackRecord:
    """One feedback row: whether `expert` served `query` well."""

    seq: int  # the record's id (insertion order)
    query: str | None  # the query text, when it was a text
    vector: np.ndarray  # (d,) the prepared query vector
    expert: str
    positive: bool
    created: float  # unix time
