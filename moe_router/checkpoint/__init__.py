"""Checkpoint directories: the format (manifest, checks), experts' files, and reading / writing them."""

from moe_router.lazy import lazy_exports

__getattr__ = lazy_exports(__name__, {  # io needs torch (the gate); expert_files and format do not
    "CheckpointError": "moe_router.checkpoint.format", "CheckpointParts": "moe_router.checkpoint.format",
    "read_checkpoint": "moe_router.checkpoint.io", "write_checkpoint": "moe_router.checkpoint.io",
})
__all__ = ["CheckpointError", "CheckpointParts", "read_checkpoint", "write_checkpoint"]
