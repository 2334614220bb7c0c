"""Embedders: texts -> L2-normalised vectors (MiniLM, hashing), an on-disk cache, rebuilding from a spec."""

from moe_router.embed.base import Embedder, check_texts
from moe_router.embed.cache import CachedEmbedder, default_cache_dir
from moe_router.embed.hashing import HashingEmbedder
from moe_router.embed.minilm import MiniLMEmbedder
from moe_router.embed.registry import EMBEDDERS, embedder_from_spec

__all__ = [
    "EMBEDDERS",
    "CachedEmbedder",
    "Embedder",
    "HashingEmbedder",
    "MiniLMEmbedder",
    "check_texts",
    "default_cache_dir",
    "embedder_from_spec",
]
