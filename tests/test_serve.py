"""The HTTP server: batching matches direct calls, bad input is a 4xx, expert changes are atomic to readers."""

import asyncio
import json
import socket
import sqlite3
import threading
import time
from contextlib import closing, contextmanager
from pathlib import Path

import httpx
import numpy as np
import pytest
import uvicorn
from fastapi.testclient import TestClient
from omegaconf import OmegaConf

from moe_router import HashingEmbedder, Router, lifecycle
from moe_router.apps.serve import serve
from moe_router.gate import initial_gate
from moe_router.serving import (
    AuthConfig,
    BatchConfig,
    Limits,
    MicroBatcher,
    Query,
    RouterState,
    create_app,
    run_queries,
)
from moe_router.serving.batcher import PassTimes
from moe_router.serving.config import check_exposure
from moe_router.types import SearchParams

DIM = 64
TOPICS = {
    "security": "password token auth login session secret hash cookie",
    "frontend": "css flexbox layout button html grid font color",
    "databases": "sql index query join table postgres transaction schema",
    "devops": "docker deploy kubernetes pipeline build container helm ci",
}
CHURN_WORDS = "rust borrow cargo lifetime trait crate ownership macro"


def topic_texts(words: str, n: int, seed: int) -> list[str]:
    rng = np.random.default_rng(seed)
    vocab = words.split()
    return [" ".join(rng.choice(vocab, size=4)) + f" note {i}" for i in range(n)]


def build_checkpoint(path: Path, per_expert: int = 30) -> Path:
    """4 topic experts of hashed texts and an untrained centroid gate: a real checkpoint in ~0.1 s."""
    router = Router(DIM, "ip", embedder=HashingEmbedder(DIM, seed=0))
    for j, (name, words) in enumerate(TOPICS.items()):
        texts = topic_texts(words, per_expert, seed=j)
        router.add_expert(name, texts=texts, metadata=[{"topic": name, "i": i} for i in range(len(texts))])
    router.set_gate(initial_gate(router.experts, hidden_dims=[], dropout=0.0))
    return router.save(path)


