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
from moe_router.train.calibrate import calibrate_router

DIM = 8
ERRORS = (ValueError, KeyError, RuntimeError)
EXAMPLES = int(os.environ.get("MOE_ROUTER_STATE_EXAMPLES", "30"))
STEPS = int(os.environ.get("MOE_ROUTER_STATE_STEPS", "30"))
COUNTS: Counter = Counter()


# Arguments are drawn from a seeded random.Random that hypothesis supplies, with explicit odds:
# hypothesis's own choices favour boundary values and would make most calls invalid, so changes would
# rarely succeed and the router would never grow. A quarter of the draws are invalid on purpose.
BAD = 0.25
GOOD_NAMES = ["new", "d", "x/0", "a+b", "a", "b", "c"]  # hypothesis favours the first: new names
BAD_NAMES = ["", " a", ".", "..", "bad\ud800", "ctl\x01", 3, None]
GOOD_PARENTS = [None, None, "group", "a"]
BAD_PARENTS = ["", 3, "g\ud800"]
GOOD_SPECS = ["", "topic", "long " * 10]
BAD_SPECS = [2024, None, 1.5]
GOOD_REALS = [0.0, 0.1, 0.5, 2.0, -1.5]
BAD_REALS = [float("nan"), float("inf"), "0.5", True, None]
RNG = st.randoms(use_true_random=False)


def pick(r, good: list, bad: list, p_bad: float = BAD):
    """A good value, or with odds p_bad a bad one (hypothesis draws small floats most often: 0 means good)."""
    return r.choice(bad if r.random() > 1.0 - p_bad or not good else good)


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

    @rule(r=RNG)
    def add(self, r) -> None:
        n = pick(r, [1, 2, 3, 5], [0])
        kind = pick(r, ["v", "t", "vt"], ["bool", "dim", "texts mismatch"], 0.15)
        texts = [f"doc {i}" for i in range(n)] if "t" in kind else None
        vectors = {"bool": np.ones((max(n, 1), DIM), bool), "dim": np.full((1, DIM + 1), 0.5)}.get(kind)
        if "v" in kind or kind == "texts mismatch":
            vectors = self.vectors(n)
        if kind == "texts mismatch":
            texts = [f"doc {i}" for i in range(n + 1)]
        name, spec = pick(r, GOOD_NAMES, BAD_NAMES), pick(r, GOOD_SPECS, BAD_SPECS)
        parent = pick(r, GOOD_PARENTS, BAD_PARENTS)
        self.attempt("add", lambda: self.router.add_expert(name, vectors, texts, spec, parent))

    @rule(r=RNG)
    def remove(self, r) -> None:
        name = pick(r, self.router.expert_names, [*BAD_NAMES, "ghost"], 0.2)
        self.attempt("remove", lambda: self.router.remove_expert(name))

    @rule(r=RNG)
    def merge(self, r) -> None:
        names = self.router.expert_names
        a, b = pick(r, names, ["ghost"], 0.1), pick(r, names, ["ghost"], 0.1)
        name = pick(r, [None, "merged", "m2"], BAD_NAMES, 0.2)
        spec = pick(r, [None, "joined"], BAD_SPECS, 0.2)
        self.attempt("merge", lambda: merge_experts(self.router, a, b, name, spec))

    @rule(r=RNG)
    def split(self, r) -> None:
        name = pick(r, self.router.expert_names, ["ghost"], 0.1)
        count = pick(r, [2, 3], [-1, 1, "2", 2.0, True])
        own = [f"{name}:{j}" for j in range(count if isinstance(count, int) else 2)]
        names = pick(r, [None, own], ["xy", ["p", "p"]])
        imbalance = pick(r, [None, 1.5], [0.5, "x", float("nan")])
        self.attempt("split", lambda: split_expert(self.router, name, count, names, 0, imbalance))

    # ------------------------------------------------------------ feedback and settings

    @rule(r=RNG)
    def feedback(self, r) -> None:
        expert = pick(r, self.router.expert_names, ["ghost", ""], 0.15)
        positive = pick(r, [True, False], ["no", 1, None], 0.2)
        query = pick(r, ["a question", self.vectors(1)[0]], [np.ones(DIM + 1, np.float32), ""], 0.1)
        self.attempt("feedback", lambda: self.router.record_feedback(query, expert, positive))

    @rule(r=RNG)
    def abstain_threshold(self, r) -> None:
        value = pick(r, [*GOOD_REALS, None], BAD_REALS[:-1])
        self.attempt("abstain_threshold", lambda: setattr(self.router, "abstain_threshold", value))

    @rule(r=RNG)
    def prior_weight(self, r) -> None:
        value = pick(r, [0.0, 0.1, 0.5, 2.0], [-1.5, *BAD_REALS])
        self.attempt("prior_weight", lambda: setattr(self.router, "prior_weight", value))

    @rule(r=RNG)
    def set_parent(self, r) -> None:
        name = pick(r, self.router.expert_names, ["ghost"], 0.1)
        parent = pick(r, [p for p in GOOD_PARENTS if p != name], [*BAD_PARENTS, name])
        self.attempt("set_parent", lambda: self.router.set_parent(name, parent))

    @rule(r=RNG)
    def calibrate(self, r) -> None:
        names = self.router.expert_names
        n = r.randint(1, 8)
        extra = pick(r, [0], [-1, 1])  # != 0: one gold expert too few or too many
        oos = pick(r, [[], ["out of scope"]], [[5], "oops", ["a", None]])
        queries = self.vectors(n)
        gold = [names[i % len(names)] for i in range(n + extra)] if names else []
        self.attempt("calibrate", lambda: calibrate_router(self.router, queries, gold, oos))

    # ------------------------------------------------------------ queries

    @rule(r=RNG)
    def search(self, r) -> None:
        k, top = pick(r, [1, 3, 5], [0, -1, 10**6]), pick(r, [1, 2], [0, 99])
        per_expert = pick(r, [False, True], ["no"])
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
