"""Saving and loading routers as checkpoint directories: versioned atomic save, read-only verified load.

A save writes a complete new version directory under a temporary name, checks its manifest with
the reader's schema, renames it to versions/NNNNNN (a name no other version has), then replaces
the pointer file CURRENT atomically (temporary file, fsync, os.replace, fsync of the directory).
A load reads CURRENT once and then only files of that version, which are never changed; it opens
every file with O_NOFOLLOW as a regular file, writes nothing, renames nothing, and works on
read-only storage. If a save collects the version being read meanwhile, the load starts again.

A save writes only into an empty directory or one of this project's checkpoints (a CURRENT that
parses as our pointer), and only ever removes names it writes itself (numbered versions,
`.tmp-*` directories, `.CURRENT.tmp-*` files): a user's files are never touched.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import stat
import threading
import time
import uuid
import weakref
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from moe_router.checkpoint.format import (
    CALIBRATION_FILE,
    GATE_FILE,
    MANIFEST,
    POINTER,
    STORE,
    VERSIONS,
    CalibrationEntry,
    CheckpointError,
    ExpertEntry,
    FileMissing,
    Located,
    Manifest,
    build_manifest,
    current_version,
    is_ours,
    locate,
    parse_manifest,
    pointer_bytes,
    read_checked,
    read_located_manifest,
    version_dir,
    version_number,
)
from moe_router.checkpoint.stored import StoredExpert, fingerprint, read_npy
from moe_router.embed.registry import embedder_from_spec
from moe_router.gate.model import Gate
from moe_router.index.expert import Content
from moe_router.routing.backends import ExpertBackend, LocalBackend
from moe_router.routing.parts import CalibrationSet, RouterParts
from moe_router.routing.router import Router
from moe_router.routing.stats import RoutingStats
from moe_router.safe_files import kind, lstat_inside, sha256_file
from moe_router.store import MetadataStore

log = logging.getLogger(__name__)


KEEP_VERSIONS = 3  # versions kept on disk: the current one and the two before it (see collect_garbage)


READ_ATTEMPTS = 50  # loads started again because saves collected the version being read, before giving up


# ---------------------------------------------------------------- files known to hold an expert's rows


@dataclass(frozen=True)
class SavedFiles:
    """Files that hold exactly an expert's rows, with their sha256 and stat when last checked or written."""

    vectors: Path
    ids: Path
    vectors_sha256: str
    ids_sha256: str
    vectors_stat: tuple[int, int, int, int]
    ids_stat: tuple[int, int, int, int]


# Keyed by the rows' identity (Expert.content), not by the expert: a parent change keeps the rows and
# their files. Weak: the entry goes when the last expert holding those rows does.
_saved: weakref.WeakKeyDictionary[Content, SavedFiles] = weakref.WeakKeyDictionary()
_saved_lock = threading.Lock()


def _remember(content: Content, files: SavedFiles) -> None:
    with _saved_lock:
        _saved[content] = files


def _known(content: Content) -> SavedFiles | None:
    with _saved_lock:
        return _saved.get(content)


