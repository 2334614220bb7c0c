"""Errors shared across layers (kept at the bottom so an expert actor can raise them without the checkpoint code)."""


class CheckpointError(ValueError):
    """A checkpoint is missing, incomplete, corrupted, hostile or of an unsupported version, or cannot be written."""
