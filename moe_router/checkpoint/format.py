"""Checkpoint format: the layout, safe reads of its files, the strict manifest schema, CheckpointError.

Layout (format 2), LevelDB-style: immutable version directories and one small pointer file.

    CURRENT                       {"format", "version": n, "manifest_sha256"}; replaced atomically by save
    versions/NNNNNN/manifest.json  dims, metric, embedder, gate, experts, sha256 of every other file
    versions/NNNNNN/gate.safetensors, store.sqlite, experts/EEEE.npy, experts/EEEE.ids.npy

A reader reads CURRENT once and then only files of that version, which are never changed after
they are written. Format 1 (everything at the top level, no pointer) is still read.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

import numpy as np

if TYPE_CHECKING:  # annotations only: the format (and expert_files) must import without torch
    from moe_router.embed.base import Embedder
    from moe_router.gate.model import Gate
    from moe_router.index.expert import Expert
    from moe_router.store import MetadataStore


log = logging.getLogger(__name__)


FORMAT = "moe_router.checkpoint"


FORMAT_VERSION = 2  # what save writes


LEGACY_VERSION = 1  # the flat layout of earlier releases: read, never written


POINTER = "CURRENT"


VERSIONS = "versions"


MANIFEST = "manifest.json"


STORE = "store.sqlite"


GATE_FILE = "gate.safetensors"


MAX_DIM = 1 << 16  # no embedding model comes close; a hostile dim must not reach FAISS


MAX_POINTER_BYTES = 4096


MAX_MANIFEST_BYTES = 64 << 20  # a manifest with a config and thousands of experts is a few MB


class CheckpointError(ValueError):
    """A checkpoint is missing, incomplete, corrupted, hostile or of an unsupported version."""


# ---------------------------------------------------------------- safe reads

_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]*")
_SHA256 = re.compile(r"[0-9a-f]{64}")
_VERSION_DIR = re.compile(r"[0-9]{6,}")


def version_dir(n: int) -> str:
    """The directory of version `n`, relative to the checkpoint."""
    return f"{VERSIONS}/{n:06d}"


def version_number(name: str) -> int | None:
    """n for a version directory's name ('000007' -> 7); None for any other name."""
    return int(name) if _VERSION_DIR.fullmatch(name) else None


def check_rel(root: Path, rel: Any) -> list[str]:
    """The components of a file name inside the checkpoint, refusing absolute names, '..' and odd characters."""
    if not isinstance(rel, str) or not rel or rel.startswith("/"):
        raise CheckpointError(f"checkpoint {root}: file name {rel!r} in the manifest points outside the checkpoint")
    parts = rel.split("/")
    if ".." in parts:
        raise CheckpointError(f"checkpoint {root}: file name {rel!r} in the manifest points outside the checkpoint")
    if not all(_NAME.fullmatch(p) for p in parts):
        raise CheckpointError(
            f"checkpoint {root}: file name {rel!r} in the manifest is not a plain relative name "
            f"(letters, digits, '.', '_', '-', separated by '/')"
        )
    return parts


def _kind(mode: int) -> str:
    for test, name in (
        (stat.S_ISLNK, "symbolic link"),
        (stat.S_ISFIFO, "FIFO (named pipe)"),
        (stat.S_ISSOCK, "socket"),
        (stat.S_ISCHR, "character device"),
        (stat.S_ISBLK, "block device"),
        (stat.S_ISDIR, "directory"),
    ):
        if test(mode):
            return name
    return "special file"


