"""moe_router: trainable mixture-of-experts routing for retrieval."""

from moe_router.checkpoint.format import CheckpointError
from moe_router.embed import CachedEmbedder, Embedder, HashingEmbedder, MiniLMEmbedder
from moe_router.gate.model import Gate, GateOutput
from moe_router.index.expert import Expert
from moe_router.routing.router import Router
from moe_router.types import ExpertScore, ExpertStats, Hit, RoutedSearch

__all__ = [
    "CachedEmbedder", "CheckpointError", "Embedder", "Expert", "ExpertScore", "ExpertStats", "Gate", "GateOutput",
    "HashingEmbedder", "Hit", "MiniLMEmbedder", "RoutedSearch", "Router",
]
__version__ = "0.1.0"
