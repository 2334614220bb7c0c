"""Where experts' indexes live and how a grouped search reaches them: the ExpertBackend protocol.

The router groups a batch's queries by expert and merges the answers by score (Router.search_experts);
a backend only runs each expert's own search. `local` keeps every index in this process; `ray`
keeps each expert (or a group of experts) in a Ray actor.

Dimension legend: m queries sent to one expert, d vector dim, k hits.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np

# (D, I) of one expert's search, each (m, k): scores best first and global ids, -1 padded;
# None when the expert did not answer (only a remote backend: a dead actor or a timeout).
Answer = tuple[np.ndarray, np.ndarray] | None


class ExpertBackend(Protocol):
    """Opens, creates and searches experts. What it hands back behaves like index.expert.Expert
    (name, specialization, parent, ntotal, ids, vectors(), centroid(), prototypes(), search())."""

    name: str  # "local" | "ray"

    def open(
        self, path: Path, infos: list[dict], dim: int, metric: str, files: dict[str, str], digests: dict
    ) -> list[Any]:
        """The experts of a checkpoint (checkpoint.io.OpenExperts): `files` are checked, `digests` recorded."""
        ...

    def create(
        self, name: str, dim: int, metric: str, specialization: str, parent: str | None, xb: np.ndarray, ids: np.ndarray
    ) -> Any:
        """A new expert holding the prepared vectors xb (n, d) with global ids (n,)."""
        ...

    def search(self, jobs: Sequence[tuple[Any, np.ndarray]], k: int) -> list[Answer]:
        """Each (expert, xq (m, d)) job's top k, all jobs at once; one Answer per job, in order."""
        ...
