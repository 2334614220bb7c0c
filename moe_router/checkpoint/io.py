"""Writing and reading checkpoint directories: versioned atomic save, read-only verified load.

A save writes a complete new version directory under a temporary name, renames it to
versions/NNNNNN (a name no other version has), then replaces the pointer file CURRENT atomically
(temporary file, fsync, os.replace, fsync of the directory). A load reads CURRENT once and then
only files of that version, which are never changed; it opens every file with O_NOFOLLOW as a
regular file, writes nothing, renames nothing, and works on read-only storage. If a save
collects the version being read meanwhile, the load starts again from the new pointer.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import sqlite3
import stat
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import numpy as np
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors
from safetensors.torch import save_file

from moe_router.checkpoint.expert_files import fingerprint, read_experts
from moe_router.checkpoint.format import (
    FORMAT,
    FORMAT_VERSION,
    GATE_FILE,
    LEGACY_VERSION,
    MANIFEST,
    MAX_POINTER_BYTES,
    POINTER,
    STORE,
    VERSIONS,
    CheckpointError,
    CheckpointParts,
    FileMissing,
    Located,
    Manifest,
    locate,
    lstat_inside,
    parse_pointer,
    pointer_bytes,
    read_checked,
    read_inside,
    read_located_manifest,
    sha256_file,
    version_dir,
    version_number,
)
from moe_router.embed.registry import embedder_from_spec
from moe_router.gate.model import Gate
from moe_router.index.expert import SavedCopy
from moe_router.store import MetadataStore

log = logging.getLogger(__name__)


KEEP_VERSIONS = 3  # versions kept on disk: the current one and the two before it (see collect_garbage)


READ_ATTEMPTS = 50  # loads started again because saves collected the version being read, before giving up


LEGACY_FILES = (MANIFEST, GATE_FILE, STORE, f"{STORE}-wal", f"{STORE}-shm", "experts")


# ---------------------------------------------------------------- save


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _write_npy(path: Path, arr: np.ndarray) -> None:
    with open(path, "xb") as f:
        np.save(f, arr, allow_pickle=False)
        f.flush()
        os.fsync(f.fileno())


def _unchanged(file: Path, digest: str, recorded: tuple | None, recheck: bool) -> bool:
    """Whether `file` still holds what had `digest`: re-hashed, or (recheck=False) the same inode, size and mtime."""
    st = os.lstat(file)
    if not stat.S_ISREG(st.st_mode):
        return False
    if not recheck and recorded is not None:
        return fingerprint(st) == recorded
    return sha256_file(file) == digest


def _link_saved(saved: SavedCopy | None, vectors: Path, ids: Path, recheck: bool) -> bool:
    """Hard-link an expert's saved files to `vectors` and `ids` if they still hold what was saved.

    Each file is re-hashed first (cheaper than writing it again, and a file damaged on disk since
    is never carried into a new version); with `recheck=False` a file whose inode, size and mtime
    are those recorded when it was last hashed is trusted. False, with nothing left behind, when a
    file is missing, changed or cannot be linked (e.g. another filesystem); the caller then writes it.
    """
    if saved is None:
        return False
    try:
        if not (
            _unchanged(saved.vectors, saved.vectors_sha256, saved.vectors_stat, recheck)
            and _unchanged(saved.ids, saved.ids_sha256, saved.ids_stat, recheck)
        ):
            return False
        os.link(saved.vectors, vectors, follow_symlinks=False)
        os.link(saved.ids, ids, follow_symlinks=False)
        return True
    except OSError:
        vectors.unlink(missing_ok=True)
        ids.unlink(missing_ok=True)
        return False


def _prepare_root(path: Path) -> None:
    """Make `path` ready to take a new version, refusing anything that is not a checkpoint (or empty)."""
    if path.exists() and not path.is_dir():
        raise CheckpointError(f"cannot save a checkpoint to {path}: it exists and is not a directory")
    if not path.exists():
        try:
            path.mkdir(parents=True)
        except FileExistsError:  # created meanwhile, or a parent is a file
            if not path.is_dir():
                raise CheckpointError(f"cannot save a checkpoint to {path}: a parent is not a directory") from None
        except NotADirectoryError:
            raise CheckpointError(f"cannot save a checkpoint to {path}: a parent is not a directory") from None
    names = set(os.listdir(path))
    if names and not names & {POINTER, VERSIONS, MANIFEST}:
        raise CheckpointError(f"refusing to replace {path}: it exists, is not empty and is not a moe_router checkpoint")
    st = lstat_inside(path, VERSIONS)
    if st is not None and not stat.S_ISDIR(st.st_mode):
        raise CheckpointError(f"refusing to save into {path}: {VERSIONS} is not a directory (a link or special file)")
    st = lstat_inside(path, POINTER)
    if st is not None and not stat.S_ISREG(st.st_mode):
        raise CheckpointError(f"refusing to save into {path}: {POINTER} is not a regular file")


def current_version(path: Path) -> int | None:
    """The version CURRENT points to; None without a (readable) pointer."""
    try:
        return parse_pointer(read_inside(path, POINTER, MAX_POINTER_BYTES), f"{path}/{POINTER}")[0]
    except (OSError, CheckpointError):
        return None


def write_checkpoint(path: Path, router: CheckpointParts, recheck: bool = True) -> dict:
    """Write the parts of a router as a new version of the checkpoint `path`, switched to atomically; the manifest.

    An expert whose rows have not changed since it was last loaded or saved has its files
    hard-linked (after a sha256 check; `recheck=False`: a stat check) instead of written again, so
    saving after adding or removing one expert costs little more than writing that expert.
    Readers see the previous version until CURRENT is replaced, and the new one after.
    """
    path = Path(path)
    _prepare_root(path)
    legacy = lstat_inside(path, POINTER) is None and lstat_inside(path, MANIFEST) is not None  # format 1 saved over
    versions = path / VERSIONS
    versions.mkdir(exist_ok=True)
    taken = [n for n in map(version_number, os.listdir(versions)) if n is not None]
    n = max([current_version(path) or 0, *taken]) + 1  # a name no version has had (versions are never reused)
    tmp = versions / f".tmp-{n:06d}-{uuid.uuid4().hex[:8]}"
    final = path / version_dir(n)
    pointer_tmp = path / f".{POINTER}.tmp-{uuid.uuid4().hex[:8]}"
    committed = False
    tmp.mkdir()
    try:
        (tmp / "experts").mkdir()
        files: dict[str, str] = {}
        experts = []
        for i, e in enumerate(router.experts):
            vec_rel, ids_rel = f"experts/{i:04d}.npy", f"experts/{i:04d}.ids.npy"
            if _link_saved(e.saved, tmp / vec_rel, tmp / ids_rel, recheck):
                files[vec_rel], files[ids_rel] = e.saved.vectors_sha256, e.saved.ids_sha256
            else:
                _write_npy(tmp / vec_rel, e.vectors())
                _write_npy(tmp / ids_rel, e.ids)
            experts.append(
                {
                    "name": e.name,
                    "specialization": e.specialization,
                    "parent": e.parent,
                    "size": e.ntotal,
                    "vectors": vec_rel,
                    "ids": ids_rel,
                }
            )
        gate_info = None
        if router.gate is not None:
            state = {k: v.detach().cpu().contiguous() for k, v in router.gate.state_dict().items()}
            save_file(state, str(tmp / GATE_FILE))
            _fsync_file(tmp / GATE_FILE)
            gate_info = {"config": router.gate.config(), "file": GATE_FILE}
        image = router.store.image()  # written and hashed from memory: one pass, no re-read
        with open(tmp / STORE, "xb") as f:
            f.write(image)
            f.flush()
            os.fsync(f.fileno())
        files[STORE] = hashlib.sha256(image).hexdigest()
        del image
        for rel in [
            *(x["vectors"] for x in experts),
            *(x["ids"] for x in experts),
            *([GATE_FILE] if gate_info else []),
            STORE,
        ]:
            if rel not in files:
                files[rel] = sha256_file(tmp / rel)
        stats = {
            e.name: {"queries": int(c), "confidence_sum": float(m)}
            for e, c, m in zip(router.experts, router.counts, router.confidence_sums)
        }
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
            "prior_weight": router.prior_weight,
            "metrics": router.metrics,
            "config": router.config,
        }
        raw = json.dumps(manifest, indent=2, default=str).encode()
        manifest = json.loads(raw)  # what a reader will see (default=str applied)
        with open(tmp / MANIFEST, "xb") as f:
            f.write(raw)
            f.flush()
            os.fsync(f.fileno())
        _fsync_dir(tmp / "experts")
        _fsync_dir(tmp)
        os.rename(tmp, final)  # `final` is a new name: nothing is replaced, readers never look here yet
        _fsync_dir(versions)
        with open(pointer_tmp, "xb") as f:
            f.write(pointer_bytes(n, hashlib.sha256(raw).hexdigest()))
            f.flush()
            os.fsync(f.fileno())
        os.replace(pointer_tmp, path / POINTER)  # the commit: readers switch to version n
        committed = True
        _fsync_dir(path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        pointer_tmp.unlink(missing_ok=True)
        if not committed:
            shutil.rmtree(final, ignore_errors=True)
        raise
    where = final.absolute()  # a later save may run from another working directory
    for e, info in zip(router.experts, experts):
        vec, ids = where / info["vectors"], where / info["ids"]
        e.saved = SavedCopy(
            vec, ids, files[info["vectors"]], files[info["ids"]], fingerprint(os.lstat(vec)), fingerprint(os.lstat(ids))
        )
    collect_garbage(path, n, legacy=legacy)
    return manifest


def collect_garbage(path: Path, current: int, keep: int = KEEP_VERSIONS, legacy: bool = False) -> None:
    """Delete versions but the current one and the `keep - 1` before it, unfinished saves, format-1 files if `legacy`.

    Why keep more than one: a reader that read the pointer just before a save must still find
    its version's files; with `keep` versions it does unless `keep - 1` more saves finish during
    its load, and then it starts again from the new pointer (read_checkpoint), so nothing is lost
    either way. Old versions cost little: unchanged experts are hard links to the same files.
    Never raises (a failure to delete costs disk space, not correctness); never follows a link.
    """
    versions = path / VERSIONS
    try:
        names = os.listdir(versions)
    except OSError:
        return
    older = sorted(n for n in map(version_number, names) if n is not None and n < current)
    kept = {current, *older[len(older) - (keep - 1) :]} if keep > 1 else {current}
    for name in names:
        n = version_number(name)
        if (n is not None and n not in kept) or name.startswith(".tmp-"):
            shutil.rmtree(versions / name, ignore_errors=True)  # refuses links: nothing outside is touched
    for name in LEGACY_FILES if legacy else ():  # a format-1 checkpoint saved over: versions/ replaces its flat files
        target = path / name
        try:
            if target.is_symlink() or target.is_file():
                target.unlink()
            elif target.is_dir():
                shutil.rmtree(target, ignore_errors=True)
        except OSError as exc:
            log.warning("could not remove %s of the format-1 checkpoint: %s", target, exc)


def convert_legacy(path: str | Path) -> Path:
    """Rewrite a format-1 checkpoint in place as format 2, first merging its store's write-ahead log.

    A write, run once by hand (no server on the checkpoint): format-1 servers committed feedback
    to store.sqlite-wal, which a read-only load cannot apply.
    """
    path = Path(path)
    if lstat_inside(path, POINTER) is not None:
        return path
    st = lstat_inside(path, STORE)
    if st is None or not stat.S_ISREG(st.st_mode):
        raise CheckpointError(f"checkpoint {path}: {STORE} is missing or not a regular file")
    conn = sqlite3.connect(str(path / STORE))
    try:
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        conn.execute("PRAGMA journal_mode=DELETE")
    finally:
        conn.close()
    parts = read_checkpoint(path)
    write_checkpoint(path, parts)
    return path


def recover_checkpoint(path: Path) -> Path | None:
    """Undo a format-1 save killed between its two renames; returns the directory restored, if any.

    Format-1 saves renamed the live checkpoint to `.NAME.old-XXXX` and then the new one into
    place. A kill between the two left no checkpoint at `path`; the `.old` one holds every
    acknowledged write, so it goes back. A write: the server calls it at start; Router.load never
    does (it names the directory in its error instead). Format-2 saves never rename a checkpoint.
    """
    path = Path(path)
    if path.exists():
        return None
    olds = _legacy_asides(path)
    if not olds:
        return None
    newest = max(olds, key=lambda p: p.stat().st_mtime_ns)
    os.rename(newest, path)
    log.warning("restored %s from %s (a format-1 save was interrupted between its renames)", path, newest.name)
    return newest


def _legacy_asides(path: Path) -> list[Path]:
    return [
        p
        for p in path.parent.glob(f".{path.name}.old-*")
        if not p.is_symlink() and p.is_dir() and (p / MANIFEST).is_file()
    ]


# ---------------------------------------------------------------- load


# (checkpoint dir, expert entries of the manifest with names relative to the dir, dim, metric, sha256
# to check, sha256 of every file) -> experts; a backend that keeps experts elsewhere opens them there.
OpenExperts = Callable[[Path, list[dict], int, str, dict, dict], list]


def read_checkpoint(
    path: Path, verify: bool = True, cache_dir: str | Path | None = None, open_experts: OpenExperts | None = None
) -> CheckpointParts:
    """The parts of a router from a checkpoint directory, read-only. `verify` checks every file's sha256 as it is read.

    Reads the pointer once, then that version's files. If one is missing and the pointer has moved
    on (a save collected the version meanwhile), starts again from the new pointer. `open_experts`
    opens the experts (default expert_files.read_experts: into this process).
    """
    path = Path(path)
    if not path.exists() and _legacy_asides(path):
        raise CheckpointError(
            f"no checkpoint at {path}, but {_legacy_asides(path)[0].name} beside it holds one: a format-1 save was "
            f"interrupted between its renames; rename it back (moe_router.checkpoint.io.recover_checkpoint does)"
        )
    for _ in range(READ_ATTEMPTS):
        where = locate(path)
        try:
            return _read_version(path, where, verify, cache_dir, open_experts or read_experts)
        except FileMissing:
            if locate(path) == where:
                raise
            log.info("checkpoint %s: a save replaced %s while it was read; reading the new version", path, where.prefix)
    raise CheckpointError(
        f"checkpoint {path} was replaced {READ_ATTEMPTS} times while it was being read; "
        f"saves are too frequent for a load to finish"
    )


def _read_version(
    path: Path, where: Located, verify: bool, cache_dir: str | Path | None, open_experts: OpenExperts
) -> CheckpointParts:
    pre = where.prefix
    m = read_located_manifest(path, where, verify)
    try:
        digests = {pre + rel: d for rel, d in m.files.items()}  # names relative to `path`, as expert_files reads
        infos = [
            {
                "name": e.name,
                "specialization": e.specialization,
                "parent": e.parent,
                "size": e.size,
                "vectors": pre + e.vectors,
                "ids": pre + e.ids,
            }
            for e in m.experts
        ]
        experts = open_experts(path, infos, m.dim, m.metric, digests if verify else {}, digests)
        try:
            embedder = embedder_from_spec(m.embedder, cache_dir=cache_dir)
        except (TypeError, ValueError) as exc:
            raise CheckpointError(f"checkpoint {path}: cannot rebuild its embedder {m.embedder!r} ({exc})") from None
        check = m.files if verify else {}
        store = _read_store(path, pre, m, check)
        gate = _load_gate(path, pre, m, check, len(experts)) if m.gate_config is not None else None
        counts = np.array([m.stats.get(e.name, (0, 0.0))[0] for e in experts], dtype=np.int64)
        sums = np.array([m.stats.get(e.name, (0, 0.0))[1] for e in experts], dtype=np.float64)
        return CheckpointParts(
            dim=m.dim,
            metric=m.metric,
            embedder=embedder,
            gate=gate,
            experts=experts,
            store=store,
            counts=counts,
            confidence_sums=sums,
            abstain_threshold=m.abstain_threshold,
            prior_weight=m.prior_weight,
            config=m.config,
            metrics=m.metrics,
            manifest=m.raw,
        )
    except CheckpointError:
        raise
    except (KeyError, TypeError, ValueError, AttributeError, OverflowError) as exc:
        raise CheckpointError(f"checkpoint {path} has an invalid manifest or files: {exc}") from None


def _check_digest(path: Path, rel: str, data: bytes, digest: str | None) -> None:
    if digest is not None and hashlib.sha256(data).hexdigest() != digest:
        raise CheckpointError(f"checkpoint {path}: {rel} is corrupted (sha256 does not match the manifest)")


def _read_store(path: Path, pre: str, m: Manifest, digests: dict[str, str]) -> MetadataStore:
    """The store as a private in-memory database, loaded from the file's bytes (no SQLite file is opened)."""
    if m.format_version == LEGACY_VERSION:
        wal = lstat_inside(path, f"{STORE}-wal")
        if wal is not None and wal.st_size > 0:
            raise CheckpointError(
                f"checkpoint {path} is in format 1 and {STORE}-wal holds writes not yet in {STORE} (feedback a "
                f"format-1 server committed); convert it once with moe_router.checkpoint.convert_legacy({str(path)!r})"
            )
    data = read_checked(path, pre + STORE)
    _check_digest(path, pre + STORE, data, digests.get(STORE))
    try:
        return MetadataStore.from_image(data, f"{path}/{pre}{STORE}")
    except ValueError as exc:
        raise CheckpointError(f"checkpoint {path}: {exc}") from None


