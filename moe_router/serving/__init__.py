"""HTTP serving of a checkpoint: FastAPI app, micro-batching, copy-on-write expert changes."""

from moe_router.serving.app import create_app
from moe_router.serving.batcher import MicroBatcher, Query, run_queries
from moe_router.serving.config import AuthConfig, BatchConfig, Limits
from moe_router.serving.state import RouterState

__all__ = [
    "AuthConfig",
    "BatchConfig",
    "Limits",
    "MicroBatcher",
    "Query",
    "RouterState",
    "create_app",
    "run_queries",
]
