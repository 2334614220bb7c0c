"""moe_router: trainable mixture-of-experts routing for retrieval."""

from moe_router.checkpoint import CheckpointError
from moe_router.embedders import CachedEmbedder, Embedder, HashingEmbedder, MiniLMEmbedder
from moe_router.experts import Expert
from moe_router.gate import Gate, GateOutput
from moe_router.router import ExpertScore, ExpertStats, Hit, RoutedSearch, Router

__all__ = [
    "CachedEmbedder", "CheckpointError", "Embedder", "Expert", "ExpertScore", "ExpertStats", "Gate", "GateOutput",
    "HashingEmbedder", "Hit", "MiniLMEmbedder", "RoutedSearch", "Router",
]
__version__ = "0.1.0"
