"""Checkpoint directories: the format (pointer, versions, manifest schema), experts' files, reading / writing them."""

from moe_router.lazy import lazy_exports

__getattr__ = lazy_exports(
    __name__,
    {  # io needs torch (the gate); expert_files and format do not
        "CheckpointError": "moe_router.checkpoint.format",
        "CheckpointParts": "moe_router.checkpoint.format",
        "read_checkpoint": "moe_router.checkpoint.io",
        "write_checkpoint": "moe_router.checkpoint.io",
        "convert_legacy": "moe_router.checkpoint.io",
    },
)
__all__ = ["CheckpointError", "CheckpointParts", "convert_legacy", "read_checkpoint", "write_checkpoint"]