def open_inside(root: Path, rel: str) -> BinaryIO:
    """Open the regular file `rel` of the checkpoint `root` for reading, following no symbolic link.

    Each directory on the way is opened relative to the last with O_NOFOLLOW, the file is checked
    with lstat before it is opened (O_NOFOLLOW | O_NONBLOCK, so a FIFO can never block) and with
    fstat after: a link, FIFO, socket, device or directory is a CheckpointError naming the file.
    A regular file atomically replaced by another between the two (a writer saving) is read as the new one.
    Only `root` itself, the path the caller gave, may be a link. FileNotFoundError when missing.
    """
    parts = check_rel(root, rel)
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        for i, name in enumerate(parts):
            st = os.lstat(name, dir_fd=fd)
            last = i == len(parts) - 1
            if not (stat.S_ISREG(st.st_mode) if last else stat.S_ISDIR(st.st_mode)):
                sub = "/".join(parts[: i + 1])
                expected = "a regular file" if last else "a directory"
                raise CheckpointError(
                    f"checkpoint {root}: {sub} is a {_kind(st.st_mode)}, not {expected}; "
                    f"only regular files inside the checkpoint are read"
                )
            flags = (os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC) | (0 if last else os.O_DIRECTORY)
            nfd = os.open(name, flags, dir_fd=fd)
            os.close(fd)
            fd = nfd
        after = os.fstat(fd)
        # A file replaced between lstat and open (a writer's atomic os.replace of CURRENT does that) is
        # fine as long as what was opened is a regular file: O_NOFOLLOW kept it from being a link, and
        # the content is checked against its sha256 by the caller.
        if not stat.S_ISREG(after.st_mode):
            raise CheckpointError(
                f"checkpoint {root}: {rel} was replaced by a {_kind(after.st_mode)} while it was "
                "being opened; only regular files inside the checkpoint are read"
            )
        f = os.fdopen(fd, "rb")
        fd = -1
        return f
    finally:
        if fd >= 0:
            os.close(fd)


def lstat_inside(root: Path, rel: str) -> os.stat_result | None:
    """lstat of `rel` inside `root` (directories on the way not followed); None when it does not exist."""
    parts = check_rel(root, rel)
    try:
        fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_NONBLOCK | os.O_CLOEXEC)
        try:
            for name in parts[:-1]:
                st = os.lstat(name, dir_fd=fd)
                if not stat.S_ISDIR(st.st_mode):
                    return None
                nfd = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=fd)
                os.close(fd)
                fd = nfd
            return os.lstat(parts[-1], dir_fd=fd)
        finally:
            os.close(fd)
    except FileNotFoundError:
        return None


def read_inside(root: Path, rel: str, limit: int | None = None) -> bytes:
    """All bytes of the regular file `rel` (open_inside), refusing one larger than `limit` bytes."""
    with open_inside(root, rel) as f:
        size = os.fstat(f.fileno()).st_size
        if limit is not None and size > limit:
            raise CheckpointError(f"checkpoint {root}: {rel} is {size} bytes; at most {limit} are expected")
        return f.read()


def sha256_file(path: Path) -> str:
    """sha256 of a file this process wrote or is about to link (save side; reads go through open_inside)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


class FileMissing(CheckpointError):
    """A file of the version being read does not exist (collected by a save meanwhile, or never there)."""

    def __init__(self, path: Path, rel: str) -> None:
        super().__init__(f"checkpoint {path} is incomplete: {rel} is missing")
        self.rel = rel


def open_checked(path: Path, rel: str) -> BinaryIO:
    """open_inside with every failure as a CheckpointError naming the file (FileMissing when it does not exist)."""
    try:
        return open_inside(path, rel)
    except FileNotFoundError:
        raise FileMissing(path, rel) from None
    except NotADirectoryError:
        raise CheckpointError(f"checkpoint {path}: a directory on the way to {rel} is not a directory") from None
    except OSError as exc:
        raise CheckpointError(f"checkpoint {path}: {rel} cannot be read ({exc})") from None


def read_checked(path: Path, rel: str, limit: int | None = None) -> bytes:
    """All bytes of `rel` (open_checked), refusing one larger than `limit` bytes."""
    with open_checked(path, rel) as f:
        size = os.fstat(f.fileno()).st_size
        if limit is not None and size > limit:
            raise CheckpointError(f"checkpoint {path}: {rel} is {size} bytes; at most {limit} are expected")
        try:
            return f.read()
        except OSError as exc:
            raise CheckpointError(f"checkpoint {path}: {rel} cannot be read ({exc})") from None


# ---------------------------------------------------------------- the pointer


def parse_pointer(raw: bytes, where: str) -> tuple[int, str]:
    """(version number, sha256 of its manifest) from the bytes of CURRENT."""
    try:
        ptr = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{where} is corrupted: not valid JSON ({exc})") from None
    if not isinstance(ptr, dict) or ptr.get("format") != FORMAT or set(ptr) != {"format", "version", "manifest_sha256"}:
        raise CheckpointError(
            f"{where} is not a moe_router pointer: expected an object with keys "
            f"format={FORMAT!r}, version, manifest_sha256"
        )
    n, digest = ptr["version"], ptr["manifest_sha256"]
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n < 10**12:
        raise CheckpointError(f"{where} is corrupted: version must be an integer >= 1, got {n!r}")
    if not isinstance(digest, str) or not _SHA256.fullmatch(digest):
        raise CheckpointError(f"{where} is corrupted: manifest_sha256 must be 64 hex digits, got {digest!r}")
    return n, digest


def pointer_bytes(n: int, manifest_sha256: str) -> bytes:
    return (json.dumps({"format": FORMAT, "version": n, "manifest_sha256": manifest_sha256}) + "\n").encode()


@dataclass(frozen=True)
class Located:
    """What a reader found at the checkpoint: the files' directory and what the pointer said."""

    prefix: str  # "versions/NNNNNN/" (format 2) or "" (format 1)
    manifest_sha256: str | None  # from CURRENT; None for format 1

    @property
    def format_version(self) -> int:
        return FORMAT_VERSION if self.prefix else LEGACY_VERSION


