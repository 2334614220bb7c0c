"""Embedders: the hashing embedder, the SQLite embedding cache, specs, and the real MiniLM model (slow)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest

from moe_router import CachedEmbedder, Embedder, HashingEmbedder, MiniLMEmbedder
from moe_router.embed.cache import default_cache_dir
from moe_router.embed.registry import embedder_from_spec

TEXTS = ["How do I fix an auth bug?", "Centre a div with flexbox", "SQL index on two columns"]


class CountingEmbedder:
    """A fake inner embedder that records every text it is asked to encode."""

    def __init__(self, dim: int = 16, name: str = "counting") -> None:
        self.dim, self.name = dim, name
        self.inner = HashingEmbedder(dim=dim, seed=3)
        self.calls: list[list[str]] = []

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        self.calls.append(list(texts))
        return self.inner.encode(texts)

    def spec(self) -> dict:
        return {"type": "counting"}


def test_hashing_embedder__is_deterministic_across_instances() -> None:
    np.testing.assert_array_equal(HashingEmbedder(128).encode(TEXTS), HashingEmbedder(128).encode(TEXTS))
    assert not np.allclose(HashingEmbedder(128, seed=1).encode(TEXTS), HashingEmbedder(128, seed=0).encode(TEXTS))


@pytest.mark.parametrize("dim", [1, 7, 256])
def test_hashing_embedder__gives_unit_float32_rows_of_its_dim(dim: int) -> None:
    texts = [*TEXTS, "!!! ???"]  # the last has no hashable token: a fixed unit vector, not NaN
    vecs = HashingEmbedder(dim).encode(texts)
    assert vecs.shape == (len(texts), dim) and vecs.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vecs, axis=1), 1.0, rtol=1e-6)
    assert HashingEmbedder(dim).name == f"hashing-{dim}-0"


def test_hashing_embedder__shared_words_are_more_similar_than_disjoint_ones() -> None:
    a, b, c = HashingEmbedder(256).encode(["database index query", "slow database query plan", "flexbox centre div"])
    assert a @ b > a @ c + 0.2


def test_embedders__reject_single_string_and_empty_text() -> None:
    with pytest.raises(TypeError, match="single str"):
        HashingEmbedder(8).encode("one text")
    with pytest.raises(ValueError, match="text 1 is empty"):
        HashingEmbedder(8).encode(["ok", "   "])
    with pytest.raises(ValueError, match="text 0 is int"):
        HashingEmbedder(8).encode([3])
    with pytest.raises(ValueError, match="dim must be an integer >= 1"):
        HashingEmbedder(0)


def test_cached_embedder__second_call_is_identical_with_zero_misses(tmp_path: Path) -> None:
    inner = CountingEmbedder()
    cached = CachedEmbedder(inner, tmp_path)
    first = cached.encode(TEXTS)
    assert cached.misses == 3 and cached.hits == 0 and inner.calls == [TEXTS]
    second = cached.encode(TEXTS)
    np.testing.assert_array_equal(second, first)
    assert cached.misses == 3 and cached.hits == 3 and len(inner.calls) == 1
    np.testing.assert_array_equal(first, inner.inner.encode(TEXTS))


def test_cached_embedder__persists_across_instances_and_encodes_only_new_texts(tmp_path: Path) -> None:
    expected = CachedEmbedder(CountingEmbedder(), tmp_path).encode(TEXTS)
    inner = CountingEmbedder()
    cached = CachedEmbedder(inner, tmp_path)
    got = cached.encode([TEXTS[2], "something new", TEXTS[0]])
    assert inner.calls == [["something new"]] and cached.misses == 1 and cached.hits == 2
    np.testing.assert_array_equal(got[[0, 2]], expected[[2, 0]])
    assert got.dtype == np.float32 and got.shape == (3, 16)


def test_cached_embedder__keys_by_model_name(tmp_path: Path) -> None:
    CachedEmbedder(CountingEmbedder(name="model-a"), tmp_path).encode(TEXTS)
    other = CachedEmbedder(CountingEmbedder(name="model-b"), tmp_path)
    other.encode(TEXTS)
    assert other.misses == 3 and other.hits == 0


def test_cached_embedder__satisfies_the_protocol_and_keeps_the_inner_spec(tmp_path: Path) -> None:
    cached = CachedEmbedder(HashingEmbedder(32, seed=5), tmp_path)
    assert isinstance(cached, Embedder)
    assert (cached.name, cached.dim, cached.spec()) == ("hashing-32-5", 32, {"type": "hashing", "dim": 32, "seed": 5})


def test_embedder_from_spec__rebuilds_an_equivalent_embedder(tmp_path: Path) -> None:
    original = HashingEmbedder(48, seed=2)
    rebuilt = embedder_from_spec(original.spec())
    np.testing.assert_array_equal(rebuilt.encode(TEXTS), original.encode(TEXTS))
    assert isinstance(embedder_from_spec(original.spec(), cache_dir=tmp_path), CachedEmbedder)
    assert embedder_from_spec(None) is None
    assert embedder_from_spec({"type": "minilm", "batch_size": 8}).batch_size == 8  # not loaded until used


@pytest.mark.parametrize("spec", [{"type": "os.system"}, {"type": None}, {}])
def test_embedder_from_spec__refuses_unregistered_types(spec: dict) -> None:
    with pytest.raises(ValueError, match="unknown embedder type"):
        embedder_from_spec(spec)


def test_default_cache_dir__honours_moe_router_cache(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("MOE_ROUTER_CACHE", str(tmp_path / "elsewhere"))
    assert default_cache_dir() == tmp_path / "elsewhere"
    monkeypatch.delenv("MOE_ROUTER_CACHE")
    assert default_cache_dir() == Path.home() / ".cache" / "moe_router"


@pytest.mark.slow
def test_minilm__encodes_offline_to_unit_384d_vectors_with_meaningful_similarity() -> None:
    vecs = MiniLMEmbedder(batch_size=4, device="cpu").encode(
        ["How do I reset my password?", "I forgot my login password", "The recipe needs two cups of flour"]
    )
    assert vecs.shape == (3, 384) and vecs.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vecs, axis=1), 1.0, rtol=1e-5)
    sims = vecs @ vecs.T
    assert sims[0, 1] > sims[0, 2] + 0.3 and sims[0, 1] > sims[1, 2] + 0.3
