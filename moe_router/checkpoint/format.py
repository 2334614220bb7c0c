"""Checkpoint format: layout constants, the manifest and its checks, CheckpointError."""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from moe_router.checks import ensure_unique

if TYPE_CHECKING:  # annotations only: the format (and expert_files) must import without torch
    from moe_router.embed.base import Embedder
    from moe_router.gate.model import Gate
    from moe_router.index.expert import Expert
    from moe_router.store import MetadataStore


log = logging.getLogger(__name__)


FORMAT = "moe_router.checkpoint"


FORMAT_VERSION = 1


MANIFEST = "manifest.json"


STORE = "store.sqlite"


GATE_FILE = "gate.safetensors"


class CheckpointError(ValueError):
    """A checkpoint is missing, incomplete, corrupted or of an unsupported version."""


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def inside(path: Path, rel: Any) -> Path:
    """path / rel, refusing names that would leave the checkpoint directory (absolute or with '..')."""
    if not isinstance(rel, str) or not rel or Path(rel).is_absolute() or ".." in Path(rel).parts:
        raise CheckpointError(f"checkpoint {path}: file name {rel!r} in the manifest points outside the checkpoint")
    return path / rel


def read_manifest(path: Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"no checkpoint at {path}: expected a directory written by Router.save or scripts/train.py")
    mf = path / MANIFEST
    if not mf.is_file():
        raise CheckpointError(f"{path} is not a moe_router checkpoint: {MANIFEST} is missing")
    try:
        manifest = json.loads(mf.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{mf} is corrupted: not valid JSON ({exc})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise CheckpointError(f"{mf} is not a moe_router manifest (expected format {FORMAT!r})")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(
            f"{mf} has format_version {manifest.get('format_version')!r}; this moe_router reads version {FORMAT_VERSION}"
        )
    for key in ("dim", "metric", "experts", "files"):
        if key not in manifest:
            raise CheckpointError(f"{mf} is incomplete: missing {key!r}")
    kinds = {"experts": list, "files": dict, "stats": dict}
    for key, kind in kinds.items():
        if key in manifest and not isinstance(manifest[key], kind):
            raise CheckpointError(f"{mf} is corrupted: {key!r} must be a {kind.__name__}")
    if not all(isinstance(e, dict) for e in manifest["experts"]):
        raise CheckpointError(f"{mf} is corrupted: each entry of 'experts' must be an object")
    if not all(isinstance(v, dict) for v in manifest.get("stats", {}).values()):
        raise CheckpointError(f"{mf} is corrupted: each entry of 'stats' must be an object")
    try:
        ensure_unique([str(e.get("name")) for e in manifest["experts"]])
    except ValueError as exc:
        raise CheckpointError(f"{mf} is corrupted: {exc}") from None
    return manifest



@dataclass
class CheckpointParts:
    """Everything a checkpoint holds, as objects: what Router.save writes and Router.load rebuilds a router from."""

    dim: int
    metric: str
    embedder: Embedder | None
    gate: Gate | None
    experts: list[Expert]  # in routing order
    store: MetadataStore
    counts: np.ndarray  # (E,) routing counts saved with the checkpoint
    confidence_sums: np.ndarray  # (E,) sums of the chosen experts' probabilities
    abstain_threshold: float | None = None
    config: dict = field(default_factory=dict)  # the resolved training config
    metrics: dict = field(default_factory=dict)
    manifest: dict = field(default_factory=dict)  # as read (empty when writing)
