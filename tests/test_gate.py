"""The gate: softmax top-k against torch.topk, the auxiliary losses, growing and shrinking the head."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from moe_router.gate.model import Gate, balance_loss, z_loss
from tests.helpers import clusters

D, E = 16, 5


@pytest.fixture
def gate() -> Gate:
    torch.manual_seed(0)
    return Gate(D, E, hidden_dims=[32], dropout=0.0, temperature=0.7, balance_coef=0.05, z_coef=0.002)


@pytest.fixture
def x() -> torch.Tensor:
    return torch.from_numpy(np.random.default_rng(0).normal(size=(64, D)).astype(np.float32))


@pytest.mark.parametrize("k", [1, 2, E])
def test_gate_top_k__equals_torch_topk_on_probs_renormalised(gate: Gate, x: torch.Tensor, k: int) -> None:
    out = gate.eval()(x, top_k=k)
    torch.testing.assert_close(out.probs, F.softmax(out.logits / 0.7, dim=-1))
    ref = torch.topk(out.probs, k, dim=-1)
    torch.testing.assert_close(out.top_indices, ref.indices, rtol=0, atol=0)
    torch.testing.assert_close(out.top_weights, ref.values / ref.values.sum(-1, keepdim=True))
    torch.testing.assert_close(out.top_weights.sum(-1), torch.ones(len(x)))
    assert out.top_indices.shape == out.top_weights.shape == (len(x), k)


def test_balance_loss__is_one_for_uniform_routing() -> None:
    probs = torch.full((8 * E, E), 1.0 / E)
    top1 = torch.arange(8 * E) % E  # each expert is top-1 for the same share
    assert balance_loss(probs, top1).item() == pytest.approx(1.0, abs=1e-6)


def test_balance_loss__is_num_experts_when_collapsed_on_one_expert() -> None:
    probs = F.one_hot(torch.full((12,), 3), E).float()
    assert balance_loss(probs, torch.full((12,), 3)).item() == pytest.approx(float(E), abs=1e-6)


def test_balance_loss__matches_hand_computation_between_extremes() -> None:
    probs = torch.tensor([[0.7, 0.2, 0.1], [0.6, 0.3, 0.1], [0.1, 0.8, 0.1], [0.5, 0.4, 0.1]])
    top1 = probs.argmax(-1)  # f = (3/4, 1/4, 0); P = mean probs = (0.475, 0.425, 0.1)
    expected = 3 * (0.75 * 0.475 + 0.25 * 0.425)
    assert balance_loss(probs, top1).item() == pytest.approx(expected, rel=1e-6)
    assert 1.0 < expected < 3.0


def test_z_loss__matches_hand_computation() -> None:
    logits = torch.tensor([[0.0, 0.0], [math.log(3.0), 0.0]])  # logsumexp: log 2, log 4
    assert z_loss(logits).item() == pytest.approx((math.log(2) ** 2 + math.log(4) ** 2) / 2, rel=1e-6)


def test_gate_aux_losses__are_zero_in_eval_mode(gate: Gate, x: torch.Tensor) -> None:
    out = gate.eval()(x, top_k=2)
    assert out.aux_loss.item() == out.balance_loss.item() == out.z_loss.item() == 0.0


def test_gate_aux_loss__is_weighted_sum_of_parts_in_train_mode(gate: Gate, x: torch.Tensor) -> None:
    out = gate.train()(x, top_k=2)
    torch.testing.assert_close(out.balance_loss, balance_loss(out.probs, out.top_indices[:, 0]))
    torch.testing.assert_close(out.z_loss, z_loss(out.logits))
    torch.testing.assert_close(out.aux_loss, 0.05 * out.balance_loss + 0.002 * out.z_loss)
    assert out.z_loss.item() > 0 and out.balance_loss.item() > 0
    out.aux_loss.backward()  # the aux loss trains the gate
    assert gate.head.weight.grad is not None and gate.head.weight.grad.abs().sum() > 0


def test_gate_noise__only_while_training(x: torch.Tensor) -> None:
    torch.manual_seed(0)
    gate = Gate(D, E, hidden_dims=[], dropout=0.0, noise_std=1.0)
    gate.eval()
    torch.testing.assert_close(gate(x).logits, gate(x).logits, rtol=0, atol=0)
    gate.train()
    assert not torch.allclose(gate(x).logits, gate(x).logits)


def test_gate__rejects_bad_input_shape_and_top_k(gate: Gate, x: torch.Tensor) -> None:
    with pytest.raises(ValueError, match=r"expects input of shape \(batch, 16\)"):
        gate(x[:, :-1])
    for k in (0, E + 1):
        with pytest.raises(ValueError, match="top_k must be between 1 and 5"):
            gate(x, top_k=k)


def _separated(num: int) -> list[torch.Tensor]:
    return [torch.from_numpy(c / np.linalg.norm(c, axis=1, keepdims=True)) for c in clusters(num, 60, D, seed=4)]


@pytest.mark.parametrize("hidden", [[32], []])
def test_gate_add_expert__grows_head_keeps_old_logits_and_routes_new_cluster(hidden: list[int]) -> None:
    torch.manual_seed(0)
    xs = _separated(E + 1)
    gate = Gate(D, E, hidden_dims=hidden, dropout=0.0).eval()
    gate.init_head_from_centroids(torch.stack([c.mean(0) for c in xs[:E]]))
    old_x = torch.cat(xs[:E])
    old_weight, old_bias, old_logits = gate.head.weight.clone(), gate.head.bias.clone(), gate(old_x).logits

    assert gate.add_expert(xs[E]) == E
    assert gate.num_experts == E + 1 and gate.head.weight.shape == (E + 1, gate.feature_dim)
    torch.testing.assert_close(gate.head.weight[:E], old_weight, rtol=0, atol=0)
    torch.testing.assert_close(gate.head.bias[:E], old_bias, rtol=0, atol=0)
    torch.testing.assert_close(gate(old_x).logits[:, :E], old_logits, rtol=0, atol=1e-5)
    new_top1 = gate(xs[E]).top_indices[:, 0]
    assert (new_top1 == E).float().mean().item() >= 0.3


def test_gate_add_expert_in_train_mode__uses_eval_features_and_restores_mode() -> None:
    torch.manual_seed(0)
    xs = _separated(3)
    gate = Gate(D, 2, hidden_dims=[32], dropout=0.5)
    reference = Gate(D, 2, hidden_dims=[32], dropout=0.5)
    reference.load_state_dict(gate.state_dict())
    gate.train()
    gate.add_expert(xs[2])
    reference.eval().add_expert(xs[2])
    assert gate.training
    torch.testing.assert_close(gate.head.weight, reference.head.weight, rtol=0, atol=0)  # dropout played no part
    torch.testing.assert_close(gate.head.bias, reference.head.bias, rtol=0, atol=0)


def test_gate_add_expert__rejects_empty_or_wrong_dim_vectors(gate: Gate) -> None:
    with pytest.raises(ValueError, match="add_expert needs vectors of shape"):
        gate.add_expert(torch.empty(0, D))
    with pytest.raises(ValueError, match="add_expert needs vectors of shape"):
        gate.add_expert(torch.ones(3, D + 1))
    assert gate.num_experts == E


def test_gate_remove_expert__drops_row_and_keeps_other_logits(gate: Gate, x: torch.Tensor) -> None:
    gate.eval()
    before = gate(x).logits
    gate.remove_expert(2)
    assert gate.num_experts == E - 1
    torch.testing.assert_close(gate(x).logits, before[:, [0, 1, 3, 4]], rtol=0, atol=1e-5)
    with pytest.raises(IndexError, match="out of range"):
        gate.remove_expert(E - 1)


def test_gate_remove_expert__refuses_to_remove_last_expert() -> None:
    with pytest.raises(ValueError, match="last expert"):
        Gate(D, 1).remove_expert(0)


def test_gate_config__rebuilds_an_identical_gate(gate: Gate, x: torch.Tensor) -> None:
    gate.eval()
    clone = Gate(**gate.config())
    clone.load_state_dict(gate.state_dict())
    torch.testing.assert_close(clone.eval()(x, top_k=2).probs, gate(x, top_k=2).probs, rtol=0, atol=0)
    assert float(clone.temperature) == pytest.approx(0.7)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"dim": 0, "num_experts": 3}, "Gate dim must be an integer >= 1"),
        ({"dim": 4, "num_experts": 0}, "Gate num_experts must be an integer >= 1"),
        ({"dim": 4, "num_experts": 3, "temperature": 0.0}, "temperature must be a finite number > 0"),
    ],
)
def test_gate__rejects_invalid_construction(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Gate(**kwargs)


# ---------------------------------------------------------------- ensembles assembled into one gate


def _members(prototypes: int) -> list[Gate]:
    out = []
    for seed in range(3):
        torch.manual_seed(seed)
        g = Gate(D, E, hidden_dims=[32], dropout=0.0, prototypes_per_expert=prototypes, max_prototypes=4096 // 3)
        if prototypes:
            g.init_prototypes([F.normalize(torch.randn(prototypes, D), dim=1) for _ in range(E)])
            with torch.no_grad():
                g.log_prototype_scale.fill_(math.log(10.0 + seed))
                g.head.weight.normal_()
        out.append(g.eval())
    return out


@pytest.mark.parametrize("prototypes", [0, 4])
def test_assemble__mlp_logits_are_the_mean_and_prototypes_their_union(prototypes: int, x: torch.Tensor) -> None:
    members = _members(prototypes)
    ens = Gate.assemble(members).eval()
    assert ens.members == 3 and ens.num_experts == E and ens.prototypes_per_expert == 3 * prototypes
    mean_mlp = torch.stack([g.head(g.body(x)) for g in members]).mean(0)
    torch.testing.assert_close(ens.head(ens.body(x)), mean_mlp, rtol=1e-5, atol=1e-5)
    if prototypes:
        union = torch.cat([g.prototypes for g in members])
        owner = torch.cat([g.prototype_owner for g in members])
        sim = (x @ union.T) * 11.0  # the mean of the scales 10, 11, 12
        expected = torch.stack([torch.logsumexp(sim[:, owner == e], dim=1) for e in range(E)], dim=1)
        torch.testing.assert_close(ens.prototype_logits(x), expected, rtol=1e-5, atol=1e-4)
    clone = Gate(**ens.config())  # rebuilt from its config, as a checkpoint load does
    clone.load_state_dict(ens.state_dict())
    torch.testing.assert_close(clone.eval()(x, top_k=2).probs, ens(x, top_k=2).probs, rtol=0, atol=0)


def test_assemble__an_ensemble_gate_grows_and_shrinks_like_any_gate(x: torch.Tensor) -> None:
    ens = Gate.assemble(_members(4)).eval()
    before = ens(x, top_k=1).logits
    ens.add_expert(torch.from_numpy(clusters(1, 20, D, seed=9)[0]))
    assert ens.num_experts == E + 1
    ens.remove_expert(E)
    torch.testing.assert_close(ens(x, top_k=1).logits, before, rtol=1e-5, atol=1e-5)


def test_assemble__refuses_mismatched_members() -> None:
    a, b = Gate(D, E, hidden_dims=[32]), Gate(D, E + 1, hidden_dims=[32])
    with pytest.raises(ValueError, match="same dim, experts, hidden layers"):
        Gate.assemble([a, b])
    with pytest.raises(ValueError, match="members must be an integer >= 1, got 0"):
        Gate(D, E, members=0)
