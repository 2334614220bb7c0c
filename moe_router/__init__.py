"""moe_router: trainable mixture-of-experts routing for retrieval.

The names below are imported on first use (moe_router.lazy): `from moe_router import Router` works
as before, and a process that needs only the experts' indexes never imports torch.
"""

from moe_router.lazy import lazy_exports

_EXPORTS = {
    "CheckpointError": "moe_router.checkpoint.format",
    "CachedEmbedder": "moe_router.embed",
    "Embedder": "moe_router.embed",
    "HashingEmbedder": "moe_router.embed",
    "MiniLMEmbedder": "moe_router.embed",
    "Gate": "moe_router.gate.model",
    "GateOutput": "moe_router.gate.model",
    "Expert": "moe_router.index.expert",
    "Router": "moe_router.routing.router",
    "ExpertScore": "moe_router.types",
    "ExpertStats": "moe_router.types",
    "Hit": "moe_router.types",
    "RoutedSearch": "moe_router.types",
    "SearchHits": "moe_router.types",
}
__getattr__ = lazy_exports(__name__, _EXPORTS)
__all__ = sorted(_EXPORTS)
__version__ = "0.1.0"
