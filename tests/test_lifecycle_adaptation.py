"""Fine-tunes after a change and from feedback (moe_router.adaptation), and scripts/experts.py's run(cfg).

Seeded synthetic clusters with a small gate; each Lightning fit is a few steps.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir

from moe_router import Router
from moe_router import lifecycle as lc
from moe_router.apps.experts import run
from moe_router.gate import initial_gate
from moe_router.gate.model import infer
from moe_router.routing import router as router_module
from moe_router.train.finetune import FineTuneConfig, feedback_pairs, fine_tune, fine_tune_from_feedback
from tests.helpers import CONFIGS, DIM, clusters

FAST = FineTuneConfig(steps=5, replay=1.0, min_replay=0)


def five_clusters(prototypes: int = 0) -> tuple[Router, list[np.ndarray]]:
    """Four experts over clusters 0-3 (80 stored vectors each, 40 held out); cluster 4 is kept for adding."""
    xs = clusters(5, 120, DIM, seed=3, noise=0.9)
    router = Router(DIM, "ip")
    for i in range(4):
        router.add_expert(f"e{i}", xs[i][:80])
    torch.manual_seed(0)
    router.set_gate(initial_gate(router.experts, hidden_dims=[32], dropout=0.0, prototypes_per_expert=prototypes))
    return router, xs


def acc(router: Router, x: np.ndarray, expert: str) -> float:
    return float(np.mean([r[0].expert == expert for r in router.route(x, top_experts=1)]))


@pytest.mark.parametrize("prototypes", [0, 4])
def test_fitted_row__new_expert_routable_at_once_without_taking_the_others(prototypes: int) -> None:
    router, xs = five_clusters(prototypes)
    plain, _ = five_clusters(prototypes)
    old_before = [acc(router, xs[i][80:], f"e{i}") for i in range(4)]
    plain.add_expert("new", xs[4][:80], fit_row=False)  # Gate.add_expert's row alone
    router.add_expert("new", xs[4][:80])  # ... refitted against the other experts (the default)
    assert acc(router, xs[4][80:], "new") >= 0.9
    old_after = [acc(router, xs[i][80:], f"e{i}") for i in range(4)]
    assert min(np.subtract(old_after, old_before)) >= -0.05
    if not prototypes:  # an MLP row at the mean feature takes the other experts' queries; the fitted one does not
        assert np.mean(old_after) > np.mean([acc(plain, xs[i][80:], f"e{i}") for i in range(4)]) + 0.2


def test_fitted_row__failure_removes_the_new_expert_again(monkeypatch: pytest.MonkeyPatch) -> None:
    router, xs = five_clusters()
    names, gate = router.expert_names, {k: v.clone() for k, v in router.gate.state_dict().items()}

    def broken(*args, **kwargs):
        raise RuntimeError("no memory")

    monkeypatch.setattr(router_module, "refit_rows", broken)
    with pytest.raises(RuntimeError, match="no memory"):
        router.add_expert("new", xs[4][:80])
    assert router.expert_names == names and router.parts().store.max_id() == 4 * 80 - 1
    assert all(torch.equal(v, gate[k]) for k, v in router.gate.state_dict().items())


def test_fine_tune__sharpens_the_new_expert_and_keeps_the_others() -> None:
    router, xs = five_clusters()
    router.add_expert("new", xs[4][:80], fit_row=False)  # the gate's plain row takes queries from the others
    before = [acc(router, xs[i][80:], f"e{i}") for i in range(4)]
    res = fine_tune(router, ["new"], FineTuneConfig(steps=30, replay=1.0, min_replay=0))
    after = [acc(router, xs[i][80:], f"e{i}") for i in range(4)]
    assert res.focus == 80 and res.replayed == 80 and res.pairs == 160 and res.steps == 30
    assert acc(router, xs[4][80:], "new") >= 0.9
    assert np.mean(after) > np.mean(before) + 0.2


@pytest.mark.parametrize("prototypes", [0, 4])
def test_fine_tune_train_only_focus__leaves_every_other_logit_exact_and_trains_the_new_expert(prototypes: int) -> None:
    router, xs = five_clusters(prototypes)
    router.add_expert("new", xs[4][:80], fit_row=False)
    probe = np.concatenate([x[80:] for x in xs])  # held-out vectors of all five clusters
    before = infer(router.gate, probe, "logits")
    new_before = acc(router, xs[4][80:], "new")
    cfg = FineTuneConfig(steps=30, replay=1.0, min_replay=0, train_only_focus=True, keep_margin=None)
    fine_tune(router, ["new"], cfg)
    after = infer(router.gate, probe, "logits")
    # The old experts' logits: unchanged up to float rounding (prototype logits subtract a max over all prototypes).
    np.testing.assert_allclose(after[:, :4], before[:, :4], rtol=0, atol=1e-5)
    assert not np.allclose(after[:, 4], before[:, 4])
    assert acc(router, xs[4][80:], "new") >= max(0.8, new_before)  # it learnt (from 0.5 with prototypes)
    assert all(p.requires_grad for p in router.gate.parameters())  # the freeze was undone


def test_train_only_focus__without_focus_or_on_feedback_pairs_is_a_clear_error() -> None:
    router, xs = five_clusters()
    cfg = FineTuneConfig(steps=2, train_only_focus=True)
    with pytest.raises(ValueError, match="train_only_focus needs focus experts"):
        fine_tune(router, [], cfg)
    router.record_feedback(xs[0][0], "e0", True)
    with pytest.raises(ValueError, match="train_only_focus is for fine_tune"):
        fine_tune_from_feedback(router, cfg)
    with pytest.raises(ValueError, match=r"expert indices in 0\.\.3"):
        router.gate.train_only([4])


def test_fine_tune__unknown_expert_or_no_gate_fails_without_change() -> None:
    router, _ = five_clusters()
    state = {k: v.clone() for k, v in router.gate.state_dict().items()}
    with pytest.raises(KeyError, match="unknown expert 'ghost'"):
        fine_tune(router, ["ghost"], FAST)
    assert all(torch.equal(v, state[k]) for k, v in router.gate.state_dict().items())
    router.set_gate(None)
    with pytest.raises(RuntimeError, match="needs a gate"):
        fine_tune(router, ["e0"], FAST)


def test_feedback_pairs__positive_is_the_expert_negative_is_anywhere_else() -> None:
    router, xs = five_clusters()
    router.record_feedback(xs[0][0], "e0", True)
    router.record_feedback(xs[0][1], "e1", False)
    x, target = feedback_pairs(router)
    assert x.shape == (2, DIM) and target.shape == (2, 4)
    np.testing.assert_array_equal(target[0], [1, 0, 0, 0])
    assert target[1, 1] == 0 and target[1].sum() == pytest.approx(1.0)
    p = router.gate_probs(x[1:])[0]
    np.testing.assert_allclose(target[1][[0, 2, 3]], p[[0, 2, 3]] / p[[0, 2, 3]].sum(), rtol=1e-5)
    router.remove_expert("e1")  # feedback for experts that are gone is ignored
    assert feedback_pairs(router)[0].shape == (1, DIM)


def test_fine_tune_from_feedback__fixes_a_misrouted_region() -> None:
    router, xs = five_clusters()
    with torch.no_grad():  # a regression: cluster 0's queries now go to e1
        router.gate.head.weight[1] += 2.0 * router.gate.head.weight[0]
    assert acc(router, xs[0][80:], "e0") < 0.2
    others = [acc(router, xs[i][80:], f"e{i}") for i in (1, 2, 3)]
    for x, routes in zip(xs[0][:40], router.route(xs[0][:40], top_experts=2)):  # a stream of user feedback
        for r in routes:
            router.record_feedback(x, r.expert, r.expert == "e0")
    res = fine_tune_from_feedback(router, FineTuneConfig(steps=30, lr=1e-2, replay=1.0, min_replay=200))
    assert res.focus == 80 and res.replayed == 200
    assert acc(router, xs[0][80:], "e0") >= 0.8  # held-out queries of the region
    assert np.mean([acc(router, xs[i][80:], f"e{i}") for i in (1, 2, 3)]) >= np.mean(others) - 0.05
    with pytest.raises(ValueError, match="no feedback recorded"):
        fine_tune_from_feedback(Router(DIM, "ip"), FAST)


# ---------------------------------------------------------------- scripts/experts.py


def checkpoint_digest(path: Path) -> dict:
    """Every file's name and bytes (every version: a load never opens the store as a database, so nothing changes)."""
    return {
        str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(path.rglob("*"))
        if p.is_file()
    }


