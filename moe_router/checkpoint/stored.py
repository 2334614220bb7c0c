"""Experts as a checkpoint stores them: a description (StoredExpert) that reads itself into an index.

A backend opens experts from such descriptions (routing.backends: ExpertSource) without knowing
the format: the local backend calls read() in this process, the Ray backend in its actors. Kept
apart from checkpoint.io so that an expert actor reads its files without importing torch: this
module needs numpy, FAISS, the format and safe_files only. Files are opened as safe_files does
(regular files only, no link followed), sha256-checked while they are read.
"""

from __future__ import annotations

import hashlib
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np

from moe_router.checkpoint.format import CheckpointError, locate, open_checked, read_located_manifest
from moe_router.index.expert import Expert
from moe_router.types import ExpertSpec

_BLOCK = 1 << 22  # bytes read, and hashed, at a time


NPY_HEADER_MAX = 1 << 16  # bytes a .npy header may take (numpy writes 128, or a multiple of 64 for long shapes)


# numpy parses a .npy header with ast.literal_eval, and CPython 3.11 can raise a spurious
# SystemError ("AST constructor recursion depth mismatch", python/cpython#106905) when two
# threads build ASTs at once: experts are read side by side, their headers one at a time.
_HEADER_LOCK = threading.Lock()


def fingerprint(st: os.stat_result) -> tuple[int, int, int, int]:
    """(st_dev, st_ino, st_size, st_mtime_ns): what a stat-checked save compares."""
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


@dataclass(frozen=True)
class StoredExpert:
    """One expert of a checkpoint version: its description, size, and two files with their sha256."""

    root: str  # absolute checkpoint directory (actors may run in another working directory)
    spec: ExpertSpec
    size: int  # rows, as the manifest says
    dim: int
    metric: str
    vectors: str  # files relative to root (versions/NNNNNN/experts/EEEE.npy)
    ids: str
    vectors_sha256: str
    ids_sha256: str
    verify: bool = True  # check the sha256 while reading

    def read(self, recheck: bool = False) -> Expert:
        """The expert, its vectors read straight into its index.

        `recheck` (a restarted expert actor, which must hold exactly what it held before): the sha256
        is always checked, and when the files are gone (a later save collected the version) they are
        looked up by content in the checkpoint's current version.
        """
        try:
            return self._read(self.vectors, self.ids, self.verify or recheck)
        except CheckpointError:
            if not recheck:
                raise
            moved = self._find_by_content()
            if moved is None:
                raise
            return self._read(*moved, True)

    def _find_by_content(self) -> tuple[str, str] | None:
        root = Path(self.root)
        where = locate(root)
        manifest = read_located_manifest(root, where)
        for e in manifest.experts:
            if (manifest.files.get(e.vectors), manifest.files.get(e.ids)) == (self.vectors_sha256, self.ids_sha256):
                return where.prefix + e.vectors, where.prefix + e.ids
        return None

    def _read(self, vectors: str, ids: str, verify: bool) -> Expert:
        root, n = Path(self.root), self.size
        with open_checked(root, ids) as fi, open_checked(root, vectors) as fv:
            for f, rel, row_bytes in ((fi, ids, 8), (fv, vectors, 4 * self.dim)):
                check_npy_size(root, rel, f, n, row_bytes)
            row_ids = np.empty(n, dtype=np.int64)
            _read_npy_into(root, ids, fi, row_ids, self.ids_sha256 if verify else None)
            expert, view = Expert.to_fill(self.spec, self.dim, self.metric, row_ids)
            _read_npy_into(root, vectors, fv, view, self.vectors_sha256 if verify else None)
        return expert


def check_npy_size(root: Path, rel: str, f: BinaryIO, rows: int, row_bytes: int) -> None:
    """Refuse, before anything is allocated, a .npy file that cannot hold `rows` rows or holds far more.

    The bytes actually on disk count, not the apparent size: a sparse file (100 KB of blocks, 127 GB
    apparent) would otherwise pass a size check and end in a huge allocation.
    """
    st = os.fstat(f.fileno())
    data_bytes = rows * row_bytes
    if st.st_size < data_bytes:  # a hostile size must not become a huge allocation
        raise CheckpointError(
            f"checkpoint {root}: {rel} is corrupted (the manifest says {rows} rows; the file is too small to hold them)"
        )
    if st.st_size > data_bytes + NPY_HEADER_MAX:
        raise CheckpointError(
            f"checkpoint {root}: {rel} is corrupted (the manifest says {rows} rows; the file is {st.st_size} bytes, "
            f"far more than they take)"
        )
    allocated = st.st_blocks * 512
    if data_bytes > (1 << 20) and allocated < data_bytes // 2:
        # Real files are allocated block by block; a filesystem that compresses may store less,
        # but not half of float32 vectors. A hole this large is a forged file.
        raise CheckpointError(
            f"checkpoint {root}: {rel} is a sparse file ({allocated} bytes on disk for {st.st_size} "
            "apparent); expert files are written whole"
        )


def read_npy(root: Path, rel: str, out: np.ndarray, digest: str | None) -> None:
    """Fill `out` (its dtype and shape only) from the .npy file `rel`, sha256-checked when `digest` is set."""
    with open_checked(root, rel) as f:
        check_npy_size(root, rel, f, out.shape[0], out.itemsize * int(np.prod(out.shape[1:])))
        _read_npy_into(root, rel, f, out, digest)


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
