"""Misuse of the Python API: every case is a ValueError naming the argument, and changes nothing.

Each row of MISUSE was reproduced before the fix (issue 10): a silent wrong result (five one-letter
texts, "no" stored as positive feedback, the imaginary part dropped, NaN routing) or an internal
message (numpy's inhomogeneous shape, a tokenizers TypeError, a raw UnicodeDecodeError, SWIG, OSError).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from moe_router import Gate, HashingEmbedder, Router
from moe_router.data.datasets import load_jsonl
from moe_router.gate import initial_gate
from moe_router.vectors import MAX_SQUARED_NORM, flat_index
from tests.helpers import DIM, brute_force, make_router, read_manifest, sentence, write_jsonl

TEXT_DIM = 64


def text_router() -> Router:
    rng = np.random.default_rng(0)
    router = Router(TEXT_DIM, "ip", embedder=HashingEmbedder(TEXT_DIM, seed=0))
    for domain in ("astronomy", "cooking", "finance"):
        router.add_expert(domain, texts=[sentence(domain, rng) for _ in range(6)])
    router.set_gate(initial_gate(router.experts, hidden_dims=[], dropout=0.0))
    return router


def latin1_file(tmp: Path) -> Path:
    path = write_jsonl(tmp / "data.jsonl")
    lines = path.read_bytes().splitlines(keepends=True)
    lines[2] = lines[2].replace(b"a question", b"a caf\xe9 question")  # one latin-1 byte on line 3
    path.write_bytes(b"".join(lines))
    return path


V = np.ones(TEXT_DIM, dtype=np.float32)
# (case, call(text router, l2 router, tmp dir), the message it must give); every error is a ValueError.
MISUSE: list[tuple[str, Callable[[Router, Router, Path], Any], str]] = [
    (
        "texts is one str",
        lambda r, l2, tmp: r.add_expert("new", texts="hello"),
        r"expert 'new': texts must be a list of strings, got a single str 'hello'",
    ),
    (
        "texts is one str beside vectors",
        lambda r, l2, tmp: r.add_expert("new", np.ones((5, TEXT_DIM)), texts="hello"),
        r"texts must be a list of strings, got a single str",
    ),
    ("texts is a number", lambda r, l2, tmp: r.add_expert("new", texts=5), r"texts must be a list of strings, got int"),
    (
        "texts is a set",
        lambda r, l2, tmp: r.add_expert("new", texts={"a b", "c d"}),
        r"texts must be a list of strings, got set",
    ),
    (
        "feedback positive is a str",
        lambda r, l2, tmp: r.record_feedback("star orbit", "astronomy", "no"),
        r"record_feedback: positive must be True or False, got str 'no'",
    ),
    (
        "feedback positive is an int",
        lambda r, l2, tmp: r.record_feedback("star orbit", "astronomy", 1),
        r"positive must be True or False, got int 1",
    ),
    (
        "complex expert vectors",
        lambda r, l2, tmp: r.add_expert("new", np.ones((3, TEXT_DIM)) + 1j),
        r"vectors for expert 'new' are complex \(complex128\); expected real numbers",
    ),
    ("complex query", lambda r, l2, tmp: r.search(V.astype(np.complex64), k=1), r"query vectors are complex"),
    (
        "complex torch query",
        lambda r, l2, tmp: r.route(torch.ones(TEXT_DIM, dtype=torch.complex64)),
        r"query vectors are complex",
    ),
    (
        "texts mixed with a vector",
        lambda r, l2, tmp: r.search(["star orbit", V.tolist()], k=1),
        r"queries: a batch mixing texts and other values \(item 1 is list\)",
    ),
    (
        "a text and None",
        lambda r, l2, tmp: r.search(["star orbit", None], k=1),
        r"queries: a batch mixing texts and other values \(item 1 is NoneType\)",
    ),
    (
        "ragged vectors",
        lambda r, l2, tmp: r.search([V.tolist(), [1.0, 2.0]], k=1),
        r"query vectors must be numeric arrays of shape \(n, d\): "
        r"the rows have different lengths \(first rows: \[64, 2\]\)",
    ),
    (
        "None inside a vector",
        lambda r, l2, tmp: r.search([V.tolist(), [None] * TEXT_DIM], k=1),
        r"query vectors must be numeric arrays .*row 1, item 0 is NoneType",
    ),
    (
        "strings as expert vectors",
        lambda r, l2, tmp: r.add_expert("new", [["a"] * TEXT_DIM]),
        r"vectors for expert 'new' must be numeric arrays .*row 0, item 0 is str",
    ),
    ("None as a query", lambda r, l2, tmp: r.route(None), r"query vectors must be numeric arrays .* got NoneType"),
    (
        "lone surrogate in an expert text",
        lambda r, l2, tmp: r.add_expert("new", texts=["fine", "bad \ud800 text"]),
        r"expert 'new': texts: text 1 is not valid Unicode \(character 4 is a lone surrogate '\\ud800'\)",
    ),
    (
        "lone surrogate in a query",
        lambda r, l2, tmp: r.search("\udcff star", k=1),
        r"queries: text 0 is not valid Unicode",
    ),
    (
        "metadata not a dict per vector",
        lambda r, l2, tmp: r.add_expert("new", texts=["a b", "c d"], metadata=[5, "s"]),
        r"metadata entry 0 is int 5; expected a dict",
    ),
    (
        "metadata a dict, not a list",
        lambda r, l2, tmp: r.add_expert("new", texts=["a b"], metadata={"k": 1}),
        r"metadata must be a list of dicts \(one per vector\), got dict",
    ),
    (
        "metadata key not a str",
        lambda r, l2, tmp: r.add_expert("new", texts=["a b"], metadata=[{1: "x"}]),
        r"metadata entry 0 has a key 1 that is not a str",
    ),
    (
        "metadata NaN",
        lambda r, l2, tmp: r.add_expert("new", texts=["a b"], metadata=[{"x": math.nan}]),
        r"metadata entry 0 is not JSON-serialisable \(Out of range float values",
    ),
    (
        "metadata set",
        lambda r, l2, tmp: r.add_expert("new", texts=["a b"], metadata=[{"x": {1, 2}}]),
        r"metadata entry 0 is not JSON-serialisable \(Object of type set",
    ),
    (
        "huge l2 expert",
        lambda r, l2, tmp: l2.add_expert("new", np.full((4, DIM), 3e38, np.float32)),
        r"vectors for expert 'new': 4 row\(s\) too large for metric 'l2' \(first: row 0, squared norm 2.88e\+78\)",
    ),
    (
        "huge l2 query",
        lambda r, l2, tmp: l2.search(np.full(DIM, 1e19), k=3),
        r"query vectors: 1 row\(s\) too large for metric 'l2'",
    ),
    (
        "huge l2 feedback",
        lambda r, l2, tmp: l2.record_feedback(np.full(DIM, 1e19), "expert0", True),
        r"query vectors: 1 row\(s\) too large",
    ),
    (
        "JSONL with a latin-1 byte",
        lambda r, l2, tmp: load_jsonl(latin1_file(tmp)),
        r"data.jsonl:3: not UTF-8 \(byte 0xe9 at column \d+\); save the file as UTF-8",
    ),
    (
        "negative dim",
        lambda r, l2, tmp: Router(dim=-1),
        r"dim must be an integer >= 1 \(the vector dimension\), got -1",
    ),
    ("float dim", lambda r, l2, tmp: Router(dim=2.5), r"dim must be an integer >= 1 .*got 2.5"),
    ("bool dim", lambda r, l2, tmp: Router(dim=True), r"dim must be an integer >= 1 .*got True"),
    ("str dim", lambda r, l2, tmp: Router(dim="8"), r"dim must be an integer >= 1 .*got '8'"),
    ("negative index dim", lambda r, l2, tmp: flat_index(-1, "l2"), r"index dimension d must be an integer >= 1"),
    ("gate float dim", lambda r, l2, tmp: Gate(2.5, 3), r"Gate dim must be an integer >= 1 .*got 2.5"),
    ("gate no experts", lambda r, l2, tmp: Gate(8, 0), r"Gate num_experts must be an integer >= 1, got 0"),
    ("embedder float dim", lambda r, l2, tmp: HashingEmbedder(dim=0.5), r"dim must be an integer >= 1"),
    (
        "save onto a file",
        lambda r, l2, tmp: r.save(tmp / "a-file"),
        r"save: cannot write a checkpoint directory at .*a-file: it is a file, not a directory",
    ),
    (
        "save under a file",
        lambda r, l2, tmp: r.save(tmp / "a-file" / "ckpt"),
        r"save: cannot write a checkpoint directory at .*ckpt: .*a-file is a file, not a directory",
    ),
]


def _state(router: Router) -> tuple:
    """What a refused call must leave as it was: experts, vectors, stored rows, feedback, gate weights."""
    return (
        router.expert_names,
        router.ntotal,
        router.parts().store.max_id(),
        len(router.parts().store.feedback()),
        [p.detach().clone() for p in router.gate.parameters()],
    )


@pytest.mark.parametrize("call, message", [m[1:] for m in MISUSE], ids=[m[0] for m in MISUSE])
def test_misuse__is_a_value_error_naming_the_argument_and_changes_nothing(tmp_path, call, message):
    r, l2 = text_router(), make_router("l2")
    tmp_path = tmp_path / "work"  # the fixtures' own folders (cwd, cache) live beside it
    tmp_path.mkdir()
    (tmp_path / "a-file").write_text("not a checkpoint")
    before = [_state(r), _state(l2)]
    with pytest.raises(ValueError, match=message):
        call(r, l2, tmp_path)
    for router, old in zip((r, l2), before):
        new = _state(router)
        assert new[:4] == old[:4]
        assert all(torch.equal(a, b) for a, b in zip(new[4], old[4]))
    assert (tmp_path / "a-file").read_text() == "not a checkpoint"
    assert {p.name for p in tmp_path.iterdir()} <= {"a-file", "data.jsonl"}  # nothing written beside them


def test_accepted_forms__still_work(tmp_path):
    """The strictness above refuses misuse only: tuples and arrays of texts, numpy bools and ints, int vectors."""
    r = text_router()
    expert = r.add_expert("space", texts=("star orbit", "comet lunar"), metadata=({"a": [1, None]}, {"b": {"c": "d"}}))
    assert expert.ntotal == 2
    assert r.add_expert("arr", texts=np.array(["loan bond", "stock tax"]), metadata=np.array([{}, {}])).ntotal == 2
    assert r.record_feedback("star orbit", "space", np.bool_(False)) >= 1
    assert Router(np.int64(8)).dim == 8
    hits = r.search(np.ones(TEXT_DIM, dtype=np.int32), k=2, top_experts=1)
    assert len(hits) == 2
    path = write_jsonl(tmp_path / "ok.jsonl")
    path.write_bytes(path.read_bytes().replace(b"a question", "une question \u00e9t\u00e9".encode(), 1))
    assert load_jsonl(path)[0].text.startswith("une question \u00e9t\u00e9")


# ---------------------------------------------------------------- non-finite math (issue 10, defect 5)


def test_l2_vectors_at_the_bound__search_finite_and_exact():
    """Just under MAX_SQUARED_NORM every FAISS distance is finite: the search equals brute force, no hit is lost."""
    rng = np.random.default_rng(0)
    xb = rng.standard_normal((50, DIM))
    xb *= np.sqrt(MAX_SQUARED_NORM * 0.99) / np.linalg.norm(xb, axis=1, keepdims=True)
    xb = xb.astype(np.float32)
    router = Router(DIM, "l2")
    router.add_expert("big", xb[:30])
    router.add_expert("also-big", xb[30:])
    router.set_gate(initial_gate(router.experts, hidden_dims=[], dropout=0.0))
    xq = (rng.standard_normal((6, DIM)) * np.sqrt(MAX_SQUARED_NORM / DIM) * 0.5).astype(np.float32)
    hits = router.search(xq, k=5, top_experts=2, with_text=False)
    D, I = brute_force(xq, xb, np.arange(50), 5, "l2")
    assert [[h.id for h in row] for row in hits] == I.tolist()
    np.testing.assert_allclose([[h.score for h in row] for row in hits], D, rtol=1e-4)
    assert np.isfinite([s.probability for row in router.route(xq, top_experts=2) for s in row]).all()
    with pytest.raises(ValueError, match="too large for metric 'l2'"):
        router.add_expert("over", xb[:1] * 1.01)


def test_huge_l2_expert__never_makes_routing_nan():
    """Before the fix an expert of values near 3e38 made every route NaN; now it is refused and routing stays finite."""
    router = make_router("l2")
    xq = np.random.default_rng(1).standard_normal((8, DIM)).astype(np.float32)
    want = router.route(xq, top_experts=2)
    for values in (np.full((4, DIM), 3e38, np.float32), np.full((4, DIM), 1e19, np.float32)):
        with pytest.raises(ValueError, match="too large for metric 'l2'"):
            router.add_expert("huge", values)
    assert router.route(xq, top_experts=2) == want


def test_gate_overflowing_on_an_accepted_l2_expert__is_refused_and_removed():
    """Vectors inside the index bound can still overflow a prototype gate's products: the add is undone, not saved."""
    router = make_router("l2", gate=False)
    router.set_gate(initial_gate(router.experts, hidden_dims=[], dropout=0.0, prototypes_per_expert=2))
    names, xq = router.expert_names, np.random.default_rng(2).standard_normal((4, DIM)).astype(np.float32)
    want = router.route(xq, top_experts=2)
    big = np.random.default_rng(3).standard_normal((6, DIM))
    big *= np.sqrt(MAX_SQUARED_NORM * 0.9) / np.linalg.norm(big, axis=1, keepdims=True)
    with pytest.raises(ValueError, match="non-finite"):
        router.add_expert("big", big.astype(np.float32))
    assert router.expert_names == names and router.route(xq, top_experts=2) == want
    assert not router.gate.nonfinite()


