"""The default backend: every expert's FAISS index in this process, searched side by side (index.parallel)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from moe_router.checkpoint.expert_files import read_experts
from moe_router.index.expert import Expert
from moe_router.index.parallel import search_each
from moe_router.routing.backends.base import Answer


class LocalBackend:
    """Experts are index.expert.Expert objects in this process; a search never leaves an expert out."""

    name = "local"

    def open(
        self, path: Path, infos: list[dict], dim: int, metric: str, files: dict[str, str], digests: dict
    ) -> list[Expert]:
        return read_experts(path, infos, dim, metric, files, digests)

    def create(
        self, name: str, dim: int, metric: str, specialization: str, parent: str | None, xb: np.ndarray, ids: np.ndarray
    ) -> Expert:
        expert = Expert(name, dim, metric, specialization, parent)
        expert.add(xb, ids)
        return expert

    def search(self, jobs: Sequence[tuple[Expert, np.ndarray]], k: int) -> list[Answer]:
        return list(search_each(jobs, k))

    def __repr__(self) -> str:
        return "LocalBackend()"