def _load_gate(path: Path, pre: str, m: Manifest, digests: dict[str, str], num_experts: int) -> Gate:
    config = dict(m.gate_config)
    if config.get("dim") != m.dim or config.get("num_experts") != num_experts:
        raise CheckpointError(
            f"checkpoint {path}: gate config (dim={config.get('dim')}, num_experts={config.get('num_experts')}) "
            f"does not match the checkpoint (dim={m.dim}, {num_experts} experts)"
        )
    rel = pre + m.gate_file
    data = read_checked(path, rel)
    _check_digest(path, rel, data, digests.get(m.gate_file))
    try:
        state = load_safetensors(data)
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"checkpoint {path}: {rel} is corrupted ({exc})") from None
    members, hidden = config.get("members", 1), config.get("hidden_dims", [])
    if isinstance(members, int) and isinstance(hidden, list) and members * (len(hidden) + 1) > len(state):
        # Building the gate loops over members and layers: a forged count must not run for hours.
        raise CheckpointError(
            f"checkpoint {path}: gate config ({members} members x {len(hidden) + 1} layers) "
            f"cannot fit the {len(state)} tensors of {rel}"
        )
    try:
        gate = Gate(**config)
        if "prototypes" in state:
            gate.resize_prototypes(int(state["prototypes"].shape[0]))
        gate.load_state_dict(state, strict=True)
    except (RuntimeError, TypeError, ValueError) as exc:
        raise CheckpointError(f"checkpoint {path}: gate weights do not fit the gate config ({exc})") from None
    return gate.eval()
