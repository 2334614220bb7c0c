"""A stateful property test (hypothesis RuleBasedStateMachine) over the library's public operations.

add, remove, merge, split, feedback, set attributes, calibrate, save and load, each with valid and
invalid arguments. Invariants: every refused call raises a documented error (ValueError, which
CheckpointError is; KeyError for an unknown expert; RuntimeError without a gate) and leaves the
router exactly as it was; every successful save loads back into an equal router (experts, vectors,
ids, gate weights and outputs, stats, store rows, feedback, config, metrics, settings); every loaded
router searches.

Short in CI (the settings below); long on demand: MOE_ROUTER_STATE_EXAMPLES=500 MOE_ROUTER_STATE_STEPS=60
python -m pytest tests/test_state_machine.py -s (the counts are printed).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from moe_router import HashingEmbedder, Router
from moe_router.gate import initial_gate
from moe_router.lifecycle import merge_experts, split_expert
from moe_router.routing.calibrate import calibrate

DIM = 8
ERRORS = (ValueError, KeyError, RuntimeError)
EXAMPLES = int(os.environ.get("MOE_ROUTER_STATE_EXAMPLES", "12"))
STEPS = int(os.environ.get("MOE_ROUTER_STATE_STEPS", "25"))
COUNTS: Counter = Counter()

NAMES = st.sampled_from(["a", "b", "c", "d", "new", "a+b", "x/0", "", " a", ".", "..", "bad\ud800", "ctl\x01"])
PARENTS = st.one_of(st.none(), st.sampled_from(["group", "a", "", 3, "g\ud800"]))
SPECS = st.one_of(st.sampled_from(["", "topic", "long " * 10]), st.integers(0, 3000), st.none())
REALS = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True), st.sampled_from(["0.5", None, True, -1]), st.integers(-3, 3)
)


def digest(router: Router) -> str:
    """Everything a call may change and a checkpoint holds, exactly."""
    parts = router.parts()
    h = hashlib.sha256()
    h.update(
        json.dumps(
            [
                parts.dim,
                parts.metric,
                parts.abstain_threshold,
                parts.prior_weight,
                parts.config,
                parts.metrics,
                [(e.name, e.specialization, e.parent) for e in parts.experts],
                parts.stats.counts.tolist(),
                parts.stats.confidence_sums.tolist(),
            ],
            sort_keys=True,
        ).encode()
    )
    for e in parts.experts:
        h.update(e.vectors().tobytes())
        h.update(e.ids.tobytes())
    for k, v in sorted((parts.gate.state_dict() if parts.gate is not None else {}).items()):
        h.update(k.encode())
        h.update(v.detach().cpu().numpy().tobytes())
    for table in ("items", "feedback"):
        rows = parts.store.conn.execute(f"SELECT * FROM {table} ORDER BY 1").fetchall()
        h.update(repr(rows).encode())
    return h.hexdigest()


def probe(router: Router) -> np.ndarray:
    xq = np.random.default_rng(7).standard_normal((6, DIM)).astype(np.float32)
    return router.gate_probs(router.prepare(xq)[0])


class RouterMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.dir = Path(tempfile.mkdtemp(prefix="moe_state_"))
        self.rng = np.random.default_rng(0)
        self.router = Router(DIM, "ip", embedder=HashingEmbedder(DIM, seed=0))
        for name in ("a", "b", "c"):
            self.router.add_expert(name, self.vectors(6), texts=[f"{name} text {i}" for i in range(6)])
        torch.manual_seed(0)
        self.router.set_gate(initial_gate(self.router.experts, hidden_dims=[8], dropout=0.0))
        self.router.set_training_info({"seed": 0, "data": {"path": "x.jsonl"}}, {"val/acc@1": 0.5})
        self.saved: str | None = None  # digest of what the checkpoint on disk holds

    def teardown(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)

    def vectors(self, n: int) -> np.ndarray:
        return self.rng.standard_normal((n, DIM)).astype(np.float32)

    def attempt(self, op: str, call: Callable[[], object]) -> bool:
        """Run one call: a success, or a documented error that changed nothing."""
        before = digest(self.router)
        try:
            call()
        except ERRORS as exc:
            assert digest(self.router) == before, f"{op} failed ({exc}) but changed the router"
            COUNTS[f"{op} refused"] += 1
            return False
        COUNTS[f"{op} ok"] += 1
        return True

    # ------------------------------------------------------------ structure

    @rule(name=NAMES, n=st.integers(0, 5), spec=SPECS, parent=PARENTS, kind=st.sampled_from(["v", "t", "vt", "bad"]))
    def add(self, name, n, spec, parent, kind) -> None:
        texts = [f"{name} doc {i}" for i in range(n)] if "t" in kind else None
        vectors = self.vectors(n) if "v" in kind else None
        if kind == "bad":
            vectors = np.ones((max(n, 1), DIM), dtype=bool) if n % 2 else np.full((1, DIM + 1), 0.5)
        self.attempt("add", lambda: self.router.add_expert(name, vectors, texts, spec, parent))

    @rule(name=NAMES)
    def remove(self, name) -> None:
        self.attempt("remove", lambda: self.router.remove_expert(name))

    @rule(a=NAMES, b=NAMES, name=st.one_of(st.none(), NAMES), spec=st.one_of(st.none(), SPECS))
    def merge(self, a, b, name, spec) -> None:
        self.attempt("merge", lambda: merge_experts(self.router, a, b, name, spec))

    @rule(
        name=NAMES,
        count=st.one_of(st.integers(-1, 4), st.sampled_from(["2", 2.0, True])),
        names=st.one_of(st.none(), st.sampled_from(["xy", ["p", "q"], ["p", "p"], ["a", "z"]])),
        imbalance=st.one_of(st.none(), st.sampled_from([1.5, 0.5, "x", float("nan")])),
    )
    def split(self, name, count, names, imbalance) -> None:
        self.attempt("split", lambda: split_expert(self.router, name, count, names, 0, imbalance))

    # ------------------------------------------------------------ feedback and settings

    @rule(expert=NAMES, positive=st.one_of(st.booleans(), st.sampled_from(["no", 1, None])), text=st.booleans())
    def feedback(self, expert, positive, text) -> None:
        query = "a question" if text else self.vectors(1)[0]
        self.attempt("feedback", lambda: self.router.record_feedback(query, expert, positive))

    @rule(value=REALS)
    def abstain_threshold(self, value) -> None:
        self.attempt("abstain_threshold", lambda: setattr(self.router, "abstain_threshold", value))

    @rule(value=REALS)
    def prior_weight(self, value) -> None:
        self.attempt("prior_weight", lambda: setattr(self.router, "prior_weight", value))

    @rule(name=NAMES, parent=PARENTS)
    def set_parent(self, name, parent) -> None:
        self.attempt("set_parent", lambda: self.router.set_parent(name, parent))

    @rule(n=st.integers(0, 8), shift=st.integers(0, 2), oos=st.sampled_from([[], ["out of scope"], [5], "oops"]))
    def calibrate(self, n, shift, oos) -> None:
        names = self.router.expert_names
        queries = self.vectors(n)
        gold = [names[(i + shift) % len(names)] for i in range(n + shift - 1)] if names else []
        self.attempt("calibrate", lambda: calibrate(self.router, queries, gold, oos))

    # ------------------------------------------------------------ queries

    @rule(k=st.integers(-1, 8), top=st.integers(0, 5), per_expert=st.one_of(st.booleans(), st.just("no")))
    def search(self, k, top, per_expert) -> None:
        self.attempt("search", lambda: self.router.search(self.vectors(3), k=k, top_experts=top, per_expert=per_expert))

    # ------------------------------------------------------------ persistence

    @rule()
    def save(self) -> None:
        if self.attempt("save", lambda: self.router.save(self.dir / "ckpt")):
            self.saved = digest(self.router)
            loaded = Router.load(self.dir / "ckpt")
            assert digest(loaded) == self.saved, "a saved router did not load back equal"
            if loaded.gate is not None and loaded.num_experts:
                np.testing.assert_array_equal(probe(loaded), probe(self.router))

    @precondition(lambda self: self.saved is not None)
    @rule()
    def load(self) -> None:
        self.router = Router.load(self.dir / "ckpt")
        assert digest(self.router) == self.saved
        COUNTS["load ok"] += 1

    @invariant()
    def searches(self) -> None:
        r = self.router
        if r.gate is not None and r.ntotal:
            hits = r.search(self.vectors(2), k=min(3, r.ntotal), top_experts=min(2, r.num_experts))
            assert len(hits) == 2 and all(len(h) >= 1 for h in hits)


RouterMachine.TestCase.settings = settings(
    max_examples=EXAMPLES,
    stateful_step_count=STEPS,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
    derandomize=True,
)
TestRouterMachine = RouterMachine.TestCase


def test_state_machine__ran_both_outcomes_of_the_operations() -> None:
    """The machine above ran (pytest orders tests by position in the file): every operation succeeded
    and was refused at least once, so neither path was left out."""
    print("state machine calls:", dict(sorted(COUNTS.items())))
    for op in (
        "add",
        "remove",
        "merge",
        "split",
        "feedback",
        "abstain_threshold",
        "prior_weight",
        "set_parent",
        "calibrate",
        "search",
    ):
        assert COUNTS[f"{op} ok"] > 0 and COUNTS[f"{op} refused"] > 0, (op, dict(COUNTS))
    assert COUNTS["save ok"] > 0 and COUNTS["load ok"] > 0
