"""Experts' indexes: one FAISS flat index per expert, side-by-side search, exact ground truth, k-means."""

from moe_router.index.expert import Expert
from moe_router.index.parallel import search_each

__all__ = ["Expert", "search_each"]
