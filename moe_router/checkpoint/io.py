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
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors, save_file

from moe_router.checkpoint.format import (
    FORMAT, FORMAT_VERSION, GATE_FILE, LEGACY_VERSION, MANIFEST, MAX_MANIFEST_BYTES, MAX_POINTER_BYTES, POINTER, STORE,
    VERSIONS, CheckpointError, CheckpointParts, ExpertEntry, Manifest, lstat_inside, open_inside, parse_manifest,
    parse_pointer, pointer_bytes, read_inside, sha256_file, version_dir, version_number,
)
from moe_router.embed.registry import embedder_from_spec
from moe_router.gate.model import Gate
from moe_router.index.expert import Expert, SavedCopy
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


def _fingerprint(st: os.stat_result) -> tuple[int, int, int, int]:
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


def _unchanged(file: Path, digest: str, fingerprint: tuple | None, recheck: bool) -> bool:
    """Whether `file` still holds what had `digest`: re-hashed, or (recheck=False) the same inode, size and mtime."""
    st = os.lstat(file)
    if not stat.S_ISREG(st.st_mode):
        return False
    if not recheck and fingerprint is not None:
        return _fingerprint(st) == fingerprint
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
        if not (_unchanged(saved.vectors, saved.vectors_sha256, saved.vectors_stat, recheck)
                and _unchanged(saved.ids, saved.ids_sha256, saved.ids_stat, recheck)):
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
                {"name": e.name, "specialization": e.specialization, "parent": e.parent, "size": e.ntotal,
                 "vectors": vec_rel, "ids": ids_rel}
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
        for rel in [*(x["vectors"] for x in experts), *(x["ids"] for x in experts),
                    *([GATE_FILE] if gate_info else []), STORE]:
            if rel not in files:
                files[rel] = sha256_file(tmp / rel)
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
        e.saved = SavedCopy(vec, ids, files[info["vectors"]], files[info["ids"]],
                            _fingerprint(os.lstat(vec)), _fingerprint(os.lstat(ids)))
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
    kept = {current, *older[len(older) - (keep - 1):]} if keep > 1 else {current}
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
    return [p for p in path.parent.glob(f".{path.name}.old-*")
            if not p.is_symlink() and p.is_dir() and (p / MANIFEST).is_file()]


# ---------------------------------------------------------------- load


_BLOCK = 1 << 22  # bytes read, and hashed, at a time


# numpy parses a .npy header with ast.literal_eval, and CPython 3.11 can raise a spurious
# SystemError ("AST constructor recursion depth mismatch", python/cpython#106905) when two
# threads build ASTs at once: experts are read side by side, their headers one at a time.
_HEADER_LOCK = threading.Lock()


class _Missing(Exception):
    """A file of the version being read does not exist (collected by a save meanwhile, or never there)."""

    def __init__(self, rel: str) -> None:
        super().__init__(rel)
        self.rel = rel


@dataclass(frozen=True)
class _Version:
    """What a reader found at the checkpoint: the files' directory and what the pointer said."""

    prefix: str  # "versions/NNNNNN/" (format 2) or "" (format 1)
    manifest_sha256: str | None  # from CURRENT; None for format 1

    @property
    def format_version(self) -> int:
        return FORMAT_VERSION if self.prefix else LEGACY_VERSION


def _open(path: Path, rel: str) -> BinaryIO:
    try:
        return open_inside(path, rel)
    except FileNotFoundError:
        raise _Missing(rel) from None
    except NotADirectoryError:
        raise CheckpointError(f"checkpoint {path}: a directory on the way to {rel} is not a directory") from None
    except OSError as exc:
        raise CheckpointError(f"checkpoint {path}: {rel} cannot be read ({exc})") from None


def _read_all(path: Path, rel: str, limit: int | None = None) -> bytes:
    with _open(path, rel) as f:
        size = os.fstat(f.fileno()).st_size
        if limit is not None and size > limit:
            raise CheckpointError(f"checkpoint {path}: {rel} is {size} bytes; at most {limit} are expected")
        try:
            return f.read()
        except OSError as exc:
            raise CheckpointError(f"checkpoint {path}: {rel} cannot be read ({exc})") from None


def _locate(path: Path) -> _Version:
    if not path.is_dir():
        raise CheckpointError(f"no checkpoint at {path}: expected a directory written by Router.save or scripts/train.py")
    try:
        raw = _read_all(path, POINTER, MAX_POINTER_BYTES)
    except _Missing:
        raw = None
    if raw is not None:
        n, digest = parse_pointer(raw, f"{path}/{POINTER}")
        return _Version(version_dir(n) + "/", digest)
    if lstat_inside(path, MANIFEST) is not None:
        return _Version("", None)
    raise CheckpointError(f"{path} is not a moe_router checkpoint: {POINTER} (and {MANIFEST} of format 1) is missing")


