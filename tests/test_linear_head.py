"""The gate's linear head: a logistic regression installed beside the MLP, served, saved and grown as any gate."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from moe_router import Router
from moe_router.apps.train import train
from moe_router.gate.confidence import fit_temperature, softmax
from moe_router.gate.linear import fit_linear, training_rows
from moe_router.gate.model import Gate, infer
from moe_router.index.expert import labelled_sample
from moe_router.routing.parts import CalibrationSet
from moe_router.train.finetune import FineTuneConfig, fine_tune
from moe_router.train.linear_head import (
    FIT_WEIGHTS,
    PER_EXPERT,
    add_linear_head,
    fit_head_weight,
    refit_linear_head,
)
from tests.helpers import DIM, clusters, make_router
from tests.test_training import _train_overrides, compose_config


def _linear(gate: Gate, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(gate.num_experts, gate.dim, generator=g), torch.randn(gate.num_experts, generator=g)


def _queries(n: int = 40) -> np.ndarray:
    x = np.concatenate(clusters(4, n // 4, DIM, seed=5, noise=0.6))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


@pytest.mark.parametrize("prototypes", [0, 3])
def test_with_linear__adds_exactly_scale_times_the_linear_logits(prototypes: int) -> None:
    torch.manual_seed(0)
    gate = Gate(DIM, 4, hidden_dims=[16], prototypes_per_expert=prototypes).eval()
    if prototypes:
        gate.init_prototypes([torch.randn(3, DIM) for _ in range(4)])
    W, b = _linear(gate)
    x = torch.from_numpy(_queries())
    widened = gate.with_linear(W, b, 0.7)
    assert widened.linear_head and not gate.linear_head  # a copy: the original is untouched
    want = gate(x).logits + 0.7 * (x @ W.T + b)
    torch.testing.assert_close(widened(x).logits, want, rtol=1e-5, atol=1e-5)
    twice = widened.with_linear(W, b, 0.3)  # a second regression adds to the first, no second copy of x
    assert twice.feature_dim == gate.feature_dim + DIM
    torch.testing.assert_close(twice(x).logits, gate(x).logits + 1.0 * (x @ W.T + b), rtol=1e-4, atol=1e-4)


def test_with_linear_bad_input__raises_saying_what_was_expected() -> None:
    gate = Gate(DIM, 4, hidden_dims=[8])
    W, b = _linear(gate)
    with pytest.raises(ValueError, match=r"weight \(4, 32\) and bias \(4,\), got \(3, 32\)"):
        gate.with_linear(W[:3], b)
    with pytest.raises(ValueError, match="finite scale > 0"):
        gate.with_linear(W, b, 0.0)
    with pytest.raises(ValueError, match="finite weights"):
        gate.with_linear(W * float("nan"), b)
    with pytest.raises(ValueError, match="without a linear head"):
        Gate.assemble([gate.with_linear(W, b), gate])


def test_linear_head_router__saves_loads_routes_the_same_and_grows(tmp_path: Path) -> None:
    router = make_router("ip")
    W, b = _linear(router.gate)
    router.set_gate(router.gate.with_linear(W, b, 2.0))
    xq = _queries()
    before = router.gate_probs(xq)
    loaded = Router.load(router.save(tmp_path / "ckpt"))
    assert loaded.gate.linear_head
    np.testing.assert_allclose(loaded.gate_probs(xq), before, rtol=1e-6, atol=1e-7)
    new = clusters(5, 30, DIM, seed=9, noise=0.2)[4] + 3.0  # a far-away cluster: a new expert
    loaded.add_expert("new", new)
    assert loaded.gate.num_experts == 5 and loaded.gate.linear_head
    assert loaded.route(new[:5], top_experts=1)[0][0].expert == "new"
    loaded.remove_expert("new")
    np.testing.assert_allclose(loaded.gate_probs(xq), before, rtol=1e-5, atol=1e-6)  # its rows went with it


def test_add_linear_head__serves_the_product_of_the_two_calibrated_models() -> None:
    router = make_router("ip")
    xv = _queries(80)
    gold = np.repeat(np.arange(4), 20)
    z_gate = infer(router.gate, xv, "logits").astype(np.float64)
    facts = add_linear_head(router, (xv, gold), None, weight=0.5, seed=0)
    # The same regression fitted independently, each model calibrated on the same queries.
    fit = fit_linear(*training_rows(labelled_sample(router.experts, PER_EXPERT, 0)), 4, seed=0)
    z_lin = fit.logits(xv)
    t_gate, t_lin = fit_temperature(z_gate, gold), fit_temperature(z_lin, gold, low=1e-3, high=1e3)
    want = softmax(z_gate / t_gate + 0.5 * z_lin / t_lin)
    got = softmax(infer(router.gate, xv, "logits").astype(np.float64) / t_gate)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
    assert facts["linear/l2"] == fit.l2 and facts["linear/weight"] == 0.5


@pytest.mark.parametrize("bad", [-1.0, float("inf"), True])
def test_add_linear_head_bad_weight__raises_naming_the_setting(bad: object) -> None:
    router = make_router("ip")
    with pytest.raises(ValueError, match="linear_weight must be a finite number >= 0"):
        add_linear_head(router, (_queries(), np.zeros(40, dtype=np.int64)), None, weight=bad)


def test_train_with_linear_weight__checkpoint_has_a_linear_head_and_records_it(tmp_path: Path) -> None:
    cfg = compose_config("train", [*_train_overrides(tmp_path), "linear_weight=1.0"])
    result = train(cfg)
    assert result.router.gate.linear_head and result.metrics["linear/weight"] == 1.0
    loaded = Router.load(cfg.out)
    assert loaded.gate.linear_head and loaded.config["linear_weight"] == 1.0
    assert loaded.route("a question", top_experts=1)[0].expert in loaded.expert_names
    cfg = compose_config("train", [*_train_overrides(tmp_path / "off"), "linear_weight=0"])
    assert not train(cfg).router.gate.linear_head  # the default: no linear head


def test_train_ensemble_with_model_linear_head__raises_pointing_to_linear_weight(tmp_path: Path) -> None:
    overrides = [*_train_overrides(tmp_path), "model=ensemble", "model.members=2", "model.linear_head=true"]
    with pytest.raises(ValueError, match="set linear_weight > 0"):
        train(compose_config("train", overrides))


def test_fine_tune_of_a_linear_head_router__keeps_the_head_and_routes_the_new_expert() -> None:
    router = make_router("ip")
    stored, owner = labelled_sample(router.experts, PER_EXPERT, 0)
    fit = fit_linear(*training_rows((stored, owner)), 4, seed=0)
    router.set_gate(router.gate.with_linear(fit.W, fit.b, 1.0))
    assert float((router.gate_probs(stored).argmax(1) == owner).mean()) >= 0.95
    new = clusters(5, 40, DIM, seed=9, noise=0.3)[4] + 2.0
    router.add_expert("new", new[:30])
    fine_tune(router, ["new"], FineTuneConfig(steps=30, min_replay=100, keep_margin=None))
    assert router.gate.linear_head and router.gate.num_experts == 5
    hits = [h[0].expert for h in router.route(new[30:], top_experts=1)]
    assert hits.count("new") >= 9  # held-out rows of the new expert (10) reach it
    assert float((router.gate_probs(stored).argmax(1) == owner).mean()) >= 0.95  # the old experts' stays


def test_without_linear__keeps_the_mlp_and_prototype_logits_and_the_biases() -> None:
    torch.manual_seed(0)
    gate = Gate(DIM, 4, hidden_dims=[16], prototypes_per_expert=3).eval()
    gate.init_prototypes([torch.randn(3, DIM) for _ in range(4)])
    W, b = _linear(gate)
    x = torch.from_numpy(_queries())
    bare = gate.with_linear(W, b, 0.7).without_linear()
    assert bare.linear_head  # the same layout: a new regression goes into the same columns
    torch.testing.assert_close(bare(x).logits, gate(x).logits + 0.7 * b, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="this gate has no linear head"):
        gate.without_linear()


def _judged_linear_router() -> tuple[Router, np.ndarray, np.ndarray]:
    """make_router's 4 experts with a linear head fitted as training fits it and 80 judged queries kept."""
    router = make_router("ip")
    xv, gold = _queries(80), np.repeat(np.arange(4), 20)
    add_linear_head(router, (xv, gold), None, weight=1.0, seed=0)
    router.set_calibration(CalibrationSet(router.prepare(xv)[0], [router.expert_names[g] for g in gold]))
    return router, xv, gold