def locate(path: Path) -> Located:
    """Read CURRENT (once) and say where the current version's files are; format 1 has no pointer."""
    if not path.is_dir():
        raise CheckpointError(
            f"no checkpoint at {path}: expected a directory written by Router.save or scripts/train.py"
        )
    try:
        raw = read_checked(path, POINTER, MAX_POINTER_BYTES)
    except FileMissing:
        raw = None
    if raw is not None:
        n, digest = parse_pointer(raw, f"{path}/{POINTER}")
        return Located(version_dir(n) + "/", digest)
    if lstat_inside(path, MANIFEST) is not None:
        return Located("", None)
    raise CheckpointError(f"{path} is not a moe_router checkpoint: {POINTER} (and {MANIFEST} of format 1) is missing")


def read_located_manifest(path: Path, where: Located, verify: bool = True) -> Manifest:
    """The manifest of the version `where` names, sha256-checked against CURRENT when `verify`, schema-checked."""
    rel = where.prefix + MANIFEST
    raw = read_checked(path, rel, MAX_MANIFEST_BYTES)
    if verify and where.manifest_sha256 is not None and hashlib.sha256(raw).hexdigest() != where.manifest_sha256:
        raise CheckpointError(f"checkpoint {path}: {rel} is corrupted (sha256 does not match {POINTER})")
    return parse_manifest(raw, f"{path}/{rel}", path, where.format_version)


def read_manifest(path: Path) -> dict[str, Any]:
    """The current manifest as a dict whose file names ('vectors', 'ids', 'files') are relative to `path` itself.

    For readers of single files (an expert actor re-reading its expert after saves moved it).
    """
    path = Path(path)
    where = locate(path)
    m = read_located_manifest(path, where)
    pre = where.prefix
    out = dict(m.raw)
    out["experts"] = [{**e, "vectors": pre + e["vectors"], "ids": pre + e["ids"]} for e in m.raw["experts"]]
    out["files"] = {pre + rel: digest for rel, digest in m.files.items()}
    return out


# ---------------------------------------------------------------- the manifest


@dataclass(frozen=True)
class ExpertEntry:
    """One expert as the manifest lists it (files relative to the version directory)."""

    name: str
    specialization: str
    parent: str | None
    size: int
    vectors: str
    ids: str


@dataclass
class Manifest:
    """A manifest that passed the schema: every field typed, every file the checkpoint uses listed with its sha256."""

    format_version: int
    dim: int
    metric: str
    embedder: dict | None
    gate_config: dict | None
    gate_file: str | None
    experts: list[ExpertEntry]
    files: dict[str, str]  # file name -> sha256, for every file read (the store too, from format 2)
    stats: dict[str, tuple[int, float]]  # expert -> (queries, confidence sum)
    abstain_threshold: float | None
    prior_weight: float
    config: dict
    metrics: dict
    raw: dict  # the JSON object as read (Router.manifest)


