"""The layout holds: import contracts (lint-imports) and every config group composes and instantiates."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from tests.helpers import write_beir

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"


def test_import_contracts__are_kept() -> None:
    """Layers one way, no Lightning/Hydra in the core, no Lightning in evaluation (pyproject's [tool.importlinter])."""
    lint = Path(sys.executable).with_name("lint-imports")
    proc = subprocess.run([str(lint)], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert "0 broken" in proc.stdout


def test_core_import__loads_neither_lightning_nor_hydra() -> None:
    """Importing the library and loading/searching a router must not pull in the training or config frameworks."""
    code = (
        "import sys, moe_router, moe_router.lifecycle, moe_router.eval.intents, moe_router.eval.baselines; "
        "print(json.dumps(sorted(m for m in ('lightning', 'hydra', 'omegaconf') if m in sys.modules)))"
    )
    out = subprocess.run([sys.executable, "-c", "import json; " + code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == []


def groups(name: str) -> list[str]:
    return sorted(p.stem for p in (CONFIGS / name).glob("*.yaml"))


def compose_config(name: str, overrides: list[str]):
    with initialize_config_dir(str(CONFIGS), version_base="1.3"):
        return compose(name, overrides=overrides)


@pytest.mark.parametrize("data", groups("data"))
def test_every_data_config__instantiates(data: str, tmp_path: Path) -> None:
    extra = []
    if data == "jsonl":
        path = tmp_path / "d.jsonl"
        rows = [{"text": f"text {i}", "domain": "ab"[i % 2], "label": "x", "split": "train"} for i in range(20)]
        path.write_text("\n".join(json.dumps(r) for r in rows))
        extra = [f"data.path={path}"]
    if data == "synthetic":
        extra = ["data.vectors=200", "data.val=10", "data.test=10", "data.dim=16"]
    if data == "beir":
        extra = [f"data.root={write_beir(tmp_path / 'beir')}"]
    cfg = compose_config("train", [f"data={data}", f"datasets_dir={REPO.parent / 'shared' / 'datasets'}", *extra])
    dataset = instantiate(cfg.data)
    assert dataset.name == cfg.data.name


@pytest.mark.parametrize("model", groups("model"))
def test_every_model_config__instantiates_a_gate(model: str) -> None:
    cfg = compose_config("train", [f"model={model}"])
    gate = instantiate(cfg.model, dim=16, num_experts=3, members=1)
    assert gate.num_experts == 3 and gate.dim == 16
    module = instantiate(cfg.module)(gate=gate)
    assert module.gate is gate


@pytest.mark.parametrize("trainer", groups("trainer"))
def test_every_trainer_config__instantiates(trainer: str) -> None:
    cfg = compose_config("train", [f"trainer={trainer}"])
    assert instantiate(cfg.trainer).max_epochs == cfg.trainer.max_epochs


@pytest.mark.parametrize("embedder", groups("embedder"))
def test_every_embedder_config__instantiates(embedder: str) -> None:
    cfg = compose_config("train", [f"embedder={embedder}"])
    emb = instantiate(cfg.embedder)
    assert emb.dim > 0 and emb.spec()["type"] == embedder


def test_serve_and_experts_configs__instantiate_their_nodes() -> None:
    serve = compose_config("serve", ["ckpt=/nonexistent"])
    for node in ("batching", "limits", "auth"):
        assert instantiate(serve[node]) is not None
    experts = compose_config("experts", ["ckpt=/nonexistent"])
    assert instantiate(experts.fine_tune).steps == experts.fine_tune.steps
    assert instantiate(experts.rules).low_success == experts.rules.low_success
    evaluate = compose_config("eval", [])
    assert evaluate.out_dir is None  # the published reports/ are written only by benchmarks/quality.sh


def test_gate_config__is_its_constructor_signature_and_the_yaml_node() -> None:
    """One parameter list: Gate.config() is read off __init__, and configs/model/mlp.yaml names exactly those."""
    import inspect

    from moe_router.gate.model import Gate

    params = [p for p in inspect.signature(Gate.__init__).parameters if p != "self"]
    gate = Gate(8, 3, hidden_dims=(16,), temperature=2.0, prototypes_per_expert=2)
    assert list(gate.config()) == params
    assert Gate(**gate.config()).config() == gate.config()
    cfg = compose_config("train", ["model=mlp"])
    assert sorted(k for k in cfg.model if k != "_target_") == sorted(params)
