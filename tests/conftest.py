"""Fixtures: an isolated cache and working directory, seeded routers and a tiny dataset file."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from moe_router import HashingEmbedder, Router
from moe_router.gate import initial_gate
from tests.helpers import DIM, SIZES, VOCAB, clusters, make_router, sentence, write_jsonl


@pytest.fixture(autouse=True)
def _isolated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The embedding cache and anything a library writes to the working directory stay in tmp."""
    monkeypatch.setenv("MOE_ROUTER_CACHE", str(tmp_path / "moe_router_cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)


@pytest.fixture(params=["ip", "l2"])
def router(request: pytest.FixtureRequest) -> Router:
    return make_router(request.param)


@pytest.fixture
def router_ip() -> Router:
    return make_router("ip")


@pytest.fixture
def queries() -> np.ndarray:
    """(50, DIM) seeded query vectors near the experts' clusters (not stored ones)."""
    xs = clusters(len(SIZES), 13, DIM, seed=0, noise=0.6)
    return np.concatenate(xs)[:50]


@pytest.fixture
def text_router() -> Router:
    """A router over the three-domain vocabulary with a hashing embedder, so text queries work."""
    rng = np.random.default_rng(1)
    router = Router(64, "ip", embedder=HashingEmbedder(dim=64, seed=0))
    for domain in VOCAB:
        texts = [sentence(domain, rng) for _ in range(15)]
        router.add_expert(domain, texts=texts, metadata=[{"domain": domain, "i": i} for i in range(15)])
    router.set_gate(
        initial_gate(router.experts, hidden_dims=[], dropout=0.0)
    )  # linear gate at the centroids: nearest-centroid routing
    return router


@pytest.fixture
def dataset_file(tmp_path: Path) -> Path:
    return write_jsonl(tmp_path / "tiny.jsonl")
