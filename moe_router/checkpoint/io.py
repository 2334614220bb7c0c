"""Writing and reading checkpoint directories (atomic save, verified load)."""

from __future__ import annotations

import logging
import json
import os
import shutil
import time
import uuid
from pathlib import Path
from typing import Callable

import numpy as np
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from moe_router.checkpoint.format import (
    FORMAT, FORMAT_VERSION, GATE_FILE, MANIFEST, STORE, CheckpointError, CheckpointParts, inside, read_manifest, sha256_file,
)
from moe_router.checkpoint.expert_files import read_experts
from moe_router.embed.registry import embedder_from_spec
from moe_router.gate.model import Gate
from moe_router.index.expert import SavedCopy
from moe_router.store import MetadataStore

log = logging.getLogger(__name__)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_npy(path: Path, arr: np.ndarray) -> None:
    with open(path, "wb") as f:
        np.save(f, arr, allow_pickle=False)
        f.flush()
        os.fsync(f.fileno())


def _link_saved(saved: SavedCopy | None, vectors: Path, ids: Path) -> bool:
    """Hard-link an expert's saved files to `vectors` and `ids` if they still hold what was saved.

    Each file is re-hashed first (cheaper than writing it again, and a file damaged on disk since
    is never carried into a new checkpoint). False, with nothing left behind, when a file is
    missing, changed or cannot be linked (e.g. another filesystem); the caller then writes it.
    """
    if saved is None:
        return False
    try:
        if sha256_file(saved.vectors) != saved.vectors_sha256 or sha256_file(saved.ids) != saved.ids_sha256:
            return False
        os.link(saved.vectors, vectors)
        os.link(saved.ids, ids)
        return True
    except OSError:
        vectors.unlink(missing_ok=True)
        ids.unlink(missing_ok=True)
        return False