def test_fine_tune_of_a_linear_head_router_with_judged_queries__refits_the_head_over_every_expert() -> None:
    router, xv, gold = _judged_linear_router()
    stored, owner = labelled_sample(router.experts, PER_EXPERT, 0)
    new = clusters(5, 40, DIM, seed=9, noise=0.3)[4] + 2.0
    router.add_expert("new", new[:30])
    added = router.gate
    result = fine_tune(router, ["new"], FineTuneConfig(keep_margin=None))
    assert result.refit_linear and result.steps == 0 and result.recalibrated
    for (name, p), q in zip(added.body.named_parameters(), router.gate.body.parameters()):
        assert torch.equal(p, q), name  # no gradient step: the MLP is the one add_expert left
    # Oracle: the regression fitted independently over all 5 experts, at the scale that makes the
    # installed logits the product of the two models, each temperature-scaled on the judged queries.
    fit = fit_linear(*training_rows(labelled_sample(router.experts, PER_EXPERT, 0)), 5, seed=0)
    t_gate = fit_temperature(infer(added.without_linear(), xv, "logits").astype(np.float64), gold)
    t_lin = fit_temperature(fit.logits(xv), gold, low=1e-3, high=1e3)
    torch.testing.assert_close(router.gate.head.weight[:, -DIM:], fit.W * (t_gate / t_lin), rtol=1e-4, atol=1e-5)
    hits = [h[0].expert for h in router.route(new[30:], top_experts=1)]
    assert hits.count("new") >= 9  # held-out rows of the new expert (10) reach it
    assert float((router.gate_probs(stored).argmax(1) == owner).mean()) >= 0.95  # the old experts' stays