def read_checkpoint(path: Path, verify: bool = True, cache_dir: str | Path | None = None) -> CheckpointParts:
    """The parts of a router from a checkpoint directory, read-only. `verify` checks every file's sha256 as it is read.

    Reads the pointer once, then that version's files. If one is missing and the pointer has moved
    on (a save collected the version meanwhile), starts again from the new pointer.
    """
    path = Path(path)
    if not path.exists() and _legacy_asides(path):
        raise CheckpointError(
            f"no checkpoint at {path}, but {_legacy_asides(path)[0].name} beside it holds one: a format-1 save was "
            f"interrupted between its renames; rename it back (moe_router.checkpoint.io.recover_checkpoint does)")
    for _ in range(READ_ATTEMPTS):
        where = _locate(path)
        try:
            return _read_version(path, where, verify, cache_dir)
        except _Missing as missing:
            if _locate(path) == where:
                raise CheckpointError(f"checkpoint {path} is incomplete: {missing.rel} is missing") from None
            log.info("checkpoint %s: a save replaced %s while it was read; reading the new version", path, where.prefix)
    raise CheckpointError(f"checkpoint {path} was replaced {READ_ATTEMPTS} times while it was being read; "
                          f"saves are too frequent for a load to finish")


def _read_version(path: Path, where: _Version, verify: bool, cache_dir: str | Path | None) -> CheckpointParts:
    pre = where.prefix
    raw = _read_all(path, pre + MANIFEST, MAX_MANIFEST_BYTES)
    if verify and where.manifest_sha256 is not None and hashlib.sha256(raw).hexdigest() != where.manifest_sha256:
        raise CheckpointError(f"checkpoint {path}: {pre}{MANIFEST} is corrupted (sha256 does not match {POINTER})")
    m = parse_manifest(raw, f"{path}/{pre}{MANIFEST}", path, where.format_version)
    try:
        digests = m.files if verify else {}
        # Experts are read side by side: sha256 and copying run on every core (reads release the GIL).
        with ThreadPoolExecutor(max(1, min(len(m.experts), os.cpu_count() or 1))) as pool:
            experts = list(pool.map(lambda e: _read_expert(path, pre, e, m, digests), m.experts))
        _check_ids_unique(path, experts)
        try:
            embedder = embedder_from_spec(m.embedder, cache_dir=cache_dir)
        except (TypeError, ValueError) as exc:
            raise CheckpointError(f"checkpoint {path}: cannot rebuild its embedder {m.embedder!r} ({exc})") from None
        store = _read_store(path, pre, m, digests)
        gate = _load_gate(path, pre, m, digests, len(experts)) if m.gate_config is not None else None
        counts = np.array([m.stats.get(e.name, (0, 0.0))[0] for e in experts], dtype=np.int64)
        sums = np.array([m.stats.get(e.name, (0, 0.0))[1] for e in experts], dtype=np.float64)
        return CheckpointParts(
            dim=m.dim, metric=m.metric, embedder=embedder, gate=gate, experts=experts, store=store, counts=counts,
            confidence_sums=sums, abstain_threshold=m.abstain_threshold, config=m.config, metrics=m.metrics,
            manifest=m.raw,
        )
    except (CheckpointError, _Missing):
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
                f"format-1 server committed); convert it once with moe_router.checkpoint.convert_legacy({str(path)!r})")
    data = _read_all(path, pre + STORE)
    _check_digest(path, pre + STORE, data, digests.get(STORE))
    try:
        return MetadataStore.from_image(data, f"{path}/{pre}{STORE}")
    except ValueError as exc:
        raise CheckpointError(f"checkpoint {path}: {exc}") from None


def _check_ids_unique(path: Path, experts: list[Expert]) -> None:
    """Ids are global: one id stored twice (in one expert or two) would make hits ambiguous."""
    if not experts:
        return
    ids = np.sort(np.concatenate([e.ids for e in experts]))
    if len(ids) and ids[0] < 0:
        owner = next(e.name for e in experts if (e.ids < 0).any())
        raise CheckpointError(f"checkpoint {path}: expert {owner!r} holds the negative id {int(ids[0])}; ids are >= 0")
    dup = ids[1:][ids[1:] == ids[:-1]]
    if len(dup):
        owners = [e.name for e in experts if (e.ids == dup[0]).any()]
        raise CheckpointError(f"checkpoint {path}: id {int(dup[0])} is stored more than once (experts {owners}); "
                              f"ids must be unique across experts")


def _read_npy_into(path: Path, rel: str, f: BinaryIO, out: np.ndarray, digest: str | None) -> None:
    """Fill `out` from the open .npy file `rel` in one pass, checking the file's sha256 on the way when `digest` is set.

    One read serves both the check and the load (reading twice cost more than the 3 s budget at 1M
    x 384). Only `out`'s dtype and shape are accepted, so object arrays are refused, never unpickled.
    """
    sha = hashlib.sha256() if digest is not None else None
    try:
        os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_SEQUENTIAL)  # read ahead more from disk
        problem = _read_npy_data(f, out, sha)
        if sha is not None and problem is None:
            for block in iter(lambda: f.read(_BLOCK), b""):  # bytes after the data count too
                sha.update(block)
    except OSError as exc:
        problem = f"is corrupted ({exc})"
    if digest is not None:
        try:
            if problem:  # a damaged file: hash all of it, as a whole-file check would
                f.seek(0)
                sha = hashlib.sha256()
                for block in iter(lambda: f.read(_BLOCK), b""):
                    sha.update(block)
            actual = sha.hexdigest()
        except OSError:
            actual = None
        if actual != digest:
            raise CheckpointError(f"checkpoint {path}: {rel} is corrupted (sha256 does not match the manifest)")
    if problem:
        raise CheckpointError(f"checkpoint {path}: {rel} {problem}")


