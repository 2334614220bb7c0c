"""The default backend: every expert's FAISS index in this process, searched side by side (index.parallel)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from moe_router.index.expert import Expert
from moe_router.index.parallel import search_each
from moe_router.routing.backends.base import Answer, ExpertSource
from moe_router.types import ExpertSpec


class LocalBackend:
    """Experts are index.expert.Expert objects in this process; a search never leaves an expert out."""

    name = "local"

    def open(self, sources: Sequence[ExpertSource]) -> list[Expert]:
        """Every source read side by side (reading and sha256 release the GIL)."""
        if len(sources) < 2:
            return [s.read() for s in sources]
        with ThreadPoolExecutor(max(1, min(len(sources), os.cpu_count() or 1))) as pool:
            return list(pool.map(lambda s: s.read(), sources))

    def create(self, spec: ExpertSpec, dim: int, metric: str, xb: np.ndarray, ids: np.ndarray) -> Expert:
        return Expert.build(spec, xb, ids, metric)

    def search(self, jobs: Sequence[tuple[Expert, np.ndarray]], k: int) -> list[Answer]:
        return list(search_each(jobs, k))

    def __repr__(self) -> str:
        return "LocalBackend()"
