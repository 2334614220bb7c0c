"""Checkpoint format: the layout, the pointer, and the one manifest schema that writer and reader share.

Layout (format 2), LevelDB-style: immutable version directories and one small pointer file.

    CURRENT                        {"format", "version": n, "manifest_sha256"}; replaced atomically by save
    versions/NNNNNN/manifest.json  dims, metric, embedder, gate, experts, sha256 of every other file
    versions/NNNNNN/gate.safetensors, store.sqlite, experts/EEEE.npy, experts/EEEE.ids.npy,
    versions/NNNNNN/calibration.npy (optional: the judged queries the gate was calibrated on)

A reader reads CURRENT once and then only files of that version, which are never changed after
they are written. The writer builds the manifest with build_manifest and checks it with the
reader's own parse_manifest before it switches CURRENT: a save never commits what a load refuses.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from moe_router.errors import CheckpointError
from moe_router.safe_files import check_rel, lstat_inside, open_inside
from moe_router.types import ExpertSpec

FORMAT = "moe_router.checkpoint"


FORMAT_VERSION = 2  # what save writes and load reads


POINTER = "CURRENT"


VERSIONS = "versions"


MANIFEST = "manifest.json"


STORE = "store.sqlite"


GATE_FILE = "gate.safetensors"


CALIBRATION_FILE = "calibration.npy"  # float32 (n, d): the judged queries the gate was calibrated on


MAX_DIM = 1 << 16  # no embedding model comes close; a hostile dim must not reach FAISS


MAX_POINTER_BYTES = 4096


MAX_MANIFEST_BYTES = 64 << 20  # a manifest with a config and thousands of experts is a few MB


_SHA256 = re.compile(r"[0-9a-f]{64}")


_VERSION_DIR = re.compile(r"[0-9]{6,}")


def version_dir(n: int) -> str:
    """The directory of version `n`, relative to the checkpoint."""
    return f"{VERSIONS}/{n:06d}"


def version_number(name: str) -> int | None:
    """n for a version directory's name ('000007' -> 7); None for any other name."""
    return int(name) if _VERSION_DIR.fullmatch(name) else None


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
    """What a reader found at the checkpoint: the current version's directory and its manifest's sha256."""

    prefix: str  # "versions/NNNNNN/"
    manifest_sha256: str


def locate(path: Path) -> Located:
    """Read CURRENT (once) and say where the current version's files are."""
    if not path.is_dir():
        raise CheckpointError(
            f"no checkpoint at {path}: expected a directory written by Router.save or scripts/train.py"
        )
    try:
        raw = read_checked(path, POINTER, MAX_POINTER_BYTES)
    except FileMissing:
        raise CheckpointError(f"{path} is not a moe_router checkpoint: {POINTER} is missing") from None
    n, digest = parse_pointer(raw, f"{path}/{POINTER}")
    return Located(version_dir(n) + "/", digest)


def current_version(path: Path) -> int | None:
    """The version CURRENT points to; None without a (readable) pointer."""
    try:
        raw = read_checked(path, POINTER, MAX_POINTER_BYTES)
        return parse_pointer(raw, f"{path}/{POINTER}")[0]
    except (OSError, CheckpointError):
        return None


# ---------------------------------------------------------------- the manifest


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
    "decide_weight",
    "metrics",
    "config",
    "calibration",
}
_CALIBRATION_KEYS = {"file", "size", "experts", "load_floor", "bias"}
_EXPERT_KEYS = {"name", "specialization", "parent", "size", "vectors", "ids"}


@dataclass(frozen=True)
class ExpertEntry:
    """One expert as the manifest lists it (files relative to the version directory)."""

    spec: ExpertSpec
    size: int
    vectors: str
    ids: str


@dataclass(frozen=True)
class CalibrationEntry:
    """The calibration queries as the manifest lists them: their file, and each one's expert, in order."""

    file: str
    experts: list[str]
    load_floor: float | None
    bias: bool


@dataclass(frozen=True)
class Manifest:
    """A manifest that passed the schema: every field typed, every file the checkpoint uses listed with its sha256."""

    dim: int
    metric: str
    embedder: dict | None
    gate_config: dict | None
    gate_file: str | None
    experts: list[ExpertEntry]
    files: dict[str, str]  # file name (relative to the version) -> sha256, for every file read
    stats: dict[str, tuple[int, float]]  # expert -> (queries, confidence sum)
    abstain_threshold: float | None
    prior_weight: float
    config: dict
    metrics: dict
    calibration: CalibrationEntry | None = None  # None: an older checkpoint, or none kept
    decide_weight: float = 0.0  # 0: an older checkpoint, or no re-decision


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

    def str(self, value: Any, what: str) -> str:
        if not isinstance(value, str):
            raise self.fail(f"{what} must be a string, got {value!r}")
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