def test_fine_tune_with_refit_linear_off_or_without_judged_queries__takes_gradient_steps() -> None:
    router, _, _ = _judged_linear_router()
    router.add_expert("new", clusters(5, 40, DIM, seed=9, noise=0.3)[4][:30] + 2.0)
    result = fine_tune(router, ["new"], FineTuneConfig(steps=5, min_replay=100, keep_margin=None, refit_linear=False))
    assert not result.refit_linear and result.steps == 5
    bare = make_router("ip")
    bare.set_gate(bare.gate.with_linear(*_linear(bare.gate), 1.0))  # a head, but no judged queries to weigh it on
    result = fine_tune(bare, [], FineTuneConfig(steps=5, min_replay=100, keep_margin=None))
    assert not result.refit_linear and result.steps == 5


def test_refit_linear_head_without_a_head__raises_saying_what_it_needs() -> None:
    router = make_router("ip")
    with pytest.raises(ValueError, match="needs a router whose gate has a linear head"):
        refit_linear_head(router, (_queries(), np.zeros(40, dtype=np.int64)))


def test_fine_tune_after_merge_or_split_of_a_linear_head_router__refits_the_head_over_the_new_experts() -> None:
    from moe_router import lifecycle

    router = make_router("ip")
    xv = np.concatenate(clusters(4, 20, DIM, seed=0, noise=0.5))  # make_router's centres: queries of its experts
    gold = np.repeat(np.arange(4), 20)
    add_linear_head(router, (xv, gold), None, weight=1.0, seed=0)
    router.set_calibration(CalibrationSet(router.prepare(xv)[0], [router.expert_names[g] for g in gold]))
    stored, owner = labelled_sample(router.experts, PER_EXPERT, 0)
    merged = lifecycle.merge_experts(router, "expert0", "expert1").name
    assert set(router.calibration.experts) == {merged, "expert2", "expert3"}  # the judged queries follow the merge
    result = fine_tune(router, [merged], FineTuneConfig(keep_margin=None))
    assert result.refit_linear and result.steps == 0 and router.gate.num_experts == 3
    assert router.gate.head.weight.shape[0] == 3  # one row (linear term too) per current expert
    group = np.array([0, 0, 1, 2])[owner]  # stored rows' expert after the merge
    assert float((router.gate_probs(stored).argmax(1) == group).mean()) >= 0.95

    parts = [e.name for e in lifecycle.split_expert(router, "expert2")]
    result = fine_tune(router, parts, FineTuneConfig(keep_margin=None))
    assert result.refit_linear and router.gate.num_experts == 4
    top = np.array(router.expert_names)[router.gate_probs(stored).argmax(1)]
    want = np.array([merged, merged, "expert2", "expert3"])[owner]
    reached = [t in parts if w == "expert2" else t == w for t, w in zip(top, want, strict=True)]
    assert float(np.mean(reached)) >= 0.95  # the split expert's rows reach one of its parts, the others theirs


