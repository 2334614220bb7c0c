"""Served feedback goes to disk through saves, grouped: acknowledged rows are on disk, refused ones nowhere."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from moe_router import HashingEmbedder, Router
from moe_router.gate import initial_gate
from moe_router.serving import RouterState
from moe_router.serving.state import PersistError

DIM = 16


@pytest.fixture
def ckpt(tmp_path: Path) -> Path:
    router = Router(DIM, "ip", embedder=HashingEmbedder(DIM, seed=0))
    for name in ("alpha", "beta"):
        router.add_expert(name, texts=[f"{name} topic {i}" for i in range(10)])
    router.set_gate(initial_gate(router.experts, hidden_dims=[8], dropout=0.0))
    return router.save(tmp_path / "ckpt")


def feedback_storm(state: RouterState, threads: int, each: int) -> tuple[dict[int, str], list[str]]:
    """`threads` clients sending `each` feedback rows at once: (acknowledged id -> query, refusals)."""
    acked: dict[int, str] = {}
    refused: list[str] = []
    lock = threading.Lock()

    def client(t: int) -> None:
        for i in range(each):
            query = f"client {t} query {i}"
            try:
                seq = state.record_feedback(query, ("alpha", "beta")[i % 2], i % 3 == 0)
                with lock:
                    acked[seq] = query
            except PersistError as exc:
                with lock:
                    refused.append(str(exc))

    workers = [threading.Thread(target=client, args=(t,)) for t in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(60)
    return acked, refused


def test_concurrent_feedback__shares_saves_and_every_acknowledged_row_is_on_disk(
    ckpt: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    saves = []
    real_save = Router.save
    monkeypatch.setattr(Router, "save", lambda self, *a, **k: (saves.append(1), real_save(self, *a, **k))[1])
    state = RouterState(ckpt)
    acked, refused = feedback_storm(state, threads=8, each=10)
    state.close()
    assert refused == [] and len(acked) == 80
    assert len(saves) < 80  # grouped: rows that arrived during a save shared the next one
    stored = {r.seq: r.query for r in Router.load(ckpt).parts().store.feedback()}
    assert stored == acked


def test_feedback_whose_save_fails__is_refused_and_kept_nowhere(ckpt: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    real_save = Router.save

    def flaky(self, *args, **kwargs):
        calls.append(1)
        if len(calls) % 3 == 0:  # every third save hits a full disk
            raise OSError(28, "No space left on device")
        # A slow disk: rows that arrive while a save runs must not reach the disk in it (they would be
        # written, then refused with the next, failing save: kept but never acknowledged).
        time.sleep(0.01)
        return real_save(self, *args, **kwargs)

    monkeypatch.setattr(Router, "save", flaky)
    state = RouterState(ckpt)
    acked, refused = feedback_storm(state, threads=6, each=8)
    with state.lease() as snap:
        in_memory = {r.seq: r.query for r in snap.router.parts().store.feedback()}
    state.close()
    assert refused and acked and len(acked) + len(refused) == 48
    assert all("No space left" in m or "was not kept" in m for m in refused)
    assert {r.seq: r.query for r in Router.load(ckpt).parts().store.feedback()} == acked == in_memory
