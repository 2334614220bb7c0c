"""Checkpoint directories: the format (pointer, versions, the one manifest schema), saving and loading.

Router.save / Router.load delegate here; this layer sits above routing (it builds Routers from
their parts) and routing never imports it.
"""

from moe_router.lazy import lazy_exports

__getattr__ = lazy_exports(
    __name__,
    {  # io needs torch (the gate); stored and format do not (an expert actor imports them)
        "CheckpointError": "moe_router.errors",
        "StoredExpert": "moe_router.checkpoint.stored",
        "load_router": "moe_router.checkpoint.io",
        "save_router": "moe_router.checkpoint.io",
    },
)
__all__ = ["CheckpointError", "StoredExpert", "load_router", "save_router"]
