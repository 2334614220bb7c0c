"""Embedders rebuilt from their spec (a registered type name and its arguments): no code is imported."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from moe_router.embed.base import Embedder
from moe_router.embed.cache import CachedEmbedder
from moe_router.embed.hashing import HashingEmbedder
from moe_router.embed.minilm import MiniLMEmbedder

EMBEDDERS: dict[str, type] = {"minilm": MiniLMEmbedder, "hashing": HashingEmbedder}


def embedder_from_spec(spec: dict[str, Any] | None, cache_dir: str | Path | None = None) -> Embedder | None:
    """Rebuild a registered embedder from its spec (only registered types: no code is imported)."""
    if spec is None:
        return None
    kwargs = dict(spec)
    kind = kwargs.pop("type", None)
    if kind not in EMBEDDERS:
        raise ValueError(f"unknown embedder type {kind!r}; expected one of {sorted(EMBEDDERS)}")
    embedder = EMBEDDERS[kind](**kwargs)
    return CachedEmbedder(embedder, cache_dir) if cache_dir is not None else embedder
