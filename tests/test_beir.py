"""BEIR-layout retrieval data: loading, malformed files, test split kept from training, training via data=beir."""

from __future__ import annotations

import builtins
import io
import json
import re
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch

from moe_router import Gate, Router
from moe_router.apps.train import train
from moe_router.data.beir import doc_text, load_beir
from moe_router.embed.hashing import HashingEmbedder
from moe_router.gate import initial_gate, with_prototypes
from moe_router.metrics import accuracy_at_k
from moe_router.train.build import router_from_dataset
from moe_router.train.fit import fit_router
from moe_router.train.targets import Pairs, query_targets, weighted_pairs
from tests.helpers import VOCAB, brute_force, write_beir
from tests.test_training import _train_overrides, compose_config

SOURCES = sorted(VOCAB)


@pytest.fixture
def beir_root(tmp_path: Path) -> Path:
    return write_beir(tmp_path / "beir")


def _rows(path: Path) -> list[str]:
    return path.read_text().splitlines()


def test_load_beir__documents_queries_and_judgments_match_the_files(beir_root: Path) -> None:
    data = load_beir(beir_root)
    assert data.sources == SOURCES and data.experts == SOURCES and data.name == "beir"
    corpus = [json.loads(line) for line in _rows(beir_root / "cooking" / "corpus.jsonl")]
    docs = data.docs["cooking"]
    assert docs.ids == [d["_id"] for d in corpus] and docs.texts == [d["text"] for d in corpus]
    assert data.documents("cooking") == [doc_text(d["title"], d["text"]) for d in corpus]
    train_rows = data.split("train")
    assert len(train_rows) == len(data.metadata()) == 3 * 12
    assert all(r.domain == m["_id"].split("-")[0] for r, m in zip(train_rows, data.metadata()))
    for split, n in (("train", 6), ("dev", 3), ("test", 3)):
        ids, qrels = data.query_ids(split), data.qrels(split)
        assert len(ids) == len(data.queries(split)) == len(data.gold_sources(split)) == 3 * n
        assert all(q.startswith(s) for q, s in zip(ids, data.gold_sources(split)))
        assert set(qrels) == set(ids)
        assert all(sorted(rel.values()) == [1, 2] for rel in qrels.values())  # score 0 is not relevant
    assert data.queries("val") == data.queries("dev")
    texts = {
        json.loads(line)["_id"]: json.loads(line)["text"] for line in _rows(beir_root / "finance" / "queries.jsonl")
    }
    got = dict(zip(data.query_ids("dev"), data.queries("dev")))
    assert all(got[q] == texts[q] for q in got if q.startswith("finance"))
    assert data.oos_texts("dev") == []


def test_load_beir_sources__keeps_only_the_listed_folders(beir_root: Path) -> None:
    data = load_beir(beir_root, sources=["finance", "astronomy"], name="two")
    assert data.sources == ["finance", "astronomy"] and data.experts == ["astronomy", "finance"]
    assert set(data.gold_sources("dev")) == {"finance", "astronomy"}
    with pytest.raises(FileNotFoundError, match="data.sources: .*nope/corpus.jsonl does not exist"):
        load_beir(beir_root, sources=["nope"])


def test_doc_text__joins_title_and_text_once() -> None:
    assert doc_text("A title", "the body") == "A title. the body"
    assert doc_text("A question?", "the body") == "A question? the body"
    assert doc_text("", "the body") == "the body" and doc_text("Only title", "") == "Only title"


def _corrupt(root: Path, rel: str, line: int, content: bytes) -> Path:
    """Replace line `line` (1-based) of root/rel by `content`."""
    path = root / rel
    rows = path.read_bytes().splitlines()
    rows[line - 1] = content
    path.write_bytes(b"\n".join(rows) + b"\n")
    return path