def _read_npy_data(f: BinaryIO, out: np.ndarray, sha) -> str | None:
    """Read an open .npy file's array into `out` (hashing header and data into `sha`); what is wrong, or None."""
    try:
        with _HEADER_LOCK:
            version = np.lib.format.read_magic(f)
            read_header = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
            if version not in read_header:
                return f"is corrupted (unsupported .npy format version {version})"
            shape, fortran_order, dtype = read_header[version](f)
    except Exception as exc:  # numpy parses the header text: hostile bytes raise many kinds of error
        return f"is corrupted (unreadable .npy header: {type(exc).__name__})"
    if dtype != out.dtype or tuple(shape) != out.shape:
        return f"has dtype {dtype} and shape {tuple(shape)}, expected {out.dtype} {out.shape}"
    if fortran_order and out.ndim > 1:
        return "is corrupted (Fortran order; checkpoints hold C-order arrays)"
    if sha is not None:
        data_start = f.tell()
        f.seek(0)
        sha.update(f.read(data_start))
    buf = memoryview(out.reshape(-1).view(np.uint8))  # out is C-contiguous: a view, filled in place
    for start in range(0, buf.nbytes, _BLOCK):
        chunk = buf[start : start + _BLOCK]
        if f.readinto(chunk) != len(chunk):
            return "is corrupted (the file ends before its data does)"
        if sha is not None:
            sha.update(chunk)
    return None


def _read_expert(path: Path, pre: str, info: ExpertEntry, m: Manifest, digests: dict[str, str]) -> Expert:
    """One expert's ids, then its vectors read straight into its index (sha256-checked when `digests` lists them).

    The manifest's digests are recorded with the expert (Expert.saved) when they were checked, so a
    later save may link these files instead of writing them again.
    """
    n = info.size
    vec_rel, ids_rel = pre + info.vectors, pre + info.ids
    with _open(path, ids_rel) as fi, _open(path, vec_rel) as fv:
        for f, rel, row_bytes in ((fi, ids_rel, 8), (fv, vec_rel, 4 * m.dim)):
            if os.fstat(f.fileno()).st_size < n * row_bytes:  # a hostile size must not become a huge allocation
                raise CheckpointError(f"checkpoint {path}: {rel} is corrupted (the manifest says {n} rows; "
                                      f"the file is too small to hold them)")
        expert = Expert(info.name, m.dim, m.metric, info.specialization, info.parent)
        ids = np.empty(n, dtype=np.int64)
        _read_npy_into(path, ids_rel, fi, ids, digests.get(info.ids))
        _read_npy_into(path, vec_rel, fv, expert.add_in_place(ids), digests.get(info.vectors))
        if info.vectors in digests and info.ids in digests:  # checked: a later save may link these files
            root = path.absolute()
            expert.saved = SavedCopy(root / vec_rel, root / ids_rel, digests[info.vectors], digests[info.ids],
                                     _fingerprint(os.fstat(fv.fileno())), _fingerprint(os.fstat(fi.fileno())))
    return expert


def _load_gate(path: Path, pre: str, m: Manifest, digests: dict[str, str], num_experts: int) -> Gate:
    config = dict(m.gate_config)
    if config.get("dim") != m.dim or config.get("num_experts") != num_experts:
        raise CheckpointError(
            f"checkpoint {path}: gate config (dim={config.get('dim')}, num_experts={config.get('num_experts')}) "
            f"does not match the checkpoint (dim={m.dim}, {num_experts} experts)"
        )
    rel = pre + m.gate_file
    data = _read_all(path, rel)
    _check_digest(path, rel, data, digests.get(m.gate_file))
    try:
        state = load_safetensors(data)
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"checkpoint {path}: {rel} is corrupted ({exc})") from None
    members, hidden = config.get("members", 1), config.get("hidden_dims", [])
    if isinstance(members, int) and isinstance(hidden, list) and members * (len(hidden) + 1) > len(state):
        # Building the gate loops over members and layers: a forged count must not run for hours.
        raise CheckpointError(f"checkpoint {path}: gate config ({members} members x {len(hidden) + 1} layers) "
                              f"cannot fit the {len(state)} tensors of {rel}")
    try:
        gate = Gate(**config)
        if "prototypes" in state:
            gate.resize_prototypes(int(state["prototypes"].shape[0]))
        gate.load_state_dict(state, strict=True)
    except (RuntimeError, TypeError, ValueError) as exc:
        raise CheckpointError(f"checkpoint {path}: gate weights do not fit the gate config ({exc})") from None
    return gate.eval()
