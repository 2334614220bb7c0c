"""JSONL datasets.

Format, one JSON object a line: {"text": str, "domain": str, "label": str,
"split": "train" | "val" | "test"}. Any field may serve as the expert key (`domain` by
default, `label` for fine-grained experts); another may name each expert's parent.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import numpy as np

from moe_router.checks import check_int
from moe_router.data.base import StoredRows, TrainingDefaults, ValidationSet
from moe_router.data.jsonl import json_objects

REQUIRED_FIELDS = ("text", "domain", "label", "split")


SPLITS = ("train", "val", "test")

# The part of the validation rows set aside when a dataset is loaded with holdout_folds > 0:
# training (epoch choice, calibration) never sees it, so it measures the whole pipeline (cross-validation).
HELDOUT = "heldout"

# Validation on held-out rows (intent data, query vectors): the epoch is picked by recall@k against
# exhaustive search, the routing target there; hits of several experts are merged by score alone.
HELD_OUT_DEFAULTS = TrainingDefaults(monitor="recall", calibrate_bias=False, prior_weight=0.0)


@dataclass(frozen=True)
class Record:
    text: str
    domain: str
    label: str
    split: str


@dataclass
class TextDataset:
    """Records grouped by split, with the expert of each record decided by `expert_key`."""

    name: str
    records: list[Record]
    expert_key: str = "domain"
    parent_key: str | None = None
    oos: list[Record] = field(default_factory=list)  # out-of-scope queries, when the data has them

    def __post_init__(self) -> None:
        for key in (self.expert_key, self.parent_key):
            if key is not None and key not in ("domain", "label"):
                raise ValueError(f"expert_key/parent_key must be 'domain' or 'label', got {key!r}")
        if not self.split("train"):
            raise ValueError(f"dataset {self.name!r} has no training rows (split 'train'); expected at least one")
        self.experts = sorted({getattr(r, self.expert_key) for r in self.split("train")})
        self.parents: dict[str, str | None] = {e: None for e in self.experts}
        if self.parent_key:
            for r in self.split("train"):
                self.parents[getattr(r, self.expert_key)] = getattr(r, self.parent_key)

    needs_embedder = True
    has_judgments = False

    def split(self, name: str) -> list[Record]:
        return [r for r in self.records if r.split == name]

    def texts(self, split: str) -> list[str]:
        return [r.text for r in self.split(split)]

    def queries(self, split: str) -> list[str]:
        """What a router is asked with, for a split: here, its texts."""
        return self.texts(split)

    def gold_experts(self, split: str) -> list[str]:
        return [getattr(r, self.expert_key) for r in self.split(split)]

    def oos_texts(self, split: str) -> list[str]:
        return [r.text for r in self.oos if r.split == split]

    def metadata(self) -> list[dict]:
        """The stored metadata of each row of split('train')."""
        return [{"label": r.label, "domain": r.domain} for r in self.split("train")]

    def stored(self) -> StoredRows:
        """The train rows: their texts, experts and metadata."""
        return StoredRows(self.texts("train"), None, self.gold_experts("train"), self.metadata())

    def validation(self, seed: int) -> ValidationSet:
        """The 'val' rows of experts that train has (`seed` is unused: the rows were carved when loading)."""
        known = set(self.experts)
        rows = [r for r in self.split("val") if getattr(r, self.expert_key) in known]
        return ValidationSet([r.text for r in rows], [getattr(r, self.expert_key) for r in rows], stored=False)

    def training_queries(self) -> tuple[list[str], list[str]]:
        return [], []  # the train rows are the stored rows; there are no other queries

    def pseudo_queries(self, view: str) -> tuple[list[str], list[str]]:
        return [], []  # intent rows are queries already

    def defaults(self) -> TrainingDefaults:
        return HELD_OUT_DEFAULTS

    def expert_ids(self, split: str, unknown: int = -1) -> np.ndarray:
        """(n,) index of each record's expert; `unknown` for experts absent from train."""
        index = {e: i for i, e in enumerate(self.experts)}
        return np.array([index.get(getattr(r, self.expert_key), unknown) for r in self.split(split)], dtype=np.int64)


@dataclass
class VectorDataset:
    """Vectors without texts or labels (e.g. the synthetic set): experts come from k-means (`partition=N`).

    `vectors` maps a split name to its (n, d) array; 'train' holds what the experts store.
    """

    name: str
    vectors: dict[str, np.ndarray]
    experts: list[str] = field(default_factory=list)  # none: there are no labels to group by
    parents: dict[str, str | None] = field(default_factory=dict)  # none: experts come from k-means

    def __post_init__(self) -> None:
        unknown = set(self.vectors) - set(SPLITS)
        if unknown:
            raise ValueError(f"dataset {self.name!r}: unknown split(s) {sorted(unknown)}; expected some of {SPLITS}")
        train = self.vectors.get("train")
        if train is None or len(train) == 0:
            raise ValueError(f"dataset {self.name!r} has no training vectors (split 'train'); expected at least one")
        for split, x in self.vectors.items():
            if x.ndim != 2 or x.shape[1] != train.shape[1]:
                raise ValueError(
                    f"dataset {self.name!r}: split {split!r} has shape {x.shape}; "
                    f"expected (n, {train.shape[1]}) like 'train'"
                )

    needs_embedder = False
    has_judgments = False

    @property
    def dim(self) -> int:
        return int(self.vectors["train"].shape[1])

    def queries(self, split: str) -> np.ndarray:
        """(n, d) query vectors of a split (0 rows when the split is absent)."""
        return self.vectors.get(split, np.empty((0, self.dim), dtype=np.float32))

    def gold_experts(self, split: str) -> None:
        return None  # no labels: only a k-means partition gives queries a gold expert

    def oos_texts(self, split: str) -> list[str]:
        return []

    def stored(self) -> StoredRows:
        return StoredRows(None, self.vectors["train"], None, None)

    def validation(self, seed: int) -> ValidationSet:
        return ValidationSet(self.queries("val"), None, stored=False)

    def training_queries(self) -> tuple[list[str], list[str]]:
        return [], []

    def pseudo_queries(self, view: str) -> tuple[list[str], list[str]]:
        return [], []

    def defaults(self) -> TrainingDefaults:
        return HELD_OUT_DEFAULTS


