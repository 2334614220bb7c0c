"""Where experts' indexes live and how a grouped search reaches them: the ExpertBackend protocol.

The router groups a batch's queries by expert and merges the answers by score (Router.search_experts);
a backend only opens experts from their descriptions (ExpertSource), creates new ones from vectors,
and runs each expert's own search. It knows no file format: a source reads itself. `local` keeps
every index in this process; `ray` keeps each expert (or a group of experts) in a Ray actor.

Dimension legend: n vectors of an expert, m queries sent to one expert, d vector dim, k hits.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from moe_router.index.expert import Expert
from moe_router.types import ExpertSpec

# (D, I) of one expert's search, each (m, k): scores best first and global ids, -1 padded;
# None when the expert did not answer (only a remote backend: a dead actor or a timeout).
Answer = tuple[np.ndarray, np.ndarray] | None


class ExpertSource(Protocol):
    """A description of an expert that can build it: a checkpoint's StoredExpert, or VectorSource."""

    spec: ExpertSpec
    size: int  # rows
    dim: int
    metric: str

    def read(self, recheck: bool = False) -> Expert:
        """The expert. `recheck`: a restarted holder re-reading it, which must check what it reads."""
        ...


@dataclass(frozen=True)
class VectorSource:
    """An expert built from prepared vectors in memory (add / merge / split)."""

    spec: ExpertSpec
    metric: str
    xb: np.ndarray  # (n, d) prepared vectors
    ids: np.ndarray  # (n,) global ids

    @property
    def size(self) -> int:
        return len(self.ids)

    @property
    def dim(self) -> int:
        return int(self.xb.shape[1])

    def read(self, recheck: bool = False) -> Expert:
        return Expert.build(self.spec, self.xb, self.ids, self.metric)


class ExpertBackend(Protocol):
    """Opens, creates and searches experts. What it hands back behaves like index.expert.Expert
    (spec, name, specialization, parent, ntotal, ids, content, vectors(), centroid(), prototypes(),
    search(), with_spec())."""

    name: str  # "local" | "ray"

    def open(self, sources: Sequence[ExpertSource]) -> list[Any]:
        """One expert per source, in order."""
        ...

    def create(self, spec: ExpertSpec, dim: int, metric: str, xb: np.ndarray, ids: np.ndarray) -> Any:
        """A new expert holding the prepared vectors xb (n, d) with global ids (n,)."""
        ...

    def search(self, jobs: Sequence[tuple[Any, np.ndarray]], k: int) -> list[Answer]:
        """Each (expert, xq (m, d)) job's top k, all jobs at once; one Answer per job, in order."""
        ...
