"""Seeded synthetic data and exact (brute-force) oracles shared by the tests.

Dimension legend: n vectors, nq queries, d dim, E experts, k hits.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import sys
from pathlib import Path
from types import ModuleType

import numpy as np
import torch

from moe_router import Router
from moe_router.checkpoint.format import MANIFEST, POINTER, version_dir
from moe_router.gate import initial_gate

DIM = 32  # small vectors keep every FAISS and gate call in the microseconds
SIZES = (3, 40, 57, 80)  # expert sizes; the 3-vector expert exercises -1 padding in the merge

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"

# Three domains with disjoint vocabularies, so a hashing embedder separates them.
VOCAB = {
    "astronomy": "star galaxy orbit telescope planet nebula comet lunar solar cosmic".split(),
    "cooking": "recipe oven flour simmer garlic butter bake sauce onion spice".split(),
    "finance": "loan interest stock bond dividend budget credit invest market tax".split(),
}


def clusters(num: int, per: int, dim: int, seed: int, noise: float = 0.3) -> list[np.ndarray]:
    """`num` well-separated Gaussian clusters of `per` float32 vectors each (unit-norm centres)."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(num, dim))
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    return [(c + noise * rng.normal(size=(per, dim)) / np.sqrt(dim)).astype(np.float32) for c in centres]


def sentence(domain: str, rng: np.random.Generator, words: int = 5) -> str:
    return "a question about " + " ".join(rng.choice(VOCAB[domain], size=words))


def write_jsonl(path: Path, seed: int = 0, train: int = 12, val: int = 4, test: int = 4) -> Path:
    """A dataset file in the project's format: every domain has train, val and test rows."""
    rng = np.random.default_rng(seed)
    with open(path, "w") as f:
        for split, n in (("train", train), ("val", val), ("test", test)):
            for domain in VOCAB:
                for i in range(n):
                    row = {
                        "text": sentence(domain, rng),
                        "domain": domain,
                        "label": f"{domain}_{i % 2}",
                        "split": split,
                    }
                    f.write(json.dumps(row) + "\n")
    return path


def brute_force(xq: np.ndarray, xb: np.ndarray, ids: np.ndarray, k: int, metric: str) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k in float64 numpy: (D, I) of shape (nq, k), -1 / worst score past len(xb)."""
    xq, xb = xq.astype(np.float64), xb.astype(np.float64)
    if metric == "ip":
        scores = xq @ xb.T  # (nq, n), higher is closer
        order = np.argsort(-scores, axis=1, kind="stable")
        worst = -np.inf
    else:
        scores = ((xq[:, None, :] - xb[None, :, :]) ** 2).sum(-1)  # (nq, n) squared L2, lower is closer
        order = np.argsort(scores, axis=1, kind="stable")
        worst = np.inf
    kk = min(k, xb.shape[0])
    D = np.full((xq.shape[0], k), worst)
    I = np.full((xq.shape[0], k), -1, dtype=np.int64)
    D[:, :kk] = np.take_along_axis(scores, order[:, :kk], axis=1)
    I[:, :kk] = ids[order[:, :kk]]
    return D, I


def assert_same_topk(D: np.ndarray, I: np.ndarray, D_ref: np.ndarray, I_ref: np.ndarray, atol: float = 1e-5) -> None:
    """Scores match the reference; ids match wherever the reference's order is not a near-tie.

    Float32 FAISS and a float64 oracle may order two hits whose scores differ by ~1e-7 either
    way; such swapped pairs are still a correct top-k, so only near-tied positions may differ.
    """
    np.testing.assert_allclose(D, D_ref, rtol=0, atol=atol)
    gap_prev = np.abs(np.diff(D_ref, axis=1, prepend=np.nan))
    gap_next = np.abs(np.diff(D_ref, axis=1, append=np.nan))
    clear = ~((gap_prev <= atol) | (gap_next <= atol))  # nan comparisons are False: edges count as clear
    clear |= ~np.isfinite(D_ref)  # padding positions must match exactly (-1)
    np.testing.assert_array_equal(np.where(clear, I, 0), np.where(clear, I_ref, 0))
    assert clear.mean() > 0.9, "seeded data should have almost no near-ties; the oracle compared too little"


def make_router(metric: str = "ip", seed: int = 0, gate: bool = True) -> Router:
    """Four experts of uneven size over clustered vectors, texts and payloads; gate at the centroids."""
    router = Router(DIM, metric)
    for i, (n, xb) in enumerate(zip(SIZES, clusters(len(SIZES), max(SIZES), DIM, seed))):
        router.add_expert(
            f"expert{i}",
            xb[:n],
            texts=[f"doc {i}-{j}" for j in range(n)],
            specialization=f"topic {i}",
            metadata=[{"expert": i, "row": j} for j in range(n)],
        )
    if gate:
        torch.manual_seed(seed)  # the gate's MLP body starts from torch's (seeded) random init
        router.set_gate(initial_gate(router.experts, hidden_dims=[64], dropout=0.0))
    return router


def write_beir(root: Path, seed: int = 0, docs: int = 12, queries: dict[str, int] | None = None) -> Path:
    """A BEIR-layout folder: one source per VOCAB domain, `docs` documents each, judged queries per split.

    Ids are prefixed by the source (unique across sources); each query is judged relevant to two
    documents of its own source (scores 1 and 2) and non-relevant (score 0) to a third.
    """
    rng = np.random.default_rng(seed)
    queries = {"train": 6, "dev": 3, "test": 3} if queries is None else queries
    for source in VOCAB:
        folder = root / source
        (folder / "qrels").mkdir(parents=True, exist_ok=True)
        with open(folder / "corpus.jsonl", "w") as f:
            for i in range(docs):
                title = f"{source} note {i}" if i % 3 else ""  # some documents have no title
                f.write(json.dumps({"_id": f"{source}-d{i}", "title": title, "text": sentence(source, rng, 8)}) + "\n")
        with open(folder / "queries.jsonl", "w") as f:
            for split, n in queries.items():
                for j in range(n):
                    f.write(json.dumps({"_id": f"{source}-{split}-q{j}", "text": sentence(source, rng)}) + "\n")
        for split, n in queries.items():
            with open(folder / "qrels" / f"{split}.tsv", "w") as f:
                f.write("query-id\tcorpus-id\tscore\n")
                for j in range(n):
                    a, b, c = rng.choice(docs, size=3, replace=False)
                    for d, score in ((a, 1), (b, 2), (c, 0)):
                        f.write(f"{source}-{split}-q{j}\t{source}-d{d}\t{score}\n")
    return root


def version_path(ckpt: Path) -> Path:
    """The version directory a checkpoint's CURRENT points to: where its manifest and files are."""
    return ckpt / version_dir(json.loads((ckpt / POINTER).read_text())["version"])


def write_manifest(ckpt: Path, manifest: object) -> None:
    """Replace the current version's manifest and re-point CURRENT at its sha256, so only the schema judges it."""
    raw = json.dumps(manifest).encode()
    (version_path(ckpt) / MANIFEST).write_bytes(raw)
    pointer = json.loads((ckpt / POINTER).read_text())
    pointer["manifest_sha256"] = hashlib.sha256(raw).hexdigest()
    (ckpt / POINTER).write_text(json.dumps(pointer))


def read_manifest(ckpt: Path) -> dict:
    return json.loads((version_path(ckpt) / MANIFEST).read_text())


def import_benchmark(name: str) -> ModuleType:
    """benchmarks/<name>.py imported as the benchmark scripts import their shared modules (benchmarks/ on sys.path)."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.remove(str(REPO / "benchmarks"))