def experts_cfg(ckpt: Path, *overrides: str):
    with initialize_config_dir(str(CONFIGS), version_base="1.3"):
        return compose("experts", overrides=[f"ckpt={ckpt}", "fine_tune.steps=5", "fine_tune.min_replay=0", *overrides])


def test_experts_script__operations_on_a_checkpoint(text_router: Router, tmp_path: Path) -> None:
    ckpt = text_router.save(tmp_path / "ckpt")
    out = run(experts_cfg(ckpt, "op=stats", f"stats.plot={tmp_path / 'load.png'}"))
    assert out.saved is None and "astronomy" in out.lines[0] and (tmp_path / "load.png").is_file()

    docs = tmp_path / "gardening.txt"
    docs.write_text("\n".join(f"a question about garden soil compost seeds {i}" for i in range(12)))
    out = run(experts_cfg(ckpt, "op=add", "add.name=gardening", f"add.texts_file={docs}"))
    assert out.saved == ckpt and Router.load(ckpt).expert_names == ["astronomy", "cooking", "finance", "gardening"]

    out = run(
        experts_cfg(
            ckpt, "op=merge", "merge.a=cooking", "merge.b=gardening", "merge.name=home", f"out={tmp_path / 'm'}"
        )
    )
    merged = Router.load(tmp_path / "m")
    assert merged.expert_names == ["astronomy", "home", "finance"] and merged.expert("home").ntotal == 15 + 12
    assert Router.load(ckpt).num_experts == 4  # out= leaves the input checkpoint alone

    run(experts_cfg(ckpt, "op=feedback", "feedback.query='a question about stock'", "feedback.expert=finance"))
    assert [(s.expert, s.total) for s in lc.feedback_stats(Router.load(ckpt)) if s.total] == [("finance", 1)]


@pytest.mark.parametrize(
    "overrides, error, match",
    [
        (("op=merge", "merge.a=cooking", "merge.b=nope"), KeyError, "unknown expert 'nope'"),
        (("op=split", "split.name=finance", "split.parts=99"), ValueError, "into 99 parts: it holds only 15"),
        (("op=remove", "remove.name=ghost"), KeyError, "unknown expert 'ghost'"),
        (("op=add", "add.name=cooking", "add.texts_file=DOCS"), ValueError, "'cooking' already exists"),
        (("op=feedback", "feedback.query=x", "feedback.expert=ghost"), KeyError, "unknown expert 'ghost'"),
    ],
)
def test_experts_script__a_failed_operation_leaves_the_checkpoint_unchanged(
    text_router: Router, tmp_path: Path, overrides, error, match
) -> None:
    ckpt = text_router.save(tmp_path / "ckpt")
    docs = tmp_path / "docs.txt"
    docs.write_text("a question about bake\n")
    before = checkpoint_digest(ckpt)
    with pytest.raises(error, match=match):
        run(experts_cfg(ckpt, *(o.replace("DOCS", str(docs)) for o in overrides)))
    assert checkpoint_digest(ckpt) == before