def load_jsonl(path: str | Path) -> list[Record]:
    """Read and validate a dataset file; errors name the line and the problem."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"dataset file not found: {path} (resolved: {path.resolve()})")
    records: list[Record] = []
    for lineno, obj in json_objects(path, REQUIRED_FIELDS):
        missing = [k for k in REQUIRED_FIELDS if k not in obj]
        if missing:
            raise ValueError(f"{path}:{lineno}: missing field(s) {missing}; every line needs {REQUIRED_FIELDS}")
        for k in REQUIRED_FIELDS:
            if not isinstance(obj[k], str) or not obj[k].strip():
                raise ValueError(f"{path}:{lineno}: field {k!r} must be a non-empty string, got {obj[k]!r}")
        if obj["split"] not in SPLITS:
            raise ValueError(f"{path}:{lineno}: split must be one of {SPLITS}, got {obj['split']!r}")
        records.append(Record(obj["text"], obj["domain"], obj["label"], obj["split"]))
    if not records:
        raise ValueError(f"{path}: no records; expected JSON lines with fields {REQUIRED_FIELDS}")
    return records


def demo_path() -> Path:
    """The built-in demo corpus shipped inside the package."""
    return Path(str(resources.files("moe_router") / "demo" / "demo.jsonl"))


def carve_validation(records: list[Record], fraction: float, seed: int) -> list[Record]:
    """Move a seeded `fraction` of train rows to 'val' (for data with no validation split)."""
    if any(r.split == "val" for r in records) or fraction <= 0:
        return records
    train = [i for i, r in enumerate(records) if r.split == "train"]
    rng = np.random.default_rng(seed)
    moved = set(rng.choice(train, size=int(round(len(train) * fraction)), replace=False).tolist())
    return [Record(r.text, r.domain, r.label, "val") if i in moved else r for i, r in enumerate(records)]


def deal_holdout(records: list[Record], folds: int, fold: int, expert_key: str, seed: int = 0) -> list[Record]:
    """Fold `fold` of `folds` of the 'val' rows becomes split 'heldout'; 'val' keeps the others.

    Each expert's val rows are dealt round-robin after a seeded shuffle, the deal continuing from one
    expert to the next, so every fold keeps the experts' mix, the folds differ in size by at most one
    row and they partition 'val'.
    """
    check_int(folds, 2, 1000, "holdout_folds", "at most 1000; 0 = no held-out part of val")
    check_int(fold, 0, folds - 1, "holdout_fold", "holdout_folds - 1")
    val = [i for i, r in enumerate(records) if r.split == "val"]
    if len(val) < folds:
        raise ValueError(f"holdout_folds={folds} needs at least {folds} 'val' rows, the data has {len(val)}")
    rng = np.random.default_rng(seed)
    held: set[int] = set()
    dealt = 0
    for expert in sorted({getattr(records[i], expert_key) for i in val}):
        rows = rng.permutation([i for i in val if getattr(records[i], expert_key) == expert])
        held.update(int(i) for i in rows[(dealt + np.arange(len(rows))) % folds == fold])
        dealt += len(rows)
    return [Record(r.text, r.domain, r.label, HELDOUT) if i in held else r for i, r in enumerate(records)]


def load_dataset(
    path: str | None = None,
    name: str | None = None,
    expert_key: str = "domain",
    parent_key: str | None = None,
    val_fraction: float = 0.1,
    seed: int = 0,
    oos_path: str | None = None,
    holdout_folds: int = 0,
    holdout_fold: int = 0,
) -> TextDataset:
    """Load a JSONL dataset (`path=None`: the built-in demo corpus).

    `holdout_folds = F > 0` sets fold `holdout_fold` of the validation rows aside as split 'heldout'
    (see deal_holdout); the out-of-scope rows are not dealt (they stay in their own split).
    """
    file = Path(path) if path else demo_path()
    records = carve_validation(load_jsonl(file), val_fraction, seed)
    oos = load_jsonl(oos_path) if oos_path and Path(oos_path).is_file() else []
    data = TextDataset(name or file.stem, records, expert_key, parent_key, oos)  # checks expert_key
    if holdout_folds:  # the experts come from train, so dealing val afterwards leaves them as they are
        data.records = deal_holdout(data.records, holdout_folds, holdout_fold, expert_key)
    return data