_TOP_KEYS = {
    "format",
    "format_version",
    "created",
    "dim",
    "metric",
    "embedder",
    "embedder_name",
    "gate",
    "experts",
    "files",
    "stats",
    "abstain_threshold",
    "prior_weight",
    "metrics",
    "config",
}
_EXPERT_KEYS = {"name", "specialization", "parent", "size", "vectors", "ids"}


class _Schema:
    """Field checks with messages that name the manifest and the field."""

    def __init__(self, where: str) -> None:
        self.where = where

    def fail(self, what: str) -> CheckpointError:
        return CheckpointError(f"{self.where} is corrupted: {what}")

    def int(self, value: Any, what: str, low: int, high: int) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.fail(f"{what} must be an integer, got {value!r}")
        if not low <= value <= high:
            raise self.fail(f"{what} must be between {low} and {high}, got {value}")
        return value

    def real(self, value: Any, what: str, low: float = -math.inf) -> float:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < low:
            raise self.fail(f"{what} must be a finite number >= {low}, got {value!r}")
        return float(value)

    def str(self, value: Any, what: str, empty: bool = True) -> str:
        if not isinstance(value, str) or (not empty and not value.strip()):
            raise self.fail(f"{what} must be a {'' if empty else 'non-empty '}string, got {value!r}")
        return value

    def obj(self, value: Any, what: str, allow_none: bool = False) -> dict | None:
        if value is None and allow_none:
            return None
        if not isinstance(value, dict):
            raise self.fail(f"{what} must be an object{' or null' if allow_none else ''}, got {type(value).__name__}")
        return value

    def keys(self, obj: dict, allowed: set[str], required: set[str], what: str) -> None:
        missing = sorted(required - set(obj))
        if missing:
            raise CheckpointError(f"{self.where} is incomplete: missing {missing[0]!r}{' in ' + what if what else ''}")
        extra = sorted(set(obj) - allowed)
        if extra:
            raise self.fail(f"unknown key {extra[0]!r}{' in ' + what if what else ''}; expected only {sorted(allowed)}")