def test_nan_gate__route_raises_and_save_refuses(tmp_path):
    router = make_router("ip")
    with torch.no_grad():
        router.gate.head.weight[1, 0] = float("nan")
    with pytest.raises(
        ValueError, match=r"the gate gave non-finite logits for query 0: its weights hold NaN or inf \(head.weight\)"
    ):
        router.route(np.ones(DIM, dtype=np.float32))
    with pytest.raises(ValueError, match=r"save: the gate cannot route \(head.weight holds NaN or inf\)"):
        router.save(tmp_path / "ckpt")
    assert not (tmp_path / "ckpt").exists() and not list(tmp_path.glob("*ckpt*"))  # not even a temporary


def test_saved_checkpoint_of_an_l2_router__has_only_finite_numbers(tmp_path):
    """Whatever was refused above, what is saved loads with a finite gate and routes to finite probabilities."""
    router = make_router("l2")
    for bad in (np.full((2, DIM), 3e38, np.float32), np.full((2, DIM), 2e19, np.float32)):
        with pytest.raises(ValueError):
            router.add_expert("bad", bad)
    loaded = Router.load(router.save(tmp_path / "ckpt"))
    assert not loaded.gate.nonfinite()
    assert all(np.isfinite(e.vectors()).all() for e in loaded.experts)
    manifest = read_manifest(tmp_path / "ckpt")
    assert [e["name"] for e in manifest["experts"]] == router.expert_names
