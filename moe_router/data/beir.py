"""Retrieval data in BEIR layout: one folder per source, each source a natural expert.

    SOURCE/corpus.jsonl      {"_id": str, "title": str, "text": str}   the documents (title optional)
    SOURCE/queries.jsonl     {"_id": str, "text": str}                 the queries
    SOURCE/qrels/SPLIT.tsv   header, then query-id<TAB>corpus-id<TAB>score (score > 0 = relevant)

Documents are loaded at once (they are what the experts store). Queries and judgments are loaded
lazily, one split at a time, and only the queries that a split's judgments name are kept: the
training path asks only for its `splits_for_training`, so a test query is never read into training.
Malformed files raise ValueError("file:line: what is wrong").
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from moe_router.checks import check_int
from moe_router.data.base import StoredRows, TrainingDefaults, ValidationSet
from moe_router.data.datasets import HELD_OUT_DEFAULTS, HELDOUT, Record
from moe_router.data.jsonl import json_objects, lines

QUERY_SPLITS = ("train", "dev", "test")

# Merged hits ranked by similarity + 0.1 * log p(source) on any BEIR data. Measured on dev
# (docs/retrieval.md): 0.05 to 0.2 all beat 0 when 2+ sources are searched, on both benchmarks.
PRIOR_WEIGHT = 0.1

# Validating on judged real questions (dev): the epoch is picked by routing them to their source, as
# recall@k against exhaustive neighbours rewards sources that merely hold near documents (distractors);
# the sources' logits get a prior correction, as questions do not reach them in proportion to their documents.
JUDGED_DEFAULTS = TrainingDefaults(monitor="acc@1", calibrate_bias=True, prior_weight=PRIOR_WEIGHT)


@dataclass(frozen=True)
class Documents:
    """One source's corpus, in file order."""

    ids: list[str]
    titles: list[str]
    texts: list[str]


@dataclass(frozen=True)
class QuerySplit:
    """The judged queries of one split, over every source, in source then file order."""

    ids: list[str]
    texts: list[str]
    sources: list[str]  # the source whose judgments name the query (its relevant documents lie there)
    qrels: dict[str, dict[str, int]]  # query id -> {doc id: score}, scores > 0 only


def doc_text(title: str, text: str) -> str:
    """The one way a document becomes the text that is embedded: "title. text" (or whichever is present)."""
    title, text = title.strip(), text.strip()
    if not title:
        return text
    if not text:
        return title
    return f"{title} {text}" if title[-1] in ".?!:;" else f"{title}. {text}"


PSEUDO_VIEWS = ("title", "first_sentence")


def first_sentence(text: str, max_chars: int = 300) -> str:
    """The text up to its first sentence end (., ? or ! then a space), at most max_chars characters."""
    return re.split(r"(?<=[.?!])\s+", text.strip(), maxsplit=1)[0][:max_chars]


def _json_objects(path: Path, required: Sequence[str]) -> Iterator[tuple[int, dict]]:
    """(line number, object) of a JSONL file whose lines must hold string fields `required`."""
    for lineno, obj in json_objects(path, required):
        for key in required:
            if key not in obj:
                raise ValueError(f"{path}:{lineno}: missing field {key!r}; every line needs {list(required)}")
            if not isinstance(obj[key], str):
                raise ValueError(f"{path}:{lineno}: field {key!r} must be a string, got {obj[key]!r}")
        if not obj["_id"].strip():
            raise ValueError(f"{path}:{lineno}: field '_id' must be a non-empty string")
        yield lineno, obj


def read_corpus(path: Path) -> Documents:
    """A corpus.jsonl: every line {"_id", "text"} (and an optional string "title"), ids unique."""
    ids, titles, texts, seen = [], [], [], {}
    for lineno, obj in _json_objects(path, ("_id", "text")):
        title = obj.get("title", "")
        if title is None:
            title = ""
        if not isinstance(title, str):
            raise ValueError(f"{path}:{lineno}: field 'title' must be a string, got {title!r}")
        if obj["_id"] in seen:
            raise ValueError(f"{path}:{lineno}: duplicate _id {obj['_id']!r} (first on line {seen[obj['_id']]})")
        seen[obj["_id"]] = lineno
        ids.append(obj["_id"])
        titles.append(title)
        texts.append(obj["text"])
    if not ids:
        raise ValueError(f'{path}: no documents; expected JSON lines {{"_id", "title", "text"}}')
    return Documents(ids, titles, texts)


