"""Checkpoint directories: the format (manifest, checks) and reading / writing them."""

from moe_router.checkpoint.format import CheckpointError, CheckpointParts
from moe_router.checkpoint.io import read_checkpoint, write_checkpoint

__all__ = ["CheckpointError", "CheckpointParts", "read_checkpoint", "write_checkpoint"]