def parse_manifest(raw: bytes, where: str, root: Path, expected_version: int) -> Manifest:
    """The manifest from its bytes, checked against the schema of `expected_version`; CheckpointError naming the field."""
    try:
        obj = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise CheckpointError(f"{where} is corrupted: not valid JSON ({exc})") from None
    if not isinstance(obj, dict) or obj.get("format") != FORMAT:
        raise CheckpointError(f"{where} is not a moe_router manifest (expected format {FORMAT!r})")
    version = obj.get("format_version")
    if isinstance(version, bool) or not isinstance(version, int) or version != expected_version:
        raise CheckpointError(
            f"{where} has format_version {version!r}; expected {expected_version} here "
            f"(this moe_router reads versions {LEGACY_VERSION} and {FORMAT_VERSION})"
        )
    s = _Schema(where)
    s.keys(obj, _TOP_KEYS, {"format", "format_version", "dim", "metric", "experts", "files"}, "")
    dim = s.int(obj["dim"], "'dim'", 1, MAX_DIM)
    metric = s.str(obj["metric"], "'metric'")
    if metric not in ("ip", "l2"):
        raise s.fail(f"'metric' must be 'ip' or 'l2', got {metric!r}")
    embedder = s.obj(obj.get("embedder"), "'embedder'", allow_none=True)
    if obj.get("embedder_name") is not None:
        s.str(obj["embedder_name"], "'embedder_name'")
    if not isinstance(obj["experts"], list):
        raise s.fail(f"'experts' must be a list, got {type(obj['experts']).__name__}")
    experts = []
    for i, e in enumerate(obj["experts"]):
        what = f"experts[{i}]"
        s.obj(e, what)
        s.keys(e, _EXPERT_KEYS, {"name", "size", "vectors", "ids"}, what)
        name = s.str(e["name"], f"{what}.name", empty=False)
        parent = e.get("parent")
        if parent is not None:
            s.str(parent, f"{what}.parent")
        experts.append(
            ExpertEntry(
                name,
                s.str(e.get("specialization", ""), f"{what}.specialization"),
                parent,
                s.int(e["size"], f"{what}.size", 0, 1 << 40),
                "/".join(check_rel(root, s.str(e["vectors"], f"{what}.vectors"))),
                "/".join(check_rel(root, s.str(e["ids"], f"{what}.ids"))),
            )
        )
    seen: dict[str, str] = {}
    for e in experts:
        if e.name in seen.values():
            raise s.fail(f"duplicate expert name {e.name!r}; expert names must be unique")
        for rel in (e.vectors, e.ids):
            if rel in seen:
                raise s.fail(
                    f"{rel} is used by experts {seen[rel]!r} and {e.name!r}; each file holds one expert's rows"
                )
            seen[rel] = e.name
    gate = s.obj(obj.get("gate"), "'gate'", allow_none=True)
    gate_config = gate_file = None
    if gate is not None:
        s.keys(gate, {"config", "file"}, {"config", "file"}, "'gate'")
        gate_config = s.obj(gate["config"], "gate.config")
        gate_file = "/".join(check_rel(root, s.str(gate["file"], "gate.file")))
    files = s.obj(obj["files"], "'files'")
    for rel, digest in files.items():
        if not isinstance(digest, str) or not _SHA256.fullmatch(digest):
            raise s.fail(f"files[{rel!r}] must be a sha256 (64 hex digits), got {digest!r}")
    used = [*(x for e in experts for x in (e.vectors, e.ids)), *([gate_file] if gate_file else [])]
    if expected_version >= 2:
        used.append(STORE)  # format 1 did not checksum its store
    unlisted = [rel for rel in used if rel not in files]
    if unlisted:
        raise CheckpointError(
            f"{where} is incomplete: 'files' does not list {unlisted[0]}; every file the checkpoint "
            f"uses must be listed with its sha256"
        )
    unused = sorted(set(files) - set(used))
    if unused:
        raise s.fail(f"'files' lists {unused[0]}, which no part of the checkpoint uses")
    stats_obj = s.obj(obj.get("stats", {}), "'stats'")
    names = {e.name for e in experts}
    stats = {}
    for name, entry in stats_obj.items():
        if name not in names:
            raise s.fail(f"'stats' has an entry for {name!r}, which is not an expert")
        s.obj(entry, f"stats[{name!r}]")
        s.keys(entry, {"queries", "confidence_sum"}, set(), f"stats[{name!r}]")
        stats[name] = (
            s.int(entry.get("queries", 0), f"stats[{name!r}].queries", 0, 1 << 62),
            s.real(entry.get("confidence_sum", 0.0), f"stats[{name!r}].confidence_sum", 0.0),
        )
    threshold = obj.get("abstain_threshold")
    return Manifest(
        format_version=version,
        dim=dim,
        metric=metric,
        embedder=embedder,
        gate_config=gate_config,
        gate_file=gate_file,
        experts=experts,
        files=dict(files),
        stats=stats,
        abstain_threshold=None if threshold is None else s.real(threshold, "'abstain_threshold'"),
        prior_weight=s.real(obj.get("prior_weight", 0.0), "'prior_weight'", 0.0),
        config=s.obj(obj.get("config") or {}, "'config'"),
        metrics=s.obj(obj.get("metrics") or {}, "'metrics'"),
        raw=obj,
    )


@dataclass
class CheckpointParts:
    """Everything a checkpoint holds, as objects: what Router.save writes and Router.load rebuilds a router from."""

    dim: int
    metric: str
    embedder: Embedder | None
    gate: Gate | None
    experts: list[Expert]  # in routing order
    store: MetadataStore  # a loaded checkpoint's store is private (in memory): nothing reaches the file
    counts: np.ndarray  # (E,) routing counts saved with the checkpoint
    confidence_sums: np.ndarray  # (E,) sums of the chosen experts' probabilities
    abstain_threshold: float | None = None
    prior_weight: float = 0.0  # Router.prior_weight: how much the gate's probability weighs when hits are merged
    config: dict = field(default_factory=dict)  # the resolved training config
    metrics: dict = field(default_factory=dict)
    manifest: dict = field(default_factory=dict)  # as read (empty when writing)