def read_qrels(path: Path, doc_ids: set[str]) -> dict[str, dict[str, int]]:
    """A qrels TSV: an optional header, then query-id, corpus-id, integer score; relevant (score > 0) pairs only."""
    out: dict[str, dict[str, int]] = {}
    for lineno, line in lines(path):
        cols = line.split("\t")
        if lineno == 1 and cols[:2] == ["query-id", "corpus-id"]:
            continue
        if len(cols) != 3:
            raise ValueError(
                f"{path}:{lineno}: expected 3 tab-separated columns query-id, corpus-id, score; got {len(cols)}"
            )
        qid, did, score = (c.strip() for c in cols)
        if not qid or not did:
            raise ValueError(f"{path}:{lineno}: empty query-id or corpus-id")
        try:
            value = int(score)
        except ValueError:
            raise ValueError(f"{path}:{lineno}: score must be an integer, got {score!r}") from None
        if did not in doc_ids:
            raise ValueError(f"{path}:{lineno}: corpus-id {did!r} is not in this source's corpus.jsonl")
        if value > 0:
            out.setdefault(qid, {})[did] = value
    return out


def read_queries(path: Path, wanted: set[str]) -> dict[str, str]:
    """The texts of the queries in `wanted` from a queries.jsonl (the others are dropped as they are read)."""
    out: dict[str, str] = {}
    for lineno, obj in _json_objects(path, ("_id", "text")):
        if obj["_id"] in wanted:
            if not obj["text"].strip():
                raise ValueError(f"{path}:{lineno}: query {obj['_id']!r} has an empty text")
            out[obj["_id"]] = obj["text"]
    return out


