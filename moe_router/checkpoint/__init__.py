"""Checkpoint directories: the format (pointer, versions, manifest schema) and reading / writing them."""

from moe_router.checkpoint.format import CheckpointError, CheckpointParts
from moe_router.checkpoint.io import convert_legacy, read_checkpoint, write_checkpoint

__all__ = ["CheckpointError", "CheckpointParts", "convert_legacy", "read_checkpoint", "write_checkpoint"]