def write_checkpoint(path: Path, router: CheckpointParts) -> Path:
    """Write the parts of a router to the directory `path` atomically; returns the path.

    An expert whose rows have not changed since it was last loaded or saved has its files
    hard-linked from there (after a sha256 check) instead of written again, so saving after
    adding or removing one expert costs little more than writing that expert.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        (tmp / "experts").mkdir()
        files: dict[str, str] = {}
        experts = []
        for i, e in enumerate(router.experts):
            vec_rel, ids_rel = f"experts/{i:04d}.npy", f"experts/{i:04d}.ids.npy"
            if _link_saved(e.saved, tmp / vec_rel, tmp / ids_rel):
                files[vec_rel], files[ids_rel] = e.saved.vectors_sha256, e.saved.ids_sha256
            else:
                _write_npy(tmp / vec_rel, e.vectors())
                _write_npy(tmp / ids_rel, e.ids)
            experts.append(
                {"name": e.name, "specialization": e.specialization, "parent": e.parent, "size": e.ntotal,
                 "vectors": vec_rel, "ids": ids_rel}
            )
        gate_info = None
        if router.gate is not None:
            state = {k: v.detach().cpu().contiguous() for k, v in router.gate.state_dict().items()}
            save_file(state, str(tmp / GATE_FILE))
            gate_info = {"config": router.gate.config(), "file": GATE_FILE}
        for rel in [*(x["vectors"] for x in experts), *(x["ids"] for x in experts), *([GATE_FILE] if gate_info else [])]:
            if rel not in files:
                files[rel] = sha256_file(tmp / rel)
        router.store.backup_to(tmp / STORE)
        stats = {e.name: {"queries": int(c), "confidence_sum": float(m)}
                 for e, c, m in zip(router.experts, router.counts, router.confidence_sums)}
        manifest = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "dim": router.dim,
            "metric": router.metric,
            "embedder": router.embedder.spec() if router.embedder is not None else None,
            "embedder_name": router.embedder.name if router.embedder is not None else None,
            "gate": gate_info,
            "experts": experts,
            "files": files,
            "stats": stats,
            "abstain_threshold": router.abstain_threshold,
            "metrics": router.metrics,
            "config": router.config,
        }
        with open(tmp / MANIFEST, "w") as f:
            json.dump(manifest, f, indent=2, default=str)
            f.flush()
            os.fsync(f.fileno())
        _fsync_dir(tmp)
        _swap_into_place(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    where = path.absolute()  # a later save may run from another working directory
    for e, info in zip(router.experts, experts):
        e.saved = SavedCopy(where / info["vectors"], where / info["ids"], files[info["vectors"]], files[info["ids"]])
    return path


def _swap_into_place(tmp: Path, path: Path) -> None:
    if not path.exists():
        os.rename(tmp, path)
    else:
        if not (path / MANIFEST).exists() and any(path.iterdir()):
            raise CheckpointError(f"refusing to replace {path}: it exists, is not empty and is not a moe_router checkpoint")
        old = path.parent / f".{path.name}.old-{uuid.uuid4().hex[:8]}"
        os.rename(path, old)
        os.rename(tmp, path)
        shutil.rmtree(old, ignore_errors=True)
    _fsync_dir(path.parent)


def recover_checkpoint(path: Path) -> Path | None:
    """Undo a save that was killed between its two renames; returns the directory restored, if any.

    _swap_into_place renames the live checkpoint to `.NAME.old-XXXX` and then the new
    one into place. A kill between the two leaves no checkpoint at `path`; the `.old` one holds
    every acknowledged write (the new one was never acknowledged), so it goes back. Router.load
    calls this first, so a library user gets the same recovery as the server.
    """
    path = Path(path)
    if path.exists():
        return None
    olds = [p for p in path.parent.glob(f".{path.name}.old-*") if (p / MANIFEST).is_file()]
    if not olds:
        return None
    newest = max(olds, key=lambda p: p.stat().st_mtime_ns)
    os.rename(newest, path)
    log.warning("restored %s from %s (a save was interrupted between its renames)", path, newest.name)
    return newest


# (checkpoint dir, expert entries of the manifest, dim, metric, sha256 to check, sha256 of every file) -> experts;
# a backend that keeps experts elsewhere (routing.backends) opens them there instead.
OpenExperts = Callable[[Path, list[dict], int, str, dict, dict], list]


def read_checkpoint(path: Path, verify: bool = True, cache_dir: str | Path | None = None,
                    open_experts: OpenExperts | None = None) -> CheckpointParts:
    """The parts of a router from a checkpoint directory. `verify` checks every file's sha256 (experts' while reading).

    `open_experts` opens the experts (default read_experts: into this process).
    """
    path = Path(path)
    recover_checkpoint(path)
    manifest = read_manifest(path)
    try:
        dim, metric = int(manifest["dim"]), str(manifest["metric"])
        files = manifest["files"] if verify else {}
        infos = manifest["experts"]
        read_with_experts = {info[key] for info in infos for key in ("vectors", "ids")}
        for rel, digest in files.items():  # the gate and any other file; expert files are checked as they are read
            if rel in read_with_experts:
                continue
            f = inside(path, rel)
            if not f.is_file():
                raise CheckpointError(f"checkpoint {path} is incomplete: {rel} is missing")
            if sha256_file(f) != digest:
                raise CheckpointError(f"checkpoint {path}: {rel} is corrupted (sha256 does not match the manifest)")
        experts = (open_experts or read_experts)(path, infos, dim, metric, files, manifest["files"])
        embedder = embedder_from_spec(manifest.get("embedder"), cache_dir=cache_dir)
        if not (path / STORE).is_file():
            raise CheckpointError(f"checkpoint {path} is incomplete: {STORE} is missing")
        try:
            store = MetadataStore(path / STORE)
        except ValueError as exc:
            raise CheckpointError(f"checkpoint {path}: {exc}") from None
        stats = manifest.get("stats", {})
        counts = np.array([int(stats.get(e.name, {}).get("queries", 0)) for e in experts], dtype=np.int64)
        sums = np.array([float(stats.get(e.name, {}).get("confidence_sum", 0.0)) for e in experts], dtype=np.float64)
        gate = _load_gate(path, manifest["gate"], dim, len(experts)) if manifest.get("gate") else None
        threshold = manifest.get("abstain_threshold")
        return CheckpointParts(
            dim=dim, metric=metric, embedder=embedder, gate=gate, experts=experts, store=store, counts=counts,
            confidence_sums=sums, abstain_threshold=float(threshold) if threshold is not None else None,
            config=manifest.get("config") or {}, metrics=manifest.get("metrics") or {}, manifest=manifest,
        )
    except CheckpointError:
        raise
    except (KeyError, TypeError, ValueError, AttributeError, OverflowError) as exc:
        raise CheckpointError(f"checkpoint {path} has an invalid manifest or files: {exc}") from None


def _load_gate(path: Path, info: dict, dim: int, num_experts: int) -> Gate:
    config = dict(info["config"])
    if int(config.get("dim", -1)) != dim or int(config.get("num_experts", -1)) != num_experts:
        raise CheckpointError(
            f"checkpoint {path}: gate config (dim={config.get('dim')}, num_experts={config.get('num_experts')}) "
            f"does not match the checkpoint (dim={dim}, {num_experts} experts)"
        )
    try:
        state = load_file(str(inside(path, info["file"])))
    except (SafetensorError, OSError) as exc:
        raise CheckpointError(f"checkpoint {path}: {info['file']} is corrupted ({exc})") from None
    try:
        gate = Gate(**config)
        if "prototypes" in state:
            gate.resize_prototypes(int(state["prototypes"].shape[0]))
        gate.load_state_dict(state, strict=True)
    except (RuntimeError, TypeError, ValueError) as exc:
        raise CheckpointError(f"checkpoint {path}: gate weights do not fit the gate config ({exc})") from None
    return gate.eval()

