"""Training: the module's loss, routing pairs, fit_router, train_router, train/evaluate via the real Hydra configs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from functools import partial
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_dir
from lightning.pytorch.callbacks import ModelCheckpoint
from omegaconf import DictConfig

from moe_router import Gate, HashingEmbedder, Router
from moe_router.apps.evaluate import evaluate_checkpoint
from moe_router.apps.train import train
from moe_router.data.datasets import load_dataset
from moe_router.index.exact import exact_counts
from moe_router.metrics import accuracy_at_k, overlap_from_counts, top_experts
from moe_router.train.build import router_from_dataset
from moe_router.train.fit import fit_router
from moe_router.train.module import GateModule
from moe_router.train.pipeline import TrainConfig, train_router
from moe_router.train.targets import routing_pairs
from tests.helpers import CONFIGS, REPO, VOCAB, clusters, write_jsonl

E = 4


def compose_config(name: str, overrides: list[str]) -> DictConfig:
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        return compose(name, overrides=overrides)


def _train_overrides(root: Path) -> list[str]:
    """The real train.yaml, shrunk for a CPU test: hashing embedder, one batch, files under root."""
    return [
        "embedder=hashing",
        "+trainer.fast_dev_run=true",
        "trainer.accelerator=cpu",
        "trainer.enable_progress_bar=false",
        f"out={root}/ckpt",
        f"log_dir={root}/logs",
        f"cache_dir={root}/cache",
    ]


def _clustered_router(noise: float, per: int = 60, seed: int = 0) -> tuple[Router, list[np.ndarray]]:
    """E experts over noisy clusters, and held-out queries drawn from the same clusters."""
    xs = clusters(E, per + 20, 32, seed=seed, noise=noise)
    router = Router(32, "ip")
    for i, x in enumerate(xs):
        router.add_expert(f"c{i}", x[:per])
    return router, [x[per:] for x in xs]


def _cpu_trainer(root: Path, epochs: int) -> L.Trainer:
    return L.Trainer(
        max_epochs=epochs,
        accelerator="cpu",
        devices=1,
        deterministic=True,
        logger=False,
        default_root_dir=root,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[ModelCheckpoint(dirpath=root / "best", monitor="val/recall@10", mode="max")],
    )


# ---------------------------------------------------------------- module and pairs


@pytest.mark.filterwarnings("ignore:You are trying to `self.log\\(\\)`")
def test_gate_module_training_step__is_soft_cross_entropy_plus_aux_loss() -> None:
    torch.manual_seed(0)
    gate = Gate(8, 3, hidden_dims=[16], dropout=0.0)
    module = GateModule(gate, optimizer=torch.optim.SGD, top_k=5)
    assert module.top_k == 3  # clipped to the number of experts
    x = torch.randn(10, 8)
    target = torch.softmax(torch.randn(10, 3), dim=-1)
    loss = module.training_step((x, target), 0)
    torch.manual_seed(0)
    out = gate.train()(x, top_k=3)
    expected = -(target * F.log_softmax(out.logits, dim=-1)).sum(-1).mean() + out.aux_loss
    torch.testing.assert_close(loss, expected)


def test_routing_pairs__are_stored_vectors_with_their_expert_and_neighbour_counts() -> None:
    router, _ = _clustered_router(noise=1.5, per=30)
    x, owner, counts = routing_pairs(router, None, neighbours=10, seed=0)
    np.testing.assert_array_equal(x, np.concatenate([e.vectors() for e in router.experts]))
    np.testing.assert_array_equal(owner, np.repeat(np.arange(E), 30))
    assert counts.shape == (120, E) and (counts.sum(1) == 10).all()
    np.testing.assert_array_equal(counts, exact_counts(router.experts, x, 11) - np.eye(E)[owner])  # itself excluded


@pytest.mark.parametrize("per", [30, 2])  # 2 per expert: fewer stored vectors than neighbours
def test_routing_pairs_with_max_queries__equal_the_full_pairs_on_the_sampled_rows(per: int) -> None:
    router, _ = _clustered_router(noise=1.5, per=per)
    x_all, owner_all, counts_all = routing_pairs(router, None, neighbours=10, seed=0)
    sample = len(x_all) // 2
    x, owner, counts = routing_pairs(router, sample, neighbours=10, seed=3)
    rows = [int(np.flatnonzero((x_all == v).all(1))[0]) for v in x]
    assert len(set(rows)) == sample
    np.testing.assert_array_equal(owner, owner_all[rows])
    np.testing.assert_array_equal(counts, counts_all[rows])


# ---------------------------------------------------------------- fit_router


def test_fit_router__learns_to_route_held_out_queries_far_above_chance(tmp_path: Path) -> None:
    router, held_out = _clustered_router(noise=1.2)
    xq = np.concatenate(held_out)
    gold = np.repeat(np.arange(E), 20)
    result = fit_router(
        router,
        val_queries=xq,
        val_experts=[f"c{g}" for g in gold],
        targets="mix",
        trainer=_cpu_trainer(tmp_path, epochs=12),
        seed=0,
    )
    probs = router.gate_probs(router.prepare(xq)[0])
    acc = accuracy_at_k(probs, gold, 1)
    assert acc >= 0.8  # chance is 1/4
    # The reported metrics are the installed gate's, computed the way evaluation computes them.
    assert result.metrics["val/acc@1"] == pytest.approx(acc, abs=1e-6)
    counts = exact_counts(router.experts, router.prepare(xq)[0], 10)
    assert result.metrics["val/recall@10"] == pytest.approx(
        overlap_from_counts(top_experts(probs, 2), counts), abs=1e-6
    )
    assert result.epochs == 12 and result.seconds > 0
    assert not router.gate.training and router.gate.num_experts == E


def test_fit_router_default_trainer__leaves_working_directory_clean() -> None:
    router, _ = _clustered_router(noise=0.5, per=250)  # 1000 vectors: few epochs under the default trainer
    fit_router(router, seed=0)
    assert sorted(p.name for p in Path.cwd().iterdir()) == []  # the cwd is tmp_path/cwd (conftest)


def test_fit_router__rejects_bad_setups() -> None:
    one = Router(8, "ip")
    one.add_expert("only", np.eye(8))
    with pytest.raises(ValueError, match="at least 2 experts"):
        fit_router(one)
    router, held_out = _clustered_router(noise=0.5, per=10)
    with pytest.raises(ValueError, match="val_experts must name the gold expert"):
        fit_router(router, val_queries=held_out[0], val_experts=["c0"])
    wrong = GateModule(Gate(32, E + 1), optimizer=torch.optim.SGD)
    with pytest.raises(ValueError, match="the router needs dim 32 and 4"):
        fit_router(router, module=wrong)


# ---------------------------------------------------------------- train(cfg) and evaluate_checkpoint(cfg), real configs


@pytest.fixture(scope="module")
def jsonl_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """One fast_dev_run of train.yaml on a synthetic three-domain file: (dataset file, run dir)."""
    root = tmp_path_factory.mktemp("jsonl_run")
    data = write_jsonl(root / "three_domains.jsonl", seed=1)
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        mp.setenv("MOE_ROUTER_CACHE", str(root / "env_cache"))
        cfg = compose_config("train", [*_train_overrides(root), "data=jsonl", f"data.path={data}"])
        result = train(cfg)
    assert result.router.num_experts == 3 and result.router.ntotal == 36 and (root / "ckpt").is_dir()
    return data, root


def test_train_fast_dev_run_on_jsonl__writes_a_checkpoint_that_loads_and_routes(jsonl_run: tuple[Path, Path]) -> None:
    data, root = jsonl_run
    router = Router.load(root / "ckpt")
    assert router.expert_names == sorted(VOCAB) and router.ntotal == 36
    assert router.embedder.spec() == {"type": "hashing", "dim": 256, "seed": 0}
    routes = router.route(["a question about comet orbit", "a question about flour"], top_experts=2)
    assert all(len(r) == 2 and {s.expert for s in r} <= set(VOCAB) for r in routes)
    hits = router.search("a question about loan and tax", k=3, top_experts=3)
    assert hits[0].text is not None and hits[0].metadata["domain"] == hits[0].expert
    assert router.config["data"]["path"] == str(data)
    assert {"val/acc@1", "val/recall@10"} <= set(router.metrics)
    assert (root / "cache" / "embeddings.sqlite").is_file() and not (root / "env_cache").exists()


def test_evaluate_on_trained_checkpoint__reports_metrics_consistent_with_the_router(
    jsonl_run: tuple[Path, Path],
) -> None:
    data, root = jsonl_run
    cfg = compose_config(
        "eval",
        [
            "data=jsonl",
            f"data.path={data}",
            f"ckpt={root}/ckpt",
            f"cache_dir={root}/cache",
            f"report={root}/report.json",
            "experts_searched=[1,2,3]",
            "++out_dir=null",
        ],
    )
    report = evaluate_checkpoint(cfg)
    assert json.loads((root / "report.json").read_text()) == report
    for key in ("acc@1", "acc@2", "recall@10@1", "recall@10@2", "scanned@2"):
        assert isinstance(report[key], float) and 0.0 <= report[key] <= 1.0, key
    assert report["queries"] == 12 and report["experts"] == 3 and report["unknown_gold"] == 0

    router = Router.load(root / "ckpt")
    test_rows = [json.loads(line) for line in data.read_text().splitlines() if json.loads(line)["split"] == "test"]
    probs = router.gate_probs(router.prepare([r["text"] for r in test_rows])[0])
    gold = np.array([router.expert_indices([r["domain"]])[0] for r in test_rows])
    assert report["acc@1"] == pytest.approx(accuracy_at_k(probs, gold, 1))
    assert report["acc@2"] == pytest.approx(accuracy_at_k(probs, gold, 2))
    sizes = np.array([e.ntotal for e in router.experts])
    assert report["scanned@2"] == pytest.approx(sizes[top_experts(probs, 2)].sum(1).mean() / sizes.sum())
    assert report["recall@10@3"] == 1.0 and report["scanned@3"] == 1.0  # every expert searched = exhaustive
    assert report["recall@10@1"] <= report["recall@10@2"] <= 1.0


def test_evaluate_k_above_stored_vectors__raises_clear_error(jsonl_run: tuple[Path, Path]) -> None:
    data, root = jsonl_run
    cfg = compose_config("eval", ["data=jsonl", f"data.path={data}", f"ckpt={root}/ckpt", "k=50", "++out_dir=null"])
    with pytest.raises(ValueError, match=r"k must be between 1 and 36"):
        evaluate_checkpoint(cfg)


def test_train_fast_dev_run_on_default_demo_data__checkpoint_loads_and_routes(tmp_path: Path) -> None:
    cfg = compose_config("train", _train_overrides(tmp_path))
    assert cfg.data.name == "demo" and cfg.model.hidden_dims == [512]
    result = train(cfg)
    router = Router.load(cfg.out)
    assert router.num_experts == result.router.num_experts == 10 and router.ntotal == result.router.ntotal == 400
    route = router.route("How do I fix an auth bug?", top_experts=2)
    assert len(route) == 2 and route[0].probability >= route[1].probability
    assert router.config["embedder"]["_target_"] == "moe_router.embed.HashingEmbedder"


def test_train_without_validation_rows__raises_clear_error(tmp_path: Path) -> None:
    data = write_jsonl(tmp_path / "no_val.jsonl", val=0)
    cfg = compose_config(
        "train", [*_train_overrides(tmp_path), "data=jsonl", f"data.path={data}", "data.val_fraction=0"]
    )
    with pytest.raises(ValueError, match="no validation rows"):
        train(cfg)


# ---------------------------------------------------------------- learned sharding on the synthetic vector set

SYNTHETIC = ["data=synthetic", "data.vectors=3000", "data.dim=32", "data.sources=4", "data.val=200", "data.test=300"]


def test_train_and_evaluate_on_synthetic_vectors__kmeans_experts_and_a_full_report(tmp_path: Path) -> None:
    cfg = compose_config("train", [*_train_overrides(tmp_path), *SYNTHETIC, "partition=6"])
    train(cfg)
    router = Router.load(cfg.out)
    assert router.embedder is None and router.num_experts == 6 and router.ntotal == 3000
    assert router.expert_names == [f"shard_{i:02d}" for i in range(6)]
    ecfg = compose_config("eval", [*SYNTHETIC, f"ckpt={cfg.out}", f"out_dir={tmp_path}/report", "speed_batches=[100]"])
    report = evaluate_checkpoint(ecfg)
    assert report["dataset"] == "synthetic" and report["queries"] == 300 and report["experts"] == 6
    assert report["partition"] == 6
    assert report["unknown_gold"] == 0 and report["recall@10@1"] <= report["recall@10@2"] <= report["recall@10@4"]
    # gold of a k-means expert is the shard of the nearest centroid, so centroid routing is always right
    assert report["routers"]["centroid"]["acc@1"] == 1.0
    assert {"report.json", "table.md", "recall.png", "load.png", "reliability.png"} <= {
        p.name for p in (tmp_path / "report").iterdir()
    }


def test_synthetic_vectors_without_partition__raise_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"vectors without labels: set partition=N"):
        train(compose_config("train", [*_train_overrides(tmp_path), *SYNTHETIC]))
    train_cfg = compose_config(
        "train", [*_train_overrides(tmp_path), "data=jsonl", f"data.path={write_jsonl(tmp_path / 'd.jsonl')}"]
    )
    train(train_cfg)
    out = train_cfg.out
    with pytest.raises(
        ValueError, match=r"has no labels, so it can only evaluate a checkpoint whose experts are a k-means"
    ):
        evaluate_checkpoint(compose_config("eval", [*SYNTHETIC, "data.dim=256", f"ckpt={out}", "++out_dir=null"]))


def test_router_from_dataset_with_max_imbalance__caps_every_shard_and_keeps_every_vector() -> None:
    from moe_router.data.synthetic import synthetic_dataset

    data = synthetic_dataset(vectors=3000, dim=32, sources=4, val=10, test=10)
    plain = router_from_dataset(data, None, "ip", kmeans_experts=6)
    capped = router_from_dataset(data, None, "ip", kmeans_experts=6, max_imbalance=1.2)
    assert capped.ntotal == plain.ntotal == 3000 and capped.num_experts == 6
    assert max(e.ntotal for e in capped.experts) <= 600  # 1.2 x the mean of 500
    stored = np.concatenate([e.vectors() for e in capped.experts])
    assert np.allclose(np.sort(stored, axis=0), np.sort(data.vectors["train"], axis=0), atol=1e-6)
    with pytest.raises(ValueError, match=r"set partition=N"):
        router_from_dataset(data, None, "ip")


def test_evaluate_unknown_baseline__raises_clear_error_naming_it(jsonl_run: tuple[Path, Path]) -> None:
    data, root = jsonl_run
    cfg = compose_config(
        "eval",
        [
            "data=jsonl",
            f"data.path={data}",
            f"ckpt={root}/ckpt",
            f"cache_dir={root}/cache",
            "baselines=[centroid,bogus]",
            "++out_dir=null",
        ],
    )
    with pytest.raises(ValueError, match=r"unknown baseline\(s\) \['bogus'\]; expected some of \['centroid'"):
        evaluate_checkpoint(cfg)


def test_train_ensemble__assembles_members_into_one_gate_that_saves_loads_and_grows(tmp_path: Path) -> None:
    cfg = compose_config("train", [*_train_overrides(tmp_path), "model=ensemble", "model.members=2"])
    result = train(cfg)
    router = Router.load(cfg.out)
    assert router.gate.members == 2 and router.metrics["members"] == 2
    assert router.gate.prototypes_per_expert * router.num_experts <= 4096  # the members share one budget
    assert {"val/acc@1", "val/recall@10"} <= set(result.val_metrics)
    router.add_expert("extra", texts=["a question about gardening roses", "a question about tulips"])
    assert router.route("a question about tulips", top_experts=1)[0].expert == "extra"


# ---------------------------------------------------------------- train_router: the library call of scripts/train.py


@pytest.mark.slow  # scripts/train.py in a subprocess (torch + Lightning + Hydra start-up): about 15 s
def test_train_router_called_directly__equals_scripts_train_py_with_the_same_seed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ckpt = tmp_path / "script_ckpt"
    proc = subprocess.run(
        [
            sys.executable,
            "scripts/train.py",
            "embedder=hashing",
            "model=mlp",  # no prototypes: the untrained gate is a poor router, so trained epochs are what is compared
            "trainer.max_epochs=3",
            "trainer.accelerator=cpu",
            "trainer.enable_progress_bar=false",
            f"out={ckpt}",
            f"cache_dir={tmp_path}/cache",
            f"hydra.run.dir={tmp_path}/hydra",
        ],
        cwd=REPO,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    # configs/train.yaml's defaults written out by hand: the demo data, the mlp gate, the default trainer and module
    result = train_router(
        load_dataset(),
        HashingEmbedder(dim=256, seed=0),
        TrainConfig(),
        gate=Gate,
        trainer=partial(
            L.Trainer,
            accelerator="cpu",
            devices=1,
            max_epochs=3,
            deterministic=True,
            log_every_n_steps=20,
            enable_progress_bar=False,
            enable_model_summary=False,
        ),
        module=partial(GateModule, optimizer=partial(torch.optim.AdamW, lr=0.001, weight_decay=0.01)),
        log_dir=tmp_path / "logs",
    )
    script = Router.load(ckpt)
    assert not result.untrained_kept and result.epochs == 3
    assert {k: v for k, v in result.metrics.items() if k != "fit_seconds"} == {
        k: v for k, v in script.metrics.items() if k != "fit_seconds"
    }
    assert set(result.val_metrics) == {"val/acc@1", "val/recall@10"}
    direct, saved = result.router.gate.state_dict(), script.gate.state_dict()
    assert direct.keys() == saved.keys() and all(torch.equal(direct[k], saved[k]) for k in direct)
    assert (
        result.router.config["targets"]["neighbours"] == 10 and result.router.prior_weight == script.prior_weight == 0
    )


def test_train_with_other_neighbour_count__names_it_in_the_recall_key_and_the_monitor(tmp_path: Path) -> None:
    data = write_jsonl(tmp_path / "d.jsonl")
    shrunk = [o for o in _train_overrides(tmp_path) if "fast_dev_run" not in o]  # one real epoch: its CSV log is kept
    overrides = [*shrunk, "trainer.max_epochs=1", "data=jsonl", f"data.path={data}", "targets.neighbours=5"]
    result = train(compose_config("train", overrides))
    assert set(result.val_metrics) == {"val/acc@1", "val/recall@5"}
    assert {"val/acc@1", "val/recall@5"} <= set(Router.load(tmp_path / "ckpt").metrics)
    logged = (tmp_path / "logs" / "logs" / "version_0" / "metrics.csv").read_text().splitlines()[0].split(",")
    assert "val/recall@5" in logged and "val/recall@10" not in logged  # what the epoch is picked by
    with pytest.raises(ValueError, match="monitor must be 'auto', 'val/acc@1' or 'val/recall@5'"):
        train(compose_config("train", [*overrides, "monitor=val/recall@10"]))