def test_fit_head_weight__leans_on_the_model_that_predicts_the_gold_experts() -> None:
    rng = np.random.default_rng(0)
    gold = rng.integers(0, 5, size=400)
    informative = 3.0 * np.eye(5)[gold] + rng.normal(size=(400, 5))
    noise = rng.normal(size=(400, 5))
    assert fit_head_weight(noise, informative, gold) == max(FIT_WEIGHTS)  # only the head knows: all weight on it
    assert fit_head_weight(informative, noise, gold) == min(FIT_WEIGHTS)  # only the gate knows: the least
    both = fit_head_weight(informative, 3.0 * np.eye(5)[gold] + rng.normal(size=(400, 5)), gold)
    assert min(FIT_WEIGHTS) < both < max(FIT_WEIGHTS)  # two equally good models: in between
    unknown = np.where(np.arange(400) < 100, -1, gold)  # queries without a gold expert are left out
    assert fit_head_weight(noise[100:], informative[100:], gold[100:]) == fit_head_weight(noise, informative, unknown)


@pytest.mark.parametrize("weight", ["fit", 2.0, None])
def test_fine_tune_linear_weight__installs_the_refitted_head_at_that_weight(weight: object) -> None:
    router, xv, gold = _judged_linear_router()
    router.add_expert("new", clusters(5, 40, DIM, seed=9, noise=0.3)[4][:30] + 2.0)
    added = router.gate
    result = fine_tune(router, ["new"], FineTuneConfig(keep_margin=None, linear_weight=weight))
    want = {"fit": None, 2.0: 2.0, None: 1.0}[weight]  # None: training's (make_router records none: 1)
    fit = fit_linear(*training_rows(labelled_sample(router.experts, PER_EXPERT, 0)), 5, seed=0)
    z_gate = infer(added.without_linear(), xv, "logits").astype(np.float64)
    t_gate, t_lin = fit_temperature(z_gate, gold), fit_temperature(fit.logits(xv), gold, low=1e-3, high=1e3)
    if want is None:
        want = fit_head_weight(z_gate / t_gate, fit.logits(xv) / t_lin, gold)
        assert want in FIT_WEIGHTS
    assert result.refit_linear and result.linear_weight == want
    torch.testing.assert_close(router.gate.head.weight[:, -DIM:], fit.W * (want * t_gate / t_lin), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("bad", ["auto", 0, -1.0, float("nan"), True])
def test_fine_tune_bad_linear_weight__raises_naming_the_setting_and_what_it_takes(bad: object) -> None:
    router, _, _ = _judged_linear_router()
    before = router.gate_probs(_queries())
    with pytest.raises(ValueError, match=r"FineTuneConfig.linear_weight: .*None \(training's\), 'fit' or a finite"):
        fine_tune(router, [], FineTuneConfig(linear_weight=bad))
    np.testing.assert_array_equal(router.gate_probs(_queries()), before)  # refused before anything changed