@dataclass
class BeirDataset:
    """Sources in BEIR layout: documents are the experts' rows; queries and judgments per split, loaded lazily.

    Like TextDataset, `split('train')` is what the experts store (here the documents, expert key
    'domain' = their source) and `queries(split)` is what a router is asked with (here the judged
    queries of that BEIR split; 'val' means 'dev').

    With `holdout_folds = F > 0`, dev's queries are dealt into F seeded folds (per source, so each
    fold keeps the sources' mix); fold `holdout_fold` becomes the split 'heldout' and 'dev' keeps
    the rest. Training (epoch choice, calibration) then never sees 'heldout', so evaluating on it
    measures the whole pipeline on unseen queries while test stays untouched (cross-validation on dev).
    """

    name: str
    root: Path
    sources: list[str]
    docs: dict[str, Documents]
    splits_for_training: tuple[str, ...] = ("train", "dev")
    holdout_folds: int = 0  # > 0: dev's judged queries in this many seeded folds; one is split 'heldout'
    holdout_fold: int = 0  # which fold is 'heldout'; 'dev' is the others (training validates and calibrates on them)
    holdout_seed: int = 0
    expert_key: str = "domain"
    parent_key: str | None = None
    _splits: dict[str, QuerySplit] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        if self.holdout_folds:
            check_int(self.holdout_folds, 2, 1000, "holdout_folds", "at most 1000; 0 = no held-out part of dev")
            check_int(self.holdout_fold, 0, self.holdout_folds - 1, "holdout_fold", "holdout_folds - 1")
        self.experts = sorted(self.sources)
        self.parents: dict[str, str | None] = {s: None for s in self.experts}
        owner: dict[str, str] = {}
        for source in self.sources:  # hits name documents by _id alone, so an _id must name one document
            for did in self.docs[source].ids:
                if did in owner:
                    raise ValueError(
                        f"document _id {did!r} is in both {owner[did]!r} and {source!r}; "
                        "ids must be unique across sources (prefix them with the source)"
                    )
                owner[did] = source

    needs_embedder = True
    has_judgments = True

    # ----------------------------------------------------------------- documents

    def doc_text(self, title: str, text: str) -> str:
        return doc_text(title, text)

    def documents(self, source: str) -> list[str]:
        """The embedded texts of one source's documents (an empty document is embedded as its _id)."""
        d = self.docs[source]
        return [doc_text(t, x) or i for i, t, x in zip(d.ids, d.titles, d.texts)]

    def split(self, name: str) -> list[Record]:
        """'train': the documents as rows of their source; a query split: its queries with their gold source."""
        if name == "train":
            return [Record(text, s, s, "train") for s in self.sources for text in self.documents(s)]
        qs = self._query_split(name)
        return [Record(t, s, s, name) for t, s in zip(qs.texts, qs.sources)]

    def pseudo_queries(self, view: str) -> tuple[list[str], list[str]]:
        """Query-like views of the documents for cold start: (texts, source of each); empty views are left out.

        'title': each document's title; 'first_sentence': the first sentence of its text.
        """
        if view not in PSEUDO_VIEWS:
            raise ValueError(f"pseudo-query view must be one of {PSEUDO_VIEWS}, got {view!r}")
        texts, sources = [], []
        for s in self.sources:
            d = self.docs[s]
            for t in d.titles if view == "title" else [first_sentence(x) for x in d.texts]:
                if t.strip():
                    texts.append(t)
                    sources.append(s)
        return texts, sources

    def metadata(self) -> list[dict]:
        """The stored metadata of each row of split('train'): the document's _id and title."""
        return [{"_id": i, "title": t} for s in self.sources for i, t in zip(self.docs[s].ids, self.docs[s].titles)]

    def stored(self) -> StoredRows:
        """The documents, as rows of their source, with their _id and title."""
        rows = self.split("train")
        return StoredRows([r.text for r in rows], None, [r.domain for r in rows], self.metadata())

    # ----------------------------------------------------------------- queries

    @property
    def train_split(self) -> str:
        """The query split whose judgments become training targets."""
        return self.splits_for_training[0]

    @property
    def val_split(self) -> str:
        """The query split that validates and calibrates ('val' names it)."""
        return self.splits_for_training[1] if len(self.splits_for_training) > 1 else "dev"

    def resolve(self, split: str) -> str:
        """A BEIR split name for `split` ('val' = the validation split)."""
        return self.val_split if split == "val" else split

    def has_split(self, split: str) -> bool:
        """Whether any source has judgments for `split` (the file is not read)."""
        split = self.resolve(split)
        if split == HELDOUT and self.holdout_folds:
            split = "dev"
        return any((self.root / s / "qrels" / f"{split}.tsv").is_file() for s in self.sources)

    def queries(self, split: str) -> list[str]:
        """Texts of the split's queries that have at least one relevant document."""
        return list(self._query_split(split).texts)

    def query_ids(self, split: str) -> list[str]:
        return list(self._query_split(split).ids)

    def qrels(self, split: str) -> dict[str, dict[str, int]]:
        """{query id: {doc id: score}} of the split (relevant pairs only)."""
        return self._query_split(split).qrels

    def gold_sources(self, split: str) -> list[str]:
        """The source holding each query's relevant documents (in the order of queries(split))."""
        return list(self._query_split(split).sources)

    def gold_experts(self, split: str) -> list[str]:
        return self.gold_sources(split)

    def oos_texts(self, split: str) -> list[str]:
        return []  # retrieval sources have no out-of-scope queries

    # ----------------------------------------------------------------- what training asks

    def validation(self, seed: int) -> ValidationSet:
        """The judged validation queries; without any (cold start), a seeded 10% of the documents."""
        if self.queries("val"):
            return ValidationSet(self.queries("val"), self.gold_sources("val"), stored=False)
        rows = self.split("train")
        pick = np.sort(np.random.default_rng(seed).choice(len(rows), size=max(1, len(rows) // 10), replace=False))
        return ValidationSet([rows[i].text for i in pick], [rows[i].domain for i in pick], stored=True)

    def training_queries(self) -> tuple[list[str], list[str]]:
        """The judged queries of the training split (never test) with their source."""
        return self.queries(self.train_split), self.gold_sources(self.train_split)

    def defaults(self) -> TrainingDefaults:
        """Dev judgments: epochs by source acc@1, a prior correction; else as held-out rows. Prior weight 0.1 always."""
        if self.queries("val"):
            return JUDGED_DEFAULTS
        return dataclasses.replace(HELD_OUT_DEFAULTS, prior_weight=PRIOR_WEIGHT)

    def _query_split(self, split: str) -> QuerySplit:
        split = self.resolve(split)
        if split == HELDOUT and not self.holdout_folds:
            raise ValueError(
                "split 'heldout' exists only when the data is loaded with holdout_folds >= 2 "
                "(e.g. data.holdout_folds=2 data.holdout_fold=0)"
            )
        if split not in (*QUERY_SPLITS, HELDOUT):
            raise ValueError(f"unknown query split {split!r}; expected one of {QUERY_SPLITS} (or 'val' for 'dev')")
        if split not in self._splits:
            if self.holdout_folds and split in ("dev", HELDOUT):
                self._splits["dev"], self._splits[HELDOUT] = self._fold(self._read_split("dev"))
            else:
                self._splits[split] = self._read_split(split)
        return self._splits[split]

    def _fold(self, dev: QuerySplit) -> tuple[QuerySplit, QuerySplit]:
        """(the rest of dev, fold `holdout_fold`): each source's queries dealt round-robin after a seeded shuffle."""
        rng = np.random.default_rng(self.holdout_seed)
        fold = np.empty(len(dev.ids), dtype=np.int64)
        for source in sorted(set(dev.sources)):
            rows = np.array([i for i, s in enumerate(dev.sources) if s == source])
            fold[rng.permutation(rows)] = np.arange(len(rows)) % self.holdout_folds
        parts = []
        for keep in (fold != self.holdout_fold, fold == self.holdout_fold):
            idx = np.nonzero(keep)[0]
            ids = [dev.ids[i] for i in idx]
            parts.append(
                QuerySplit(
                    ids, [dev.texts[i] for i in idx], [dev.sources[i] for i in idx], {q: dev.qrels[q] for q in ids}
                )
            )
        return parts[0], parts[1]

    def _read_split(self, split: str) -> QuerySplit:
        ids, texts, sources, qrels = [], [], [], {}
        for source in self.sources:
            path = self.root / source / "qrels" / f"{split}.tsv"
            if not path.is_file():
                continue
            judged = read_qrels(path, set(self.docs[source].ids))
            if not judged:
                continue
            qpath = self.root / source / "queries.jsonl"
            if not qpath.is_file():
                raise ValueError(f"{path}: judgments given but {qpath} does not exist")
            found = read_queries(qpath, set(judged))
            missing = [q for q in judged if q not in found]
            if missing:
                raise ValueError(
                    f"{path}: query-id {missing[0]!r} is not in {qpath}"
                    + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
                )
            for qid in judged:  # file order of the judgments
                if qid in qrels:
                    raise ValueError(
                        f"{path}: query-id {qid!r} is also judged in another source; "
                        "query ids must be unique across sources"
                    )
                ids.append(qid)
                texts.append(found[qid])
                sources.append(source)
                qrels[qid] = judged[qid]
        return QuerySplit(ids, texts, sources, qrels)


def load_beir(
    root: str | Path,
    sources: Sequence[str] | None = None,
    name: str | None = None,
    splits_for_training: Sequence[str] = ("train", "dev"),
    holdout_folds: int = 0,
    holdout_fold: int = 0,
    holdout_seed: int = 0,
) -> BeirDataset:
    """Every subfolder of `root` (or those in `sources`) as a source; documents read now, queries per split later.

    `splits_for_training`: the query splits training may read: the first gives training queries
    (when it has judgments), the second validation (BEIR's 'dev'). `holdout_folds` > 0 sets fold
    `holdout_fold` of dev aside as split 'heldout' (see BeirDataset).
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"data.root: no folder at {root} (resolved: {root.resolve()})")
    splits = tuple("dev" if s == "val" else str(s) for s in splits_for_training)
    bad = [s for s in splits if s not in QUERY_SPLITS]
    if bad or not splits:
        raise ValueError(f"splits_for_training must be some of {QUERY_SPLITS}, got {list(splits_for_training)}")
    if sources is None:
        names = sorted(p.name for p in root.iterdir() if p.is_dir() and (p / "corpus.jsonl").is_file())
        if not names:
            raise ValueError(f"data.root {root}: no source folders (subfolders with a corpus.jsonl)")
    else:
        names = [str(s) for s in sources]
        if len(set(names)) != len(names) or not names:
            raise ValueError(f"data.sources must list distinct source folders, got {names}")
        for s in names:
            if not (root / s / "corpus.jsonl").is_file():
                raise FileNotFoundError(f"data.sources: {root / s / 'corpus.jsonl'} does not exist")
    docs = {s: read_corpus(root / s / "corpus.jsonl") for s in names}
    return BeirDataset(name or root.name, root, names, docs, splits, holdout_folds, holdout_fold, holdout_seed)