MALFORMED = [
    ("cooking/corpus.jsonl", 2, b'{"_id": "x", "text": ', "not valid JSON"),
    ("cooking/corpus.jsonl", 3, b'{"title": "t", "text": "b"}', "missing field '_id'"),
    ("cooking/corpus.jsonl", 4, b'{"_id": "cooking-new", "title": "t"}', "missing field 'text'"),
    ("cooking/corpus.jsonl", 5, b'{"_id": "cooking-new", "title": 3, "text": "b"}', "field 'title' must be a string"),
    (
        "cooking/corpus.jsonl",
        6,
        b'{"_id": "cooking-d0", "text": "b"}',
        "duplicate _id 'cooking-d0' \\(first on line 1\\)",
    ),
    ("cooking/corpus.jsonl", 7, b"[1, 2]", "expected a JSON object"),
    ("cooking/corpus.jsonl", 8, b'{"_id": "caf\xe9", "text": "b"}', "not UTF-8"),
    ("finance/qrels/dev.tsv", 2, b"finance-dev-q0\tfinance-d1", "expected 3 tab-separated columns"),
    ("finance/qrels/dev.tsv", 3, b"finance-dev-q0\tfinance-d1\thigh", "score must be an integer, got 'high'"),
    ("finance/qrels/dev.tsv", 4, b"finance-dev-q1\tcooking-d1\t1", "corpus-id 'cooking-d1' is not in this source"),
    ("finance/qrels/dev.tsv", 5, b"finance-dev-q1\tfinance-d1\t1\xff", "not UTF-8"),
    ("finance/queries.jsonl", 7, b'{"_id": "finance-dev-q0"}', "missing field 'text'"),
    ("finance/queries.jsonl", 8, b'{"_id": 5, "text": "q"}', "field '_id' must be a string"),
]


@pytest.mark.parametrize(("rel", "line", "content", "message"), MALFORMED, ids=[m[3][:30] for m in MALFORMED])
def test_malformed_file__raises_value_error_naming_file_and_line(
    beir_root: Path, rel: str, line: int, content: bytes, message: str
) -> None:
    path = _corrupt(beir_root, rel, line, content)
    with pytest.raises(ValueError, match=f"^{re.escape(str(path))}:{line}: {message}"):
        load_beir(beir_root).queries("dev")


def test_qrels_naming_an_unknown_query__raises_naming_the_file(beir_root: Path) -> None:
    path = beir_root / "cooking" / "qrels" / "dev.tsv"
    with open(path, "a") as f:
        f.write("cooking-ghost\tcooking-d1\t1\n")
    with pytest.raises(
        ValueError, match=f"^{re.escape(str(path))}: query-id 'cooking-ghost' is not in .*queries.jsonl"
    ):
        load_beir(beir_root).queries("dev")


def test_ids_shared_by_two_sources__raise_a_clear_error(beir_root: Path) -> None:
    with open(beir_root / "finance" / "corpus.jsonl", "a") as f:
        f.write(json.dumps({"_id": "cooking-d0", "text": "dup"}) + "\n")
    with pytest.raises(ValueError, match="document _id 'cooking-d0' is in both 'cooking' and 'finance'"):
        load_beir(beir_root)