@contextmanager
def live_server(app):
    """uvicorn serving `app` on a free loopback port, in a thread of this process."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "server did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(20)
        sock.close()


@pytest.fixture
def ckpt(tmp_path):
    return build_checkpoint(tmp_path / "ckpt")


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    state = RouterState(build_checkpoint(tmp_path_factory.mktemp("serve") / "ckpt"))
    with TestClient(create_app(state, limits=Limits(max_body_bytes=200_000, max_queries=8, max_k=50))) as c:
        yield c
    state.close()


# ---------------------------------------------------------------- answers


def test_run_queries__batched_pass_equals_one_call_per_request(ckpt):
    router = Router.load(ckpt)
    rng = np.random.default_rng(0)
    xq = router.prepare(rng.standard_normal((6, DIM)).astype(np.float32))[0]
    queries = [
        Query("search", SearchParams(k=3, top_experts=2), xq=xq[:2]),
        Query("search", SearchParams(k=7, top_experts=2), texts=["sql join index", "docker helm build"]),
        Query("search", SearchParams(k=5, top_experts=1), xq=xq[2:3]),
        Query("route", SearchParams(top_experts=3), xq=xq[3:6]),
        Query("search", SearchParams(k=10_000, top_experts=2), xq=xq[:1]),  # k over the stored vectors: fails alone
        Query("search", SearchParams(k=2, per_expert=True), xq=xq[:2]),  # beside k=3 and k=7 of the same kind
    ]
    got = run_queries(router, queries)
    assert [h.id for h in got[0][1]] == [h.id for h in router.search(xq[1], k=3, top_experts=2)]
    for q, res in [*zip(queries[:4], got[:4]), (queries[5], got[5])]:
        queried = q.xq if q.xq is not None else q.texts
        want = router.search(queried, q.params) if q.op == "search" else router.route(queried, q.params)
        if q.op == "search":
            assert [[(h.id, h.expert) for h in row] for row in res] == [[(h.id, h.expert) for h in row] for row in want]
            np.testing.assert_allclose(
                [[h.score for h in row] for row in res], [[h.score for h in row] for row in want], rtol=1e-5
            )
        else:
            assert [[s.expert for s in row] for row in res] == [[s.expert for s in row] for row in want]
    assert isinstance(got[4], ValueError) and "k must be between" in str(got[4])


def test_search_over_http__equals_router_search(client, ckpt):
    router = Router.load(ckpt)
    body = {"texts": ["password token login", "css grid layout"], "k": 4, "top_experts": 2}
    r = client.post("/search", json=body)
    assert r.status_code == 200, r.text
    want = router.search(body["texts"], k=4, top_experts=2)
    got = r.json()["results"]
    assert [[h["id"] for h in row["hits"]] for row in got] == [[h.id for h in row] for row in want]
    assert [[h["text"] for h in row["hits"]] for row in got] == [[h.text for h in row] for row in want]
    assert got[0]["hits"][0]["metadata"]["topic"] == want[0][0].metadata["topic"]
    per = client.post("/search", json={**body, "k": 2, "per_expert": True}).json()["results"]
    want = router.search(body["texts"], k=2, top_experts=2, per_expert=True)
    assert [[(h["id"], h["expert"]) for h in row["hits"]] for row in per] == [
        [(h.id, h.expert) for h in row] for row in want
    ]
    assert all(len(row["hits"]) == 4 for row in per)  # 2 from each of the 2 experts
    route = client.post("/route", json={"text": "password token login", "top_experts": 2}).json()
    assert route["results"][0]["experts"][0]["expert"] == "security"


def test_top_p_over_http__equals_router_search_and_route_with_top_p(client, ckpt):
    router = Router.load(ckpt)
    texts = ["password token login", "css grid layout", "sql docker css token"]
    for p, cap in ((0.5, 4), (0.99, 2), (1.0, 4)):
        got = client.post("/search", json={"texts": texts, "k": 5, "top_p": p, "max_experts": cap}).json()["results"]
        want = router.search(texts, k=5, top_p=p, max_experts=cap)
        assert [[(h["id"], h["expert"]) for h in row["hits"]] for row in got] == [
            [(h.id, h.expert) for h in row] for row in want
        ]
        routes = client.post("/route", json={"texts": texts, "top_p": p, "max_experts": cap}).json()["results"]
        assert [[s["expert"] for s in row["experts"]] for row in routes] == [
            [s.expert for s in row] for row in router.route(texts, top_p=p, max_experts=cap)
        ]
        assert all(1 <= len(row["experts"]) <= cap for row in routes)


def test_prior_weight_over_http__equals_router_search_with_that_weight(client, ckpt):
    router = Router.load(ckpt)
    texts = ["password token login", "css grid layout", "sql docker css token"]
    for w in (0.0, 0.5, 5.0):
        got = client.post("/search", json={"texts": texts, "k": 6, "top_experts": 3, "prior_weight": w}).json()[
            "results"
        ]
        want = router.search(texts, k=6, top_experts=3, prior_weight=w)
        assert [[h["id"] for h in row["hits"]] for row in got] == [[h.id for h in row] for row in want]


def test_decide_weight_over_http__equals_router_search_with_that_weight(client, ckpt):
    router = Router.load(ckpt)
    texts = ["password token login", "css grid layout", "sql docker css token"]
    seen = set()
    for w in (0.0, 1.0, 50.0):
        body = {"texts": texts, "k": 6, "top_experts": 2, "decide_weight": w}
        got = client.post("/search", json=body).json()["results"]
        want = router.search(texts, k=6, top_experts=2, decide_weight=w)
        assert [[h["id"] for h in row["hits"]] for row in got] == [[h.id for h in row] for row in want]
        seen.add(tuple(len({h.expert for h in row}) for row in want))
    assert len(seen) > 1  # re-deciding changed what came back (one expert's hits instead of two merged)


def test_stats_and_experts__list_the_checkpoint(client):
    experts = client.get("/experts").json()["experts"]
    assert [e["name"] for e in experts] == list(TOPICS)
    assert all(e["vectors"] == 30 for e in experts)
    client.post("/route", json={"texts": ["sql query join", "sql index"], "top_experts": 1})
    stats = client.get("/stats").json()
    assert {s["name"]: s["queries"] for s in stats["experts"]}["databases"] >= 2
    assert client.get("/health").json() == {"status": "ok"}
    assert client.get("/ready").json()["experts"] == 4


# ---------------------------------------------------------------- bad input

NAN_VECTOR = "[" + ",".join(["NaN"] + ["1"] * (DIM - 1)) + "]"
BAD = [
    ("malformed json", "POST", "/search", '{"text": "a",', 400),
    ("not an object", "POST", "/search", "[1, 2]", 422),
    ("missing query", "POST", "/search", {"k": 3}, 422),
    ("two query fields", "POST", "/search", {"text": "a", "texts": ["b"]}, 422),
    ("unknown field", "POST", "/search", {"text": "a", "kk": 3}, 422),
    ("wrong type text", "POST", "/search", {"text": 5}, 422),
    ("wrong type k", "POST", "/search", {"text": "a", "k": "3"}, 422),
    ("bool as k", "POST", "/search", {"text": "a", "k": True}, 422),
    ("float k", "POST", "/search", {"text": "a", "k": 2.5}, 422),
    ("integral float k", "POST", "/search", {"text": "a", "k": 3.0}, 200),
    ("null text", "POST", "/search", {"text": None}, 422),
    ("tiny vector", "POST", "/search", {"vector": [5e-324] + [0.0] * (DIM - 1)}, 200),
    ("huge vector", "POST", "/search", {"vector": [3e38] * DIM}, 200),
    ("empty text", "POST", "/search", {"text": ""}, 422),
    ("blank text", "POST", "/route", {"texts": ["ok", "   "]}, 422),
    ("text too long", "POST", "/search", {"text": "a" * 5000}, 422),
    ("empty batch", "POST", "/search", {"texts": []}, 422),
    ("batch over limit", "POST", "/search", {"texts": ["a"] * 9}, 422),
    ("wrong dim", "POST", "/search", {"vector": [1.0] * (DIM - 1)}, 422),
    ("ragged batch", "POST", "/search", {"vectors": [[1.0] * DIM, [1.0] * 3]}, 422),
    ("NaN", "POST", "/search", '{"vector": ' + NAN_VECTOR + "}", 422),
    ("inf by overflow", "POST", "/search", '{"vector": [1e400' + ",0" * (DIM - 1) + "]}", 422),
    ("float32 overflow", "POST", "/search", {"vector": [1e39] + [0.0] * (DIM - 1)}, 422),
    ("zero vector", "POST", "/search", {"vector": [0.0] * DIM}, 422),
    ("k zero", "POST", "/search", {"text": "a", "k": 0}, 422),
    ("k over limit", "POST", "/search", {"text": "a", "k": 51}, 422),
    ("k over stored vectors", "POST", "/search", {"text": "a", "k": 50, "with_text": False}, 200),
    ("top_experts zero", "POST", "/search", {"text": "a", "top_experts": 0}, 422),
    ("top_experts over experts", "POST", "/route", {"text": "a", "top_experts": 5}, 422),
    ("top_p zero", "POST", "/search", {"text": "a", "top_p": 0.0}, 422),
    ("top_p over one", "POST", "/route", {"text": "a", "top_p": 1.5}, 422),
    ("top_p string", "POST", "/search", {"text": "a", "top_p": "0.9"}, 422),
    ("max_experts zero", "POST", "/search", {"text": "a", "top_p": 0.9, "max_experts": 0}, 422),
    ("prior_weight negative", "POST", "/search", {"text": "a", "prior_weight": -1.0}, 422),
    ("prior_weight string", "POST", "/search", {"text": "a", "prior_weight": "0.1"}, 422),
    ("max_experts over experts is capped", "POST", "/search", {"text": "a", "top_p": 0.9, "max_experts": 9}, 200),
    ("unknown expert feedback", "POST", "/feedback", {"text": "a", "expert": "nope", "positive": True}, 404),
    ("feedback without query", "POST", "/feedback", {"expert": "devops", "positive": True}, 422),
    ("remove unknown expert", "DELETE", "/experts/nope", None, 404),
    ("add duplicate expert", "POST", "/experts", {"name": "devops", "texts": ["x y"]}, 409),
    ("add expert without vectors", "POST", "/experts", {"name": "new"}, 422),
    ("add expert bad name", "POST", "/experts", {"name": " padded ", "texts": ["x"]}, 422),
    ("add expert metadata count", "POST", "/experts", {"name": "m", "texts": ["x y"], "metadata": [{}, {}]}, 422),
    (
        "add expert texts and vectors differ",
        "POST",
        "/experts",
        {"name": "m", "texts": ["x"], "vectors": [[1.0] * DIM] * 2},
        422,
    ),
    ("over-long body", "POST", "/search", {"text": "a" * 300_000}, 413),
    ("lone surrogate text", "POST", "/search", '{"text": "a \\ud800 b"}', 400),
    (
        "metadata NaN (stored, it would fail every answer)",
        "POST",
        "/experts",
        '{"name": "m", "texts": ["x y"], "metadata": [{"x": NaN}]}',
        422,
    ),
    ("unknown path", "GET", "/nope", None, 404),
    ("wrong method", "GET", "/search", None, 405),
]


@pytest.mark.parametrize("method, path, body, status", [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_input__is_a_4xx_json_error_and_the_server_keeps_serving(client, method, path, body, status):
    content = body if isinstance(body, str) or body is None else json.dumps(body)
    r = client.request(method, path, content=content, headers={"content-type": "application/json"})
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/json")
    if status >= 400:
        assert isinstance(r.json()["error"], str) and r.json()["error"]
    assert client.post("/search", json={"text": "sql join", "k": 2}).status_code == 200


def searchparams_error(**options) -> str:
    with pytest.raises(ValueError) as exc:
        SearchParams(**options)
    return str(exc.value)


@pytest.mark.parametrize(
    "path, option, value",
    [
        ("/search", "per_expert", "no"),  # once read as true
        ("/search", "with_text", "no"),
        ("/search", "max_experts", -5),  # once passed
        ("/route", "max_experts", -5),
        ("/search", "top_p", 0),
        ("/route", "top_p", 0),
        ("/search", "k", 0),
        ("/search", "k", None),
        ("/search", "prior_weight", "0.1"),
        ("/search", "decide_weight", -1.0),
        ("/search", "decide_weight", "5"),
    ],
)
def test_search_option_refused__is_422_with_searchparams_own_message(client, path, option, value):
    r = client.post(path, json={"text": "sql join", option: value})
    assert r.status_code == 422, r.text
    assert r.json()["error"] == searchparams_error(**{option: value})
    assert r.json()["error"].startswith(option)


@pytest.mark.parametrize(
    "path, body, field",
    [
        ("/route", {"vector": [1.0] * (DIM - 1)}, "vector"),
        ("/search", {"vector": [1.0] * (DIM + 1)}, "vector"),
        ("/search", {"vectors": [[1.0] * DIM, [1.0] * 3]}, "vectors.1"),
        ("/feedback", {"vector": [1.0] * 3, "expert": "devops", "positive": True}, "vector"),
        ("/experts", {"name": "short", "vectors": [[1.0] * (DIM - 1)]}, "vectors.0"),
    ],
)
def test_vectors_of_the_wrong_dimension__are_422_naming_the_field(client, path, body, field):
    r = client.post(path, json=body)
    assert r.status_code == 422, r.text
    assert r.json()["error"].startswith(f"{field}: expected {DIM} numbers")
    assert client.get("/experts").json()["generation"] == 0


def test_openapi__states_the_served_dim_and_limits(client):
    doc = client.get("/openapi.json").json()
    assert "x-served" not in json.dumps(doc)
    search = doc["paths"]["/search"]["post"]["requestBody"]["content"]["application/json"]["schema"]["properties"]
    assert search["vector"]["minItems"] == search["vector"]["maxItems"] == DIM
    assert search["vectors"]["maxItems"] == 8 and search["texts"]["items"]["maxLength"] == 4096
    assert search["k"]["maximum"] == 50 and search["k"]["minimum"] == 1


def test_run_queries__requests_equal_but_for_k_share_one_search(ckpt, monkeypatch):
    router = Router.load(ckpt)
    xq = router.prepare(np.random.default_rng(1).standard_normal((5, DIM)).astype(np.float32))[0]
    calls = []
    real_search = Router.search
    monkeypatch.setattr(Router, "search", lambda self, *a, **kw: (calls.append(a[1]), real_search(self, *a, **kw))[1])
    merged = [
        Query("search", SearchParams(k=2, top_experts=2), xq=xq[:2]),
        Query("search", SearchParams(k=6, top_experts=2), xq=xq[2:3]),
        Query("search", SearchParams(k=4, top_experts=2), texts=["sql join", "   "]),  # a blank text fails alone
        Query("search", SearchParams(k=3, top_experts=2), texts=["docker helm"]),
    ]
    got = run_queries(router, merged)
    assert calls == [SearchParams(k=6, top_experts=2)]  # one pass for the three good requests, at their largest k
    assert isinstance(got[2], ValueError) and "text 1 is empty" in str(got[2])
    monkeypatch.undo()
    for q, res in zip(merged, got):
        if q is not merged[2]:
            want = router.search(q.xq if q.xq is not None else q.texts, q.params)
            assert [[h.id for h in row] for row in res] == [[h.id for h in row] for row in want]
    monkeypatch.setattr(Router, "search", lambda self, *a, **kw: (calls.append(a[1]), real_search(self, *a, **kw))[1])
    calls.clear()
    per_expert = [Query("search", SearchParams(k=k, per_expert=True), xq=xq[:1]) for k in (2, 3, 2)]
    got = run_queries(router, per_expert)
    assert sorted(p.k for p in calls) == [2, 3]  # per-expert hits are grouped by expert: no cutting back, k apart
    assert [len(res[0]) for res in got] == [4, 6, 4]


def test_k_over_stored_vectors__is_422(tmp_path):
    state = RouterState(build_checkpoint(tmp_path / "small", per_expert=2))  # 8 vectors
    with TestClient(create_app(state)) as c:
        r = c.post("/search", json={"text": "a", "k": 9})
        assert r.status_code == 422 and "k must be between 1 and 8" in r.json()["error"]
    state.close()


def test_chunked_body_over_limit__is_413(client):
    def chunks():
        for _ in range(30):
            yield b" " * 10_000

    r = client.post("/search", content=chunks(), headers={"content-type": "application/json"})
    assert r.status_code == 413


def test_api_key__guards_changes_and_optionally_reads(ckpt):
    state = RouterState(ckpt)
    fb = {"text": "docker build", "expert": "devops", "positive": True}
    with TestClient(create_app(state, auth=AuthConfig(api_key="s3cret"))) as c:
        assert c.post("/feedback", json=fb).status_code == 401
        assert c.post("/feedback", json=fb, headers={"X-API-Key": "wrong"}).status_code == 401
        assert c.delete("/experts/devops").status_code == 401
        assert c.post("/feedback", json=fb, headers={"X-API-Key": "s3cret"}).status_code == 200
        assert c.post("/search", json={"text": "a"}).status_code == 200
    with TestClient(create_app(state, auth=AuthConfig(api_key="s3cret", protect_reads=True))) as c:
        assert c.post("/search", json={"text": "a"}).status_code == 401
        assert c.get("/stats").status_code == 401
        assert c.get("/stats", headers={"X-API-Key": "s3cret"}).status_code == 200
        assert c.get("/health").status_code == 200 and c.get("/ready").status_code == 200
    state.close()


# ---------------------------------------------------------------- mutations


def test_add_and_remove_expert__persist_and_route(ckpt):
    state = RouterState(ckpt)
    texts = topic_texts(CHURN_WORDS, 12, seed=9)
    with TestClient(create_app(state)) as c:
        r = c.post("/experts", json={"name": "rust", "texts": texts, "specialization": "Rust"})
        assert r.status_code == 201, r.text
        assert r.json()["generation"] == 1 and r.json()["expert"]["vectors"] == 12
        assert Router.load(ckpt).expert_names == [*TOPICS, "rust"]  # saved before the reply
        hits = c.post("/search", json={"text": texts[0], "k": 1, "top_experts": 1}).json()["results"][0]["hits"]
        assert hits[0]["expert"] == "rust" and hits[0]["text"] == texts[0]
        fid = c.post("/feedback", json={"text": texts[0], "expert": "rust", "positive": False}).json()["id"]
        assert c.delete("/experts/rust").json()["generation"] == 2
    state.close()
    router = Router.load(ckpt)
    assert router.expert_names == list(TOPICS)
    # the removed expert's feedback stays as an audit log, set apart from the live experts' feedback
    assert [(r.seq, r.query, r.expert, r.positive) for r in router.parts().store.feedback(include_removed=True)] == [
        (fid, texts[0], "rust", False)
    ]
    assert router.parts().store.feedback() == [] and router.parts().store.feedback_counts() == {}


def test_merge_and_split_over_http__persist_and_equal_the_library(ckpt, tmp_path):
    lib = Router.load(ckpt)  # the same changes made in the library, for comparison
    lifecycle.merge_experts(lib, "security", "devops", name="ops")
    lifecycle.split_expert(lib, "ops", parts=2, names=["ops-a", "ops-b"])
    state = RouterState(ckpt)
    with TestClient(create_app(state)) as c:
        r = c.post("/merge", json={"a": "security", "b": "devops", "name": "ops"})
        assert r.status_code == 200, r.text
        merged = r.json()["experts"][0]
        assert r.json()["generation"] == 1 and (merged["name"], merged["vectors"]) == ("ops", 60)
        r = c.post("/split", json={"name": "ops", "parts": 2, "names": ["ops-a", "ops-b"]})
        assert r.status_code == 200, r.text
        assert [e["name"] for e in r.json()["experts"]] == ["ops-a", "ops-b"] and r.json()["generation"] == 2
        bad = [
            ("/merge", {"a": "ops-a", "b": "nope"}, 404),
            ("/merge", {"a": "ops-a", "b": "ops-a"}, 422),
            ("/merge", {"a": "ops-a", "b": "ops-b", "name": "frontend"}, 409),
            ("/split", {"name": "nope"}, 404),
            ("/split", {"name": "frontend", "names": ["databases", "x"]}, 409),
            ("/split", {"name": "frontend", "parts": 3, "names": ["x", "y"]}, 422),
            ("/split", {"name": "frontend", "parts": 1}, 422),
        ]
        for path, body, status in bad:
            r = c.post(path, json=body)
            assert r.status_code == status, (path, body, r.text)
            assert r.json()["error"]
        assert c.get("/experts").json()["generation"] == 2  # failed changes changed nothing
    state.close()
    served = Router.load(ckpt)
    assert served.expert_names == lib.expert_names
    q = ["password token login", "docker deploy helm", "css grid layout"]
    assert [[h.id for h in row] for row in served.search(q, k=5)] == [[h.id for h in row] for row in lib.search(q, k=5)]


def test_expert_names__dot_segments_are_422_and_a_name_with_a_slash_can_be_deleted(ckpt):
    """'.' and '..' cannot be path segments (clients drop them from /experts/{name}); 'a/b' is one path."""
    state = RouterState(ckpt)
    with TestClient(create_app(state)) as c:
        for name in (".", ".."):
            for path, body in [
                ("/experts", {"name": name, "texts": ["x y"]}),
                ("/merge", {"a": "security", "b": "devops", "name": name}),
                ("/split", {"name": "frontend", "names": [name, "other"]}),
            ]:
                r = c.post(path, json=body)
                assert r.status_code == 422 and f"cannot be {name!r}" in r.json()["error"], (path, r.text)
        r = c.post("/experts", json={"name": "a/b", "texts": ["x y", "y z"]})
        assert r.status_code == 201 and r.json()["expert"]["name"] == "a/b"
        assert "a/b" in Router.load(ckpt).expert_names
        r = c.delete("/experts/a/b")
        assert r.status_code == 200 and r.json()["generation"] == 2
        assert [e["name"] for e in c.get("/experts").json()["experts"]] == list(TOPICS)
    state.close()
    assert Router.load(ckpt).expert_names == list(TOPICS)


def test_failed_save__is_503_and_changes_nothing(ckpt, monkeypatch):
    state = RouterState(ckpt)

    def disk_full(self, *args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Router, "save", disk_full)
    with TestClient(create_app(state)) as c:
        r = c.post("/experts", json={"name": "rust", "texts": ["borrow checker"]})
        assert r.status_code == 503 and "No space left" in r.json()["error"]
        assert c.delete("/experts/devops").status_code == 503
        assert [e["name"] for e in c.get("/experts").json()["experts"]] == list(TOPICS)
        assert c.post("/search", json={"text": "sql join"}).json()["generation"] == 0
        # Feedback is acknowledged only once saved: without a save it is refused, and not kept in memory either.
        r = c.post("/feedback", json={"text": "sql", "expert": "databases", "positive": True})
        assert r.status_code == 503 and "No space left" in r.json()["error"]
        with state.lease() as snap:
            assert snap.router.parts().store.feedback(include_removed=True) == []
    monkeypatch.undo()
    state.close()
    loaded = Router.load(ckpt)
    assert loaded.expert_names == list(TOPICS) and loaded.parts().store.feedback(include_removed=True) == []


def test_expert_changes__searches_see_old_or_new_set_never_a_mix(ckpt):
    """Readers run while 'rust' is added and removed over and over: every answer is whole and consistent.

    Generation g has 'rust' exactly when g is odd (add, remove, add, ...), so an answer naming
    'rust' at an even generation, a hit whose text is not its own, or any error would be a mix.
    """
    base = Router.load(ckpt)
    text_of = base.parts().store.get(range(base.ntotal))
    churn = topic_texts(CHURN_WORDS, 20, seed=7)
    probes = [text for text, _ in list(text_of.values())[::7]] + churn[:5]
    state = RouterState(ckpt)
    errors, answers, stop = [], [], threading.Event()

    def reader(seed: int) -> None:
        rng = np.random.default_rng(seed)
        with httpx.Client(base_url=url, timeout=30) as http:
            while not stop.is_set():
                batch = list(rng.choice(probes, size=3))
                r = http.post("/search", json={"texts": batch, "k": 3, "top_experts": 2})
                if r.status_code != 200:
                    errors.append(r.text)
                    continue
                answers.append(r.json())

    with live_server(create_app(state, batching=BatchConfig(max_wait_ms=0.5))) as url:
        threads = [threading.Thread(target=reader, args=(s,)) for s in range(3)]
        for t in threads:
            t.start()
        with httpx.Client(base_url=url, timeout=30) as http:
            for cycle in range(6):
                r = http.post("/experts", json={"name": "rust", "texts": churn})
                assert r.status_code == 201 and r.json()["generation"] == 2 * cycle + 1, r.text
                time.sleep(0.05)
                r = http.delete("/experts/rust")
                assert r.status_code == 200 and r.json()["generation"] == 2 * cycle + 2, r.text
                time.sleep(0.05)
        stop.set()
        for t in threads:
            t.join(30)
    state.close()
    assert not errors, errors[:3]
    assert len(answers) > 20
    seen_rust = 0
    for a in answers:
        for row in a["results"]:
            for h in row["hits"]:
                if h["expert"] == "rust":
                    seen_rust += 1
                    assert a["generation"] % 2 == 1, "'rust' answered from a generation without it"
                    assert h["text"] in churn
                else:
                    assert h["text"] == text_of[h["id"]][0], "a hit's text is not its own"
    assert seen_rust > 0, "the churned expert was never routed to: the test would not see a mix"
    assert {a["generation"] % 2 for a in answers} == {0, 1}


# ---------------------------------------------------------- load (short; benchmarks/serve_load.py is the real one)


def test_run_queries__embeds_a_pass_of_text_requests_in_one_call_and_times_it(ckpt, monkeypatch):
    router = Router.load(ckpt)
    calls = []
    real_encode = HashingEmbedder.encode
    monkeypatch.setattr(
        HashingEmbedder, "encode", lambda self, texts: (calls.append(len(texts)), real_encode(self, texts))[1]
    )
    queries = [
        Query("search", SearchParams(k=3), texts=["sql join", "docker helm"]),
        Query("route", SearchParams(top_experts=1), texts=["css grid"]),
        Query("search", SearchParams(k=2, per_expert=True), texts=["token login", "sql index", "flexbox"]),
    ]
    times = PassTimes()
    got = run_queries(router, queries, times)
    assert calls == [6]  # one embedder call for the pass's six texts, whatever their requests ask
    assert all(isinstance(r, list) for r in got)
    assert times.embed_s > 0 and times.search_s > 0


def test_micro_batcher__after_a_busy_pass_waits_for_its_clients_to_come_back(ckpt):
    """The second wave arrives a request at a time (as answered clients do); the batcher gathers it whole."""
    state = RouterState(ckpt)
    batcher = MicroBatcher(state, BatchConfig(max_wait_ms=0.0, busy_pass=4, busy_wait=1000.0))
    xq = Router.load(ckpt).prepare(np.eye(DIM, dtype=np.float32)[:8])[0]

    async def waves() -> None:
        first = [batcher.submit(Query("route", SearchParams(top_experts=1), xq=xq[i : i + 1])) for i in range(8)]
        await asyncio.gather(*first)
        second = []
        for i in range(8):
            second.append(batcher.submit(Query("route", SearchParams(top_experts=1), xq=xq[i : i + 1])))
            await asyncio.sleep(0.002)
        await asyncio.gather(*second)

    batcher.start()
    try:
        asyncio.run(waves())
    finally:
        batcher.stop()
    assert (batcher.counters.passes, batcher.counters.queries, batcher.counters.largest_pass) == (2, 16, 8)
    state.close()


def test_short_load__all_answered_and_batched(ckpt):
    state = RouterState(ckpt)
    rng = np.random.default_rng(1)
    vectors = rng.standard_normal((64, DIM)).round(4).tolist()
    codes: list[int] = []

    def client_loop(seed: int) -> None:
        with httpx.Client(base_url=url, timeout=30) as http:
            for i in range(25):
                r = http.post("/search", json={"vector": vectors[(seed * 25 + i) % 64], "k": 5, "with_text": False})
                codes.append(r.status_code)

    with live_server(create_app(state, batching=BatchConfig(max_wait_ms=2.0))) as url:
        threads = [threading.Thread(target=client_loop, args=(s,)) for s in range(16)]
        t0 = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        seconds = time.perf_counter() - t0
        server = httpx.get(f"{url}/stats").json()["server"]
    state.close()
    assert codes.count(200) == 16 * 25, set(codes)
    assert server["queries"] == 16 * 25
    assert server["mean_pass"] > 1.5, server  # 16 concurrent clients really share passes
    assert server["texts"] == 0 and server["embed_s"] == 0.0 and 0 < server["search_s"] <= server["pass_s"]
    print(f"\nshort load: {len(codes) / seconds:.0f} req/s, mean pass {server['mean_pass']:.1f} queries")


# ---------------------------------------------------------------- browsers (issue 10, defect 4)


def checkpoint_bytes(root: Path) -> dict[str, bytes]:
    """Every file under the checkpoint by relative path; a SQLite store by its rows (opening it sets WAL mode)."""
    out = {}
    for p in sorted(root.rglob("*")):
        if p.suffix == ".sqlite":
            with closing(sqlite3.connect(f"file:{p}?mode=ro", uri=True)) as conn:
                out[str(p.relative_to(root))] = "\n".join(conn.iterdump()).encode()
        elif p.is_file() and not p.name.endswith(("-wal", "-shm")):  # folded into the store when it closes
            out[str(p.relative_to(root))] = p.read_bytes()
    return out


CHANGES = [
    ("POST", "/feedback", {"text": "docker build", "expert": "devops", "positive": True}),
    ("POST", "/experts", {"name": "rust", "texts": ["borrow checker", "cargo build"]}),
    ("POST", "/merge", {"a": "security", "b": "devops"}),
    ("POST", "/split", {"name": "frontend"}),
    ("DELETE", "/experts/devops", None),
]


def test_cross_origin_simple_post__changes_nothing(ckpt):
    """What a web page on another site can send without a preflight: text/plain or form bodies, its Origin.

    Before the fix each of these text/plain POSTs merged, split, added experts or wrote feedback.
    """
    before = checkpoint_bytes(ckpt)  # before the server opens the store (its WAL is folded back in at close)
    state = RouterState(ckpt)
    with TestClient(create_app(state)) as c:
        for method, path, body in CHANGES:
            content = json.dumps(body) if body is not None else None
            for headers, status in [
                ({"content-type": "text/plain", "origin": "http://evil.example"}, 403),
                ({"content-type": "text/plain;charset=UTF-8"}, 415),
                ({"content-type": "application/x-www-form-urlencoded"}, 415),
                ({"content-type": "multipart/form-data; boundary=x"}, 415),
                ({}, 415),
                ({"content-type": "application/json; charset=latin-1"}, 415),
                ({"content-type": "application/json", "origin": "http://evil.example"}, 403),
                ({"content-type": "application/json", "origin": "null"}, 403),
                ({"content-type": "application/json", "origin": "http://testserver.evil.example"}, 403),
            ]:
                if method == "DELETE" and status == 415:
                    continue  # a DELETE has no body to declare
                r = c.request(method, path, content=content, headers=headers)
                assert r.status_code == status, (method, path, headers, r.text)
                assert r.json()["error"]
        assert c.get("/experts").json()["generation"] == 0
        assert [e["name"] for e in c.get("/experts").json()["experts"]] == list(TOPICS)
        # reads are not changed: a page cannot read an answer without CORS headers, which are never sent
        assert c.get("/experts", headers={"origin": "http://evil.example"}).status_code == 200
        assert "access-control-allow-origin" not in c.get("/experts", headers={"origin": "http://evil.example"}).headers
    state.close()
    assert checkpoint_bytes(ckpt) == before
    router = Router.load(ckpt)
    assert router.expert_names == list(TOPICS) and router.parts().store.feedback() == []


def test_same_and_allowed_origins_with_json__are_served(ckpt):
    state = RouterState(ckpt)
    auth = AuthConfig(allowed_origins=["https://App.Example:8443/"])
    with TestClient(create_app(state, auth=auth)) as c:
        fb = {"text": "docker build", "expert": "devops", "positive": True}
        for origin in (None, "http://testserver", "https://testserver", "https://app.example:8443"):
            headers = {"origin": origin} if origin else {}
            for ctype in ("application/json", "application/json; charset=utf-8", "Application/JSON"):
                r = c.post("/feedback", content=json.dumps(fb), headers={**headers, "content-type": ctype})
                assert r.status_code == 200, (origin, ctype, r.text)
        assert c.post("/feedback", json=fb, headers={"origin": "https://app.example:9999"}).status_code == 403
        r = c.post(
            "/experts", json={"name": "rust", "texts": ["borrow checker"]}, headers={"origin": "http://testserver"}
        )
        assert r.status_code == 201
        assert c.delete("/experts/rust", headers={"origin": "https://app.example:8443"}).status_code == 200
    state.close()
    assert len(Router.load(ckpt).parts().store.feedback()) == 12


def test_origin_config__rejects_what_is_not_an_origin():
    with pytest.raises(ValueError, match="an origin is scheme://host"):
        AuthConfig(allowed_origins=["https://app.example/path"])
    with pytest.raises(ValueError, match="must be a list of origins"):
        AuthConfig(allowed_origins="https://app.example")
    assert AuthConfig(allowed_origins=["HTTPS://A.example/", "null"]).allowed_origins == ("https://a.example", "null")


@pytest.mark.parametrize(
    "host, key, open_network, outcome",
    [
        ("127.0.0.1", None, False, None),
        ("localhost", None, False, None),
        ("::1", None, False, None),
        ("0.0.0.0", None, False, "refusing to start"),
        ("::", None, False, "refusing to start"),
        ("192.168.1.5", None, False, "refusing to start"),
        ("myhost.example", None, False, "refusing to start"),
        ("0.0.0.0", "s3cret", False, None),
        ("0.0.0.0", None, True, "SECURITY WARNING"),
    ],
)
def test_non_loopback_host_without_key__is_refused_unless_overridden(host, key, open_network, outcome):
    auth = AuthConfig(api_key=key, allow_open_network=open_network)
    if outcome == "refusing to start":
        with pytest.raises(
            ValueError,
            match=r"refusing to start: host=.* is not a loopback address and auth.api_key "
            r"is not set.*auth.allow_open_network=true",
        ):
            check_exposure(host, auth)
    elif outcome is None:
        assert check_exposure(host, auth) is None
    else:
        assert check_exposure(host, auth).startswith(outcome)


def test_serve__refuses_an_open_network_host_before_loading(tmp_path, monkeypatch):
    monkeypatch.delenv("MOE_ROUTER_API_KEY", raising=False)
    cfg = OmegaConf.load(Path(__file__).resolve().parents[1] / "configs" / "serve.yaml")
    cfg.ckpt, cfg.host = str(tmp_path / "no-such-checkpoint"), "0.0.0.0"
    with pytest.raises(ValueError, match="refusing to start"):  # not a missing-checkpoint error: checked first
        serve(cfg)


# ---------------------------------------------------------------- stored data (issue 10, defect 6)


def test_search__answers_stored_payloads_the_door_now_refuses(tmp_path):
    """A checkpoint written before metadata was checked holds non-dict and NaN payloads: searches answer 200."""
    router = Router(DIM, "ip", embedder=HashingEmbedder(DIM, seed=0))
    router.add_expert("old", texts=["sql join index", "sql table schema", "docker helm"])
    router.add_expert("other", texts=["css grid layout", "css flexbox"])
    ids = [int(i) for i in router.expert("old").ids]
    router.parts().store.delete_expert("old")  # rewrite its rows as an older version stored them (no check at the door)
    router.parts().store.add(
        ids, "old", ["sql join index", "sql table schema", "docker helm"], [5, {"x": float("nan")}, ["s"]]
    )
    router.set_gate(initial_gate(router.experts, hidden_dims=[], dropout=0.0))
    state = RouterState(router.save(tmp_path / "ckpt"))
    with TestClient(create_app(state)) as c:
        r = c.post("/search", json={"text": "sql join", "k": 5, "top_experts": 2})
        assert r.status_code == 200, r.text
        meta = {h["id"]: h["metadata"] for h in r.json()["results"][0]["hits"]}
    state.close()
    assert meta[ids[0]] == {"value": 5} and meta[ids[1]] == {"x": "nan"} and meta[ids[2]] == {"value": ["s"]}


def test_add_expert_over_http__bad_metadata_is_422_not_a_later_500(ckpt):
    state = RouterState(ckpt)
    with TestClient(create_app(state)) as c:
        r = c.post("/experts", json={"name": "m", "texts": ["x y"], "metadata": [{"x": [1, {"y": None}]}]})
        assert r.status_code == 201
        assert c.post("/search", json={"text": "x y", "k": 1, "top_experts": 1}).status_code == 200
        r = c.post(
            "/experts",
            content='{"name": "n", "texts": ["x y"], "metadata": [{"x": NaN}]}',
            headers={"content-type": "application/json"},
        )
        assert r.status_code in (400, 422) and r.json()["error"]
    state.close()


def test_l2_server__huge_vectors_are_422_never_null_probabilities(tmp_path):
    """metric l2 over HTTP: before the fix a 3e38 vector routed to probability null and an added expert of them
    made every later answer null; a 1e19 query found no hits. Now each is a 422 and the checkpoint is unchanged."""
    rng = np.random.default_rng(0)
    router = Router(DIM, "l2")
    for name in ("a", "b"):
        router.add_expert(name, rng.standard_normal((10, DIM)).astype(np.float32))
    router.set_gate(initial_gate(router.experts, hidden_dims=[], dropout=0.0))
    state = RouterState(router.save(tmp_path / "ckpt"))
    with TestClient(create_app(state)) as c:
        for path, body in [
            ("/route", {"vector": [3e38] * DIM}),
            ("/search", {"vector": [1e19] * DIM, "k": 3}),
            ("/experts", {"name": "huge", "vectors": [[3e38] * DIM] * 3}),
            ("/feedback", {"vector": [1e19] * DIM, "expert": "a", "positive": True}),
        ]:
            r = c.post(path, json=body)
            assert r.status_code == 422 and "too large for metric 'l2'" in r.json()["error"], (path, r.text)
        r = c.post("/route", json={"vector": [0.5] * DIM, "top_experts": 2})
        assert all(isinstance(s["probability"], float) for s in r.json()["results"][0]["experts"])
        assert c.get("/experts").json()["generation"] == 0
    state.close()