def parse_manifest(raw: bytes, where: str, root: Path) -> Manifest:
    """The manifest from its bytes, checked against the schema; CheckpointError naming the field.

    The one definition of a valid manifest: the reader calls it on what it reads, the writer on what
    it is about to commit.
    """
    try:
        obj = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise CheckpointError(f"{where} is corrupted: not valid JSON ({exc})") from None
    if not isinstance(obj, dict) or obj.get("format") != FORMAT:
        raise CheckpointError(f"{where} is not a moe_router manifest (expected format {FORMAT!r})")
    version = obj.get("format_version")
    if isinstance(version, bool) or not isinstance(version, int) or version != FORMAT_VERSION:
        raise CheckpointError(f"{where} has format_version {version!r}; this moe_router reads version {FORMAT_VERSION}")
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
        try:
            spec = ExpertSpec(e["name"], e.get("specialization", ""), e.get("parent"))
        except ValueError as exc:  # the library's own rule for what describes an expert
            raise s.fail(f"{what}: {exc}") from None
        experts.append(
            ExpertEntry(
                spec,
                s.int(e["size"], f"{what}.size", 0, 1 << 40),
                "/".join(check_rel(root, s.str(e["vectors"], f"{what}.vectors"))),
                "/".join(check_rel(root, s.str(e["ids"], f"{what}.ids"))),
            )
        )
    seen: dict[str, str] = {}
    for e in experts:
        if e.spec.name in seen.values():
            raise s.fail(f"duplicate expert name {e.spec.name!r}; expert names must be unique")
        for rel in (e.vectors, e.ids):
            if rel in seen:
                raise s.fail(
                    f"{rel} is used by experts {seen[rel]!r} and {e.spec.name!r}; each file holds one expert's rows"
                )
            seen[rel] = e.spec.name
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
    names = {e.spec.name for e in experts}
    calibration = _calibration(s, obj.get("calibration"), names, root)
    if calibration is not None and calibration.file in {*seen, gate_file, STORE}:
        raise s.fail(f"calibration.file {calibration.file} is also another part's file; it holds the queries alone")
    used = [
        *(x for e in experts for x in (e.vectors, e.ids)),
        *([gate_file] if gate_file else []),
        *([calibration.file] if calibration else []),
        STORE,
    ]
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
        decide_weight=s.real(obj.get("decide_weight", 0.0), "'decide_weight'", 0.0),
        config=s.obj(obj.get("config") or {}, "'config'"),
        metrics=s.obj(obj.get("metrics") or {}, "'metrics'"),
        calibration=calibration,
    )


def _calibration(s: _Schema, obj: Any, names: set[str], root: Path) -> CalibrationEntry | None:
    """The 'calibration' entry: a file, its row count, one known expert name per row, the calibration settings."""
    if obj is None:
        return None
    s.obj(obj, "'calibration'")
    s.keys(obj, _CALIBRATION_KEYS, _CALIBRATION_KEYS, "'calibration'")
    size = s.int(obj["size"], "calibration.size", 0, 1 << 40)
    experts = obj["experts"]
    if not isinstance(experts, list) or len(experts) != size:
        raise s.fail(f"calibration.experts must be a list of {size} expert names (calibration.size)")
    for i, name in enumerate(experts):
        if not isinstance(name, str) or name not in names:
            raise s.fail(f"calibration.experts[{i}] is {name!r:.60}, which is not an expert")
    floor = obj["load_floor"]
    bias = obj["bias"]
    if not isinstance(bias, bool):
        raise s.fail(f"calibration.bias must be true or false, got {bias!r}")
    return CalibrationEntry(
        "/".join(check_rel(root, s.str(obj["file"], "calibration.file"))),
        list(experts),
        None if floor is None else s.real(floor, "calibration.load_floor", 0.0),
        bias,
    )


def build_manifest(
    *,
    created: str,
    dim: int,
    metric: str,
    embedder: dict | None,
    embedder_name: str | None,
    gate: dict | None,
    experts: list[ExpertEntry],
    files: dict[str, str],
    stats: dict[str, tuple[int, float]],
    abstain_threshold: float | None,
    prior_weight: float,
    config: dict,
    metrics: dict,
    calibration: CalibrationEntry | None = None,
    decide_weight: float = 0.0,
) -> bytes:
    """The manifest's bytes as the writer commits them (parse_manifest reads them back)."""
    manifest = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "created": created,
        "dim": dim,
        "metric": metric,
        "embedder": embedder,
        "embedder_name": embedder_name,
        "gate": gate,
        "experts": [{**e.spec.as_dict(), "size": e.size, "vectors": e.vectors, "ids": e.ids} for e in experts],
        "files": files,
        "stats": {name: {"queries": int(q), "confidence_sum": float(c)} for name, (q, c) in stats.items()},
        "abstain_threshold": abstain_threshold,
        "prior_weight": prior_weight,
        "decide_weight": decide_weight,
        "metrics": metrics,
        "config": config,
    }
    if calibration is not None:
        manifest["calibration"] = {
            "file": calibration.file,
            "size": len(calibration.experts),
            "experts": calibration.experts,
            "load_floor": calibration.load_floor,
            "bias": calibration.bias,
        }
    # default=str: a config may hold paths and other objects; allow_nan=False: JSON has no NaN,
    # and a value a reader refuses must fail here, before anything is committed.
    try:
        return json.dumps(manifest, indent=2, default=str, allow_nan=False).encode()
    except ValueError as exc:
        raise CheckpointError(f"save: the manifest would hold a value JSON cannot store ({exc})") from None


def read_located_manifest(path: Path, where: Located, verify: bool = True) -> Manifest:
    """The manifest of the version `where` names, sha256-checked against CURRENT when `verify`, schema-checked."""
    rel = where.prefix + MANIFEST
    raw = read_checked(path, rel, MAX_MANIFEST_BYTES)
    if verify and hashlib.sha256(raw).hexdigest() != where.manifest_sha256:
        raise CheckpointError(f"checkpoint {path}: {rel} is corrupted (sha256 does not match {POINTER})")
    return parse_manifest(raw, f"{path}/{rel}", path)


def is_ours(path: Path) -> bool:
    """Whether `path` holds a checkpoint this project wrote: a CURRENT that parses as our pointer."""
    st = lstat_inside(path, POINTER)
    return st is not None and current_version(path) is not None