def test_bad_root_and_splits__raise_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="data.root: no folder at"):
        load_beir(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no source folders"):
        load_beir(tmp_path / "empty")
    root = write_beir(tmp_path / "b")
    with pytest.raises(ValueError, match="splits_for_training must be some of"):
        load_beir(root, splits_for_training=["holdout"])
    with pytest.raises(ValueError, match="unknown query split 'holdout'"):
        load_beir(root).queries("holdout")


def test_missing_split__has_no_queries(tmp_path: Path) -> None:
    root = write_beir(tmp_path / "b", queries={"dev": 2})
    data = load_beir(root)
    assert not data.has_split("train") and data.queries("train") == [] and data.qrels("train") == {}
    assert data.has_split("dev") and len(data.queries("dev")) == 6


def test_router_from_beir__stores_every_document_with_its_id_and_title(beir_root: Path) -> None:
    data = load_beir(beir_root)
    router = router_from_dataset(data, HashingEmbedder(dim=64, seed=0))
    assert router.expert_names == SOURCES and router.ntotal == 36
    router.set_gate(initial_gate(router.experts, hidden_dims=[], dropout=0.0))
    hits = router.search(data.queries("dev")[:4], k=5, top_experts=3)
    titles = {i: t for s in SOURCES for i, t in zip(data.docs[s].ids, data.docs[s].titles)}
    for row in hits:
        for hit in row:
            assert hit.metadata["_id"].startswith(hit.expert) and hit.metadata["title"] == titles[hit.metadata["_id"]]


@pytest.fixture
def opened(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every path opened through builtins.open / io.open while the test runs."""
    seen: list[str] = []
    real = builtins.open

    def spy(file, *args, **kwargs):
        seen.append(str(file))
        return real(file, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", spy)
    monkeypatch.setattr(io, "open", spy)
    return seen


def test_train_through_data_beir__never_opens_test_judgments(
    beir_root: Path, tmp_path: Path, opened: list[str]
) -> None:
    for source in SOURCES:  # were the test files read, loading would fail on them
        (beir_root / source / "qrels" / "test.tsv").write_bytes(b"query-id\tcorpus-id\tscore\n\xff\xfe broken\n")
    opened.clear()  # the writes above went through open too
    cfg = compose_config("train", [*_train_overrides(tmp_path), "data=beir", f"data.root={beir_root}"])
    result = train(cfg)
    assert result.router.num_experts == 3 and result.router.ntotal == 36
    read = [p for p in opened if str(beir_root) in p]
    assert any(p.endswith("train.tsv") for p in read) and any(p.endswith("dev.tsv") for p in read)
    assert not [p for p in read if p.endswith("test.tsv")]
    router = Router.load(tmp_path / "ckpt")
    hit = router.search("a question about oven and garlic", k=1, top_experts=1)[0]
    assert hit.metadata["_id"].startswith(hit.expert)
    assert router.config["data"]["root"] == str(beir_root)
    with pytest.raises(ValueError, match="test.tsv:2: not UTF-8"):
        load_beir(beir_root).queries("test")  # the evaluation path reads them, and would see the damage


# ---------------------------------------------------------------- learning from queries


def test_query_targets__gold_one_hot_mixed_with_the_sources_of_the_exhaustive_top_k(router_ip, queries) -> None:
    xq = router_ip.prepare(queries)[0]
    gold = np.arange(len(xq)) % router_ip.num_experts
    one_hot = query_targets(router_ip, xq, gold)
    np.testing.assert_array_equal(one_hot, np.eye(router_ip.num_experts)[gold])
    xb = np.concatenate([e.vectors() for e in router_ip.experts])
    owner = np.concatenate([np.full(e.ntotal, i) for i, e in enumerate(router_ip.experts)])
    _, rows = brute_force(xq, xb, np.arange(len(xb)), 10, "ip")
    shares = np.stack([np.bincount(owner[r], minlength=router_ip.num_experts) / 10 for r in rows])
    np.testing.assert_allclose(query_targets(router_ip, xq, gold, exhaustive_weight=1.0), shares, atol=1e-6)
    np.testing.assert_allclose(
        query_targets(router_ip, xq, gold, exhaustive_weight=0.3), 0.7 * one_hot + 0.3 * shares, atol=1e-6
    )
    counts = np.zeros((len(xq), router_ip.num_experts))
    counts[:, 1], counts[:, 2] = 3, 1  # relevant documents in two sources: shares 3/4 and 1/4
    np.testing.assert_allclose(query_targets(router_ip, xq, counts)[0], [0, 0.75, 0.25, 0])
    with pytest.raises(ValueError, match="exhaustive_weight must be in"):
        query_targets(router_ip, xq, gold, exhaustive_weight=1.5)
    with pytest.raises(ValueError, match="gold must hold"):
        query_targets(router_ip, xq, gold + router_ip.num_experts)


def test_weighted_pairs__loss_is_the_weighted_mean_of_each_groups_loss() -> None:
    rng = np.random.default_rng(0)
    a = Pairs(rng.normal(size=(30, 8)).astype(np.float32), rng.dirichlet(np.ones(4), 30).astype(np.float32), 0.2)
    b = Pairs(rng.normal(size=(5, 8)).astype(np.float32), np.eye(4, dtype=np.float32)[rng.integers(0, 4, 5)], 0.8)
    x, target = weighted_pairs([a, b])
    logp = torch.log_softmax(torch.from_numpy(rng.normal(size=(35, 4)).astype(np.float32)), -1)
    loss = -(torch.from_numpy(target) * logp).sum(-1).mean()  # what GateModule.training_step computes
    per_a = -(torch.from_numpy(a.target) * logp[:30]).sum(-1).mean()
    per_b = -(torch.from_numpy(b.target) * logp[30:]).sum(-1).mean()
    assert torch.allclose(loss, 0.2 * per_a + 0.8 * per_b, atol=1e-6)
    np.testing.assert_array_equal(x, np.concatenate([a.x, b.x]))
    assert weighted_pairs([a, Pairs(b.x, b.target, 0.0)])[0].shape == (30, 8)  # weight 0: left out
    with pytest.raises(ValueError, match="no training pairs"):
        weighted_pairs([Pairs(a.x, a.target, 0.0)])


def test_fit_router_with_query_pairs_only__learns_where_the_queries_go_not_where_the_vectors_are() -> None:
    # Two experts whose stored vectors sit around c0 and c1, but whose real queries come from the
    # opposite side: stored vectors alone route the queries wrongly; the query pairs must correct it.
    rng = np.random.default_rng(0)
    c = np.eye(8, dtype=np.float32)
    router = Router(8, "ip")
    router.add_expert("a", c[0] + 0.1 * rng.normal(size=(40, 8)).astype(np.float32))
    router.add_expert("b", c[1] + 0.1 * rng.normal(size=(40, 8)).astype(np.float32))
    qa = c[2] + 0.1 * rng.normal(size=(60, 8)).astype(np.float32)  # questions for 'a'
    qb = c[3] + 0.1 * rng.normal(size=(60, 8)).astype(np.float32)
    xq = router.prepare(np.concatenate([qa, qb]))[0]
    gold = np.repeat([0, 1], 60)
    pairs = Pairs(xq[::2], query_targets(router, xq[::2], gold[::2]), 1.0)
    val = [router.expert_names[g] for g in gold[1::2]]
    router.set_gate(with_prototypes(Gate(8, 2, hidden_dims=[16], dropout=0.0), router.experts))
    fit_router(
        router,
        xq[1::2],
        val,
        extra=[pairs],
        stored_weight=0.0,
        trainer=L.Trainer(
            max_epochs=60,
            accelerator="cpu",
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
        ),
    )
    assert accuracy_at_k(router.gate_probs(xq[1::2]), gold[1::2], 1) == 1.0


def test_empty_document__is_embedded_as_its_id(tmp_path: Path) -> None:
    root = write_beir(tmp_path / "b")
    with open(root / "cooking" / "corpus.jsonl", "a") as f:
        f.write(json.dumps({"_id": "cooking-empty", "title": "", "text": ""}) + "\n")
    assert load_beir(root).documents("cooking")[-1] == "cooking-empty"


def test_train_with_query_prototypes__adds_each_training_query_as_a_prototype_of_its_source(
    beir_root: Path, tmp_path: Path
) -> None:
    cfg = compose_config(
        "train",
        [
            *_train_overrides(tmp_path),
            "data=beir",
            f"data.root={beir_root}",
            "targets.query_prototypes=true",
            "model.prototypes_per_expert=2",
        ],
    )
    train(cfg)
    gate = Router.load(tmp_path / "ckpt").gate
    data = load_beir(beir_root)
    owners = gate.prototype_owner.numpy()
    assert len(owners) == 3 * 2 + len(data.queries("train"))  # 2 k-means prototypes per source + 18 queries
    names = sorted(VOCAB)
    assert [names[o] for o in owners[6:]] == sorted(data.gold_sources("train"), key=names.index)


def test_pseudo_queries__titles_and_first_sentences_of_each_source(tmp_path: Path) -> None:
    root = tmp_path / "b"
    (root / "s").mkdir(parents=True)
    docs = [
        {"_id": "1", "title": "Wing flutter", "text": "We study flutter. Then more."},
        {"_id": "2", "title": "", "text": "No title here? Yes."},
    ]
    (root / "s" / "corpus.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    data = load_beir(root)
    assert data.pseudo_queries("title") == (["Wing flutter"], ["s"])
    assert data.pseudo_queries("first_sentence") == (["We study flutter.", "No title here?"], ["s", "s"])
    with pytest.raises(ValueError, match="pseudo-query view must be one of"):
        data.pseudo_queries("abstract")


def test_train_with_pseudo_queries__weights_over_one_raise(beir_root: Path, tmp_path: Path) -> None:
    cfg = compose_config(
        "train",
        [
            *_train_overrides(tmp_path),
            "data=beir",
            f"data.root={beir_root}",
            "targets.pseudo_view=title",
            "targets.pseudo_weight=0.6",
        ],
    )
    with pytest.raises(ValueError, match="targets.query_weight \\+ targets.pseudo_weight must be <= 1"):
        train(cfg)
    cfg.targets.pseudo_weight = 0.3
    assert train(cfg).router.num_experts == 3
