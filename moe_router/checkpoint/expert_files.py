"""Reading experts' files from a checkpoint directory (sha256-checked, straight into the index).

Kept apart from checkpoint.io so that a process that only holds experts (an expert actor of the Ray
backend) reads them without importing torch: this module needs numpy, FAISS and the format only.
Files are opened as checkpoint.format.open_inside does (regular files only, no link followed).
"""

from __future__ import annotations

import hashlib
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import BinaryIO

import numpy as np

from moe_router.checkpoint.format import CheckpointError, open_checked
from moe_router.index.expert import Expert, SavedCopy

_BLOCK = 1 << 22  # bytes read, and hashed, at a time


# numpy parses a .npy header with ast.literal_eval, and CPython 3.11 can raise a spurious
# SystemError ("AST constructor recursion depth mismatch", python/cpython#106905) when two
# threads build ASTs at once: experts are read side by side, their headers one at a time.
_HEADER_LOCK = threading.Lock()


def fingerprint(st: os.stat_result) -> tuple[int, int, int, int]:
    """(st_dev, st_ino, st_size, st_mtime_ns): what a stat-checked save compares (SavedCopy)."""
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


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


def read_expert(path: Path, info: dict, dim: int, metric: str, files: dict[str, str], digests: dict) -> Expert:
    """One expert's ids, then its vectors read straight into its index (sha256-checked when listed in `files`).

    `info` is the expert's manifest entry (name, specialization, parent, size, vectors, ids) with file
    names relative to `path`; `digests` is the manifest's sha256 of every file, recorded with the
    expert (Expert.saved) when `files` had them checked, so a later save may link these files.
    """
    n = int(info["size"])
    if n < 0:
        raise CheckpointError(f"checkpoint {path}: expert {info.get('name')!r} has size {n}; expected a count >= 0")
    vec_rel, ids_rel = info["vectors"], info["ids"]
    with open_checked(path, ids_rel) as fi, open_checked(path, vec_rel) as fv:
        for f, rel, row_bytes in ((fi, ids_rel, 8), (fv, vec_rel, 4 * dim)):
            if os.fstat(f.fileno()).st_size < n * row_bytes:  # a hostile size must not become a huge allocation
                raise CheckpointError(
                    f"checkpoint {path}: {rel} is corrupted (the manifest says {n} rows; "
                    f"the file is too small to hold them)"
                )
        expert = Expert(str(info["name"]), dim, metric, str(info.get("specialization", "")), info.get("parent"))
        ids = np.empty(n, dtype=np.int64)
        _read_npy_into(path, ids_rel, fi, ids, files.get(ids_rel))
        _read_npy_into(path, vec_rel, fv, expert.add_in_place(ids), files.get(vec_rel))
        pair = digests.get(vec_rel), digests.get(ids_rel)
        if vec_rel in files and ids_rel in files and all(isinstance(d, str) for d in pair):
            root = path.absolute()  # checked: a later save may link these files instead of rewriting them
            expert.saved = SavedCopy(
                root / vec_rel,
                root / ids_rel,
                *pair,
                fingerprint(os.fstat(fv.fileno())),
                fingerprint(os.fstat(fi.fileno())),
            )
    return expert


def read_experts(
    path: Path, infos: list[dict], dim: int, metric: str, files: dict[str, str], digests: dict
) -> list[Expert]:
    """Every expert of a checkpoint read into this process (read_expert), side by side; ids checked unique."""
    # sha256 and copying run on every core (reads release the GIL).
    with ThreadPoolExecutor(max(1, min(len(infos), os.cpu_count() or 1))) as pool:
        experts = list(pool.map(lambda info: read_expert(path, info, dim, metric, files, digests), infos))
    check_ids_unique(path, experts)
    return experts


def check_ids_unique(path: Path, experts: list[Expert]) -> None:
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
        raise CheckpointError(
            f"checkpoint {path}: id {int(dup[0])} is stored more than once (experts {owners}); "
            f"ids must be unique across experts"
        )