# ---------------------------------------------------------------- save


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_bytes(path: Path, data: bytes) -> None:
    """A new file holding `data`, fsynced; its mode follows the umask, as every file of a checkpoint's does."""
    with open(path, "xb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _write_npy(path: Path, arr: np.ndarray) -> None:
    with open(path, "xb") as f:
        np.save(f, arr, allow_pickle=False)
        f.flush()
        os.fsync(f.fileno())


def _unchanged(file: Path, digest: str, recorded: tuple, recheck: bool) -> bool:
    """Whether `file` still holds what had `digest`: re-hashed, or (recheck=False) the same inode, size and mtime."""
    st = os.lstat(file)
    if not stat.S_ISREG(st.st_mode):
        return False
    if not recheck:
        return fingerprint(st) == recorded
    return sha256_file(file) == digest


def _link_saved(saved: SavedFiles | None, vectors: Path, ids: Path, recheck: bool) -> bool:
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


def _ours_only(path: Path) -> bool:
    """Whether a directory without a pointer holds only what a first save killed before its commit leaves."""
    for name in os.listdir(path):
        if name.startswith(f".{POINTER}.tmp-"):
            continue
        if name != VERSIONS or not stat.S_ISDIR(os.lstat(path / name).st_mode):
            return False
        if any(version_number(v) is None and not v.startswith(".tmp-") for v in os.listdir(path / VERSIONS)):
            return False
    return True


def _prepare_root(path: Path) -> None:
    """Make `path` ready to take a new version, refusing anything that is not empty or one of our checkpoints."""
    for p in (path, *path.parents):
        if p.exists() or p.is_symlink():
            if not p.is_dir():
                where = "it" if p == path else p
                raise CheckpointError(
                    f"save: cannot write a checkpoint directory at {path}: {where} is a file, not a directory"
                )
            break
    try:
        path.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise CheckpointError(
            f"save: cannot write a checkpoint directory at {path}: a parent is not a directory"
        ) from None
    if os.listdir(path) and not is_ours(path) and not _ours_only(path):
        raise CheckpointError(
            f"save: refusing to save into {path}: it is not empty and is not a moe_router checkpoint (no valid "
            f"{POINTER}); choose an empty or new directory"
        )
    st = lstat_inside(path, VERSIONS)
    if st is not None and not stat.S_ISDIR(st.st_mode):
        raise CheckpointError(
            f"save: refusing to save into {path}: {VERSIONS} is a {kind(st.st_mode)}, not a directory"
        )
    st = lstat_inside(path, POINTER)
    if st is not None and not stat.S_ISREG(st.st_mode):
        raise CheckpointError(
            f"save: refusing to save into {path}: {POINTER} is a {kind(st.st_mode)}, not a regular file"
        )


def save_router(router: Router, path: str | Path, recheck: bool = True, link: bool = True) -> Path:
    """Write `router` as a new version of the checkpoint `path`, switched to atomically; returns `path`.

    An expert whose rows have not changed since they were last loaded or saved has its files
    hard-linked (after a sha256 check; `recheck=False`: a stat check) instead of written again, so
    saving after adding or removing one expert costs little more than writing that expert.
    Readers see the previous version until CURRENT is replaced, and the new one after.
    The manifest is checked with the reader's schema before anything is committed. `link=False`
    writes every file (what a first save costs; the benchmarks measure it).
    """
    path = Path(path)
    parts = router.parts()
    if parts.gate is not None:
        defects = parts.gate.defects()
        if defects:
            raise CheckpointError(
                f"save: the gate cannot route ({'; '.join(defects)}); refusing to save it "
                "(retrain it, or load the last good checkpoint)"
            )
    _prepare_root(path)
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
        entries = []
        for i, e in enumerate(parts.experts):
            vec_rel, ids_rel = f"experts/{i:04d}.npy", f"experts/{i:04d}.ids.npy"
            saved = _known(e.content) if link else None
            if _link_saved(saved, tmp / vec_rel, tmp / ids_rel, recheck):
                files[vec_rel], files[ids_rel] = saved.vectors_sha256, saved.ids_sha256
            else:
                _write_npy(tmp / vec_rel, e.vectors())
                _write_npy(tmp / ids_rel, e.ids)
            entries.append(ExpertEntry(e.spec, e.ntotal, vec_rel, ids_rel))
        gate_info = None
        if parts.gate is not None:
            state = {k: v.detach().cpu().contiguous() for k, v in parts.gate.state_dict().items()}
            data = save_safetensors(state)
            _write_bytes(tmp / GATE_FILE, data)
            files[GATE_FILE] = hashlib.sha256(data).hexdigest()
            gate_info = {"config": parts.gate.config(), "file": GATE_FILE}
        calibration = None
        cal = parts.calibration
        if len(cal):
            _write_npy(tmp / CALIBRATION_FILE, cal.x)
            files[CALIBRATION_FILE] = sha256_file(tmp / CALIBRATION_FILE)
            calibration = CalibrationEntry(CALIBRATION_FILE, list(cal.experts), cal.load_floor, cal.bias)
        image = parts.store.image()  # written and hashed from memory: one pass, no re-read
        _write_bytes(tmp / STORE, image)
        files[STORE] = hashlib.sha256(image).hexdigest()
        del image
        for entry in entries:
            for rel in (entry.vectors, entry.ids):
                if rel not in files:
                    files[rel] = sha256_file(tmp / rel)
        counts, sums = parts.stats.counts, parts.stats.confidence_sums
        raw = build_manifest(
            created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            dim=parts.dim,
            metric=parts.metric,
            embedder=parts.embedder.spec() if parts.embedder is not None else None,
            embedder_name=parts.embedder.name if parts.embedder is not None else None,
            gate=gate_info,
            experts=entries,
            files=files,
            stats={e.name: (int(c), float(s)) for e, c, s in zip(parts.experts, counts, sums)},
            abstain_threshold=parts.abstain_threshold,
            prior_weight=parts.prior_weight,
            decide_weight=parts.decide_weight,
            config=parts.config,
            metrics=parts.metrics,
            calibration=calibration,
        )
        parse_manifest(raw, f"save to {path}: the manifest about to be written", path)  # the reader's own schema
        _write_bytes(tmp / MANIFEST, raw)
        _fsync_dir(tmp / "experts")
        _fsync_dir(tmp)
        os.rename(tmp, final)  # `final` is a new name: nothing is replaced, readers never look here yet
        _fsync_dir(versions)
        _write_bytes(pointer_tmp, pointer_bytes(n, hashlib.sha256(raw).hexdigest()))
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
    for e, entry in zip(parts.experts, entries):
        vec, ids = where / entry.vectors, where / entry.ids
        _remember(
            e.content,
            SavedFiles(
                vec, ids, files[entry.vectors], files[entry.ids], fingerprint(os.lstat(vec)), fingerprint(os.lstat(ids))
            ),
        )
    collect_garbage(path, n)
    return path


def collect_garbage(path: Path, current: int, keep: int = KEEP_VERSIONS) -> None:
    """Delete versions but the current one and the `keep - 1` before it, and unfinished saves' leftovers.

    Why keep more than one: a reader that read the pointer just before a save must still find
    its version's files; with `keep` versions it does unless `keep - 1` more saves finish during
    its load, and then it starts again from the new pointer (load_router), so nothing is lost
    either way. Old versions cost little: unchanged experts are hard links to the same files.
    Only names this module writes are removed. Never raises (a failure to delete costs disk space,
    not correctness); never follows a link.
    """
    versions = path / VERSIONS
    try:
        names = os.listdir(versions)
        top = os.listdir(path)
    except OSError:
        return
    older = sorted(n for n in map(version_number, names) if n is not None and n < current)
    kept = {current, *older[len(older) - (keep - 1) :]} if keep > 1 else {current}
    for name in names:
        n = version_number(name)
        if (n is not None and n not in kept) or name.startswith(".tmp-"):
            shutil.rmtree(versions / name, ignore_errors=True)  # refuses links: nothing outside is touched
    for name in top:  # pointers of saves killed before their os.replace
        if name.startswith(f".{POINTER}.tmp-"):
            try:
                (path / name).unlink()
            except OSError:
                pass


# ---------------------------------------------------------------- load


def load_router(
    path: str | Path,
    verify: bool = True,
    cache_dir: str | Path | None = None,
    backend: ExpertBackend | None = None,
) -> Router:
    """A router from a checkpoint directory, read-only. `verify` checks every file's sha256 as it is read.

    Reads the pointer once, then that version's files. If one is missing and the pointer has moved
    on (a save collected the version meanwhile), starts again from the new pointer. The experts
    are opened by `backend` (default: into this process) from their descriptions (StoredExpert).
    """
    path = Path(path)
    backend = backend if backend is not None else LocalBackend()
    for _ in range(READ_ATTEMPTS):
        where = locate(path)
        try:
            return _read_version(path, where, verify, cache_dir, backend)
        except FileMissing:
            if locate(path) == where:
                raise
            log.info("checkpoint %s: a save replaced %s while it was read; reading the new version", path, where.prefix)
    raise CheckpointError(
        f"checkpoint {path} was replaced {READ_ATTEMPTS} times while it was being read; "
        f"saves are too frequent for a load to finish"
    )


def _read_version(
    path: Path, where: Located, verify: bool, cache_dir: str | Path | None, backend: ExpertBackend
) -> Router:
    pre = where.prefix
    m = read_located_manifest(path, where, verify)
    root = str(path.absolute())
    sources = [
        StoredExpert(
            root,
            e.spec,
            e.size,
            m.dim,
            m.metric,
            pre + e.vectors,
            pre + e.ids,
            m.files[e.vectors],
            m.files[e.ids],
            verify,
        )
        for e in m.experts
    ]
    try:
        experts = backend.open(sources)
        check_ids_unique(path, [e.ids for e in experts], [e.name for e in experts])
        if verify:  # checked: a later save may link these files instead of writing them again
            for src, e in zip(sources, experts):
                vec, ids = Path(root) / src.vectors, Path(root) / src.ids
                try:
                    stats = fingerprint(os.lstat(vec)), fingerprint(os.lstat(ids))
                except OSError:  # a save collected this version after it was read: nothing to link from
                    continue
                _remember(e.content, SavedFiles(vec, ids, src.vectors_sha256, src.ids_sha256, *stats))
        try:
            embedder = embedder_from_spec(m.embedder, cache_dir=cache_dir)
        except (TypeError, ValueError) as exc:
            raise CheckpointError(f"checkpoint {path}: cannot rebuild its embedder {m.embedder!r} ({exc})") from None
        check = m.files if verify else {}
        store = _read_store(path, pre, check)
        gate = _load_gate(path, pre, m, check, len(experts)) if m.gate_config is not None else None
        calibration = _read_calibration(path, pre, m, check) if m.calibration is not None else None
        counts = np.array([m.stats.get(e.name, (0, 0.0))[0] for e in experts], dtype=np.int64)
        sums = np.array([m.stats.get(e.name, (0, 0.0))[1] for e in experts], dtype=np.float64)
        parts = RouterParts(
            dim=m.dim,
            metric=m.metric,
            experts=tuple(experts),
            gate=gate,
            embedder=embedder,
            store=store,
            stats=RoutingStats(counts, sums),
            abstain_threshold=m.abstain_threshold,
            prior_weight=m.prior_weight,
            decide_weight=m.decide_weight,
            config=m.config,
            metrics=m.metrics,
            backend=backend,
            calibration=calibration,
        )
        return Router.from_parts(parts)
    except CheckpointError:
        raise
    except (KeyError, TypeError, ValueError, AttributeError, OverflowError) as exc:
        raise CheckpointError(f"checkpoint {path} has an invalid manifest or files: {exc}") from None


def check_ids_unique(path: Path, ids: list[np.ndarray], names: list[str]) -> None:
    """Ids are global: one id stored twice (in one expert or two) would make hits ambiguous."""
    if not ids:
        return
    every = np.sort(np.concatenate(ids))
    if len(every) and every[0] < 0:
        owner = next(n for n, x in zip(names, ids) if (x < 0).any())
        raise CheckpointError(
            f"checkpoint {path}: expert {owner!r} holds the negative id {int(every[0])}; ids are >= 0"
        )
    dup = every[1:][every[1:] == every[:-1]]
    if len(dup):
        owners = [n for n, x in zip(names, ids) if (x == dup[0]).any()]
        raise CheckpointError(
            f"checkpoint {path}: id {int(dup[0])} is stored more than once (experts {owners}); "
            f"ids must be unique across experts"
        )


def _check_digest(path: Path, rel: str, data: bytes, digest: str | None) -> None:
    if digest is not None and hashlib.sha256(data).hexdigest() != digest:
        raise CheckpointError(f"checkpoint {path}: {rel} is corrupted (sha256 does not match the manifest)")


def _read_store(path: Path, pre: str, digests: dict[str, str]) -> MetadataStore:
    """The store as a private in-memory database, loaded from the file's bytes (no SQLite file is opened)."""
    data = read_checked(path, pre + STORE)
    _check_digest(path, pre + STORE, data, digests.get(STORE))
    try:
        return MetadataStore.from_image(data, f"{path}/{pre}{STORE}")
    except ValueError as exc:
        raise CheckpointError(f"checkpoint {path}: {exc}") from None


def _read_calibration(path: Path, pre: str, m: Manifest, digests: dict[str, str]) -> CalibrationSet:
    """The calibration queries: float32 (n, d) with n the manifest's count of expert names."""
    entry = m.calibration
    x = np.empty((len(entry.experts), m.dim), dtype=np.float32)
    read_npy(path, pre + entry.file, x, digests.get(entry.file))
    if not np.isfinite(x).all():
        raise CheckpointError(f"checkpoint {path}: {pre + entry.file} holds NaN or inf; calibration queries are finite")
    return CalibrationSet(x, tuple(entry.experts), entry.load_floor, entry.bias)


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
        with torch.device("meta"):  # the config's shapes, without allocating them: a forged config costs nothing
            skeleton = _gate_for(config, state)
        want = {k: tuple(v.shape) for k, v in skeleton.state_dict().items()}
        got = {k: tuple(v.shape) for k, v in state.items()}
        if want != got:
            wrong = next(k for k in sorted(set(want) | set(got)) if want.get(k) != got.get(k))
            raise ValueError(f"{wrong}: the config needs {want.get(wrong)}, {rel} holds {got.get(wrong)}")
        gate = _gate_for(config, state)
        gate.load_state_dict(state, strict=True)
    except (RuntimeError, TypeError, ValueError, OverflowError) as exc:
        raise CheckpointError(f"checkpoint {path}: gate weights do not fit the gate config ({exc})") from None
    defects = gate.defects()
    if defects:
        raise CheckpointError(f"checkpoint {path}: the gate cannot route ({'; '.join(defects)})")
    return gate.eval()


def _gate_for(config: dict, state: dict) -> Gate:
    gate = Gate(**config)
    if "prototypes" in state:  # the experts changed since training: the saved count, not the config's
        gate.resize_prototypes(int(state["prototypes"].shape[0]))
    return gate
