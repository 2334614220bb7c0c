"""Issue 17, the library and the checkpoint: a save never writes what a load refuses and never deletes
what it did not write; what the library accepts keeps its meaning; no state is dropped; hostile
checkpoints are refused before memory is spent. One test (or case) per class found by the adversarial pass."""

from __future__ import annotations

import hashlib
import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from moe_router import CheckpointError, Gate, Router
from moe_router.checkpoint.format import GATE_FILE, POINTER, VERSIONS
from moe_router.lifecycle import merge_experts, split_expert
from moe_router.routing.parts import Change
from moe_router.routing.stats import RoutingStats
from tests.helpers import DIM, make_router, read_manifest, version_path, write_manifest


def tree(path: Path) -> dict[str, str]:
    """Every file under `path` (relative name -> sha256): what a refused save must leave as it was."""
    return {
        str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(path.rglob("*"))
        if p.is_file()
    }


def state(router: Router) -> tuple:
    """What a refused call must leave unchanged (the parts a save writes)."""
    parts = router.parts()
    gate = {k: v.clone() for k, v in parts.gate.state_dict().items()} if parts.gate is not None else {}
    return (
        [(e.spec, e.ntotal) for e in parts.experts],
        sorted((k, tuple(v.shape), float(v.double().sum())) for k, v in gate.items()),
        parts.stats.counts.tolist(),
        parts.abstain_threshold,
        parts.prior_weight,
        len(parts.store.feedback()),
        parts.store.max_id(),
    )


# ---------------------------------------------------------------- 1. a save deletes only what it wrote


def test_save__into_a_directory_with_someone_elses_manifest__refuses_and_deletes_nothing(tmp_path: Path) -> None:
    app = tmp_path / "webapp"
    (app / "experts").mkdir(parents=True)
    (app / "manifest.json").write_text(json.dumps({"name": "my web app", "icons": []}))
    (app / "store.sqlite").write_bytes(b"not ours")
    (app / "experts" / "alice.txt").write_text("alice's notes")
    before = tree(app)
    with pytest.raises(CheckpointError, match="refusing to save into .*not a moe_router checkpoint"):
        make_router().save(app)
    assert tree(app) == before


def test_save__into_a_versions_folder_holding_other_files__refuses(tmp_path: Path) -> None:
    target = tmp_path / "ckpt"
    (target / VERSIONS).mkdir(parents=True)
    (target / VERSIONS / "README").write_text("mine")
    with pytest.raises(CheckpointError, match="refusing to save into"):
        make_router().save(target)
    assert tree(target) == {"versions/README": hashlib.sha256(b"mine").hexdigest()}


def test_save__after_a_first_save_killed_before_its_commit__resumes_and_cleans_its_leftovers(tmp_path: Path) -> None:
    target = tmp_path / "ckpt"
    (target / VERSIONS / ".tmp-000001-deadbeef" / "experts").mkdir(parents=True)
    (target / f".{POINTER}.tmp-0badf00d").write_text("{}")
    router = make_router()
    router.save(target)
    assert sorted(os.listdir(target)) == [POINTER, VERSIONS]
    assert sorted(os.listdir(target / VERSIONS)) == ["000001"]  # the unfinished one is gone
    assert Router.load(target).expert_names == router.expert_names


def test_save__removes_pointer_leftovers_of_a_killed_save(tmp_path: Path) -> None:
    router = make_router()
    router.save(tmp_path / "ckpt")
    (tmp_path / "ckpt" / f".{POINTER}.tmp-12345678").write_text("half a pointer")
    router.save(tmp_path / "ckpt")
    assert not [n for n in os.listdir(tmp_path / "ckpt") if n.startswith(f".{POINTER}.tmp-")]


def test_save__onto_a_regular_file_named_versions__names_what_it_is(tmp_path: Path) -> None:
    router = make_router()
    router.save(tmp_path / "ckpt")
    (tmp_path / "ckpt" / VERSIONS).rename(tmp_path / "elsewhere")
    (tmp_path / "ckpt" / VERSIONS).write_text("a file")
    with pytest.raises(CheckpointError, match="versions is a regular file, not a directory"):
        router.save(tmp_path / "ckpt")


# ---------------------------------------------------------------- 2./3. refused where it enters, never saved


def _merge_int_spec(r: Router) -> None:
    merge_experts(r, "expert0", "expert1", specialization=5)


REFUSED = [
    ("int specialization", lambda r: r.add_expert("x", np.ones((2, DIM)), specialization=2024), "specialization"),
    ("int parent", lambda r: r.add_expert("x", np.ones((2, DIM)), parent=3), "parent"),
    ("own parent on add", lambda r: r.add_expert("x", np.ones((2, DIM)), parent="x"), "its own parent"),
    ("own parent later", lambda r: r.set_parent("expert0", "expert0"), "its own parent"),
    ("int specialization on merge", _merge_int_spec, "specialization"),
    ("name '.'", lambda r: r.add_expert(".", np.ones((2, DIM))), "cannot be '.'"),
    ("name '..'", lambda r: r.add_expert("..", np.ones((2, DIM))), "cannot be '..'"),
    ("lone surrogate name", lambda r: r.add_expert("bad\ud800", np.ones((2, DIM))), "lone surrogate"),
    ("control character name", lambda r: r.add_expert("a\nb", np.ones((2, DIM))), "control characters"),
    ("threshold NaN", lambda r: setattr(r, "abstain_threshold", float("nan")), "abstain_threshold"),
    ("threshold inf", lambda r: setattr(r, "abstain_threshold", float("inf")), "abstain_threshold"),
    ("threshold str", lambda r: setattr(r, "abstain_threshold", "0.5"), "abstain_threshold"),
    ("prior weight negative", lambda r: setattr(r, "prior_weight", -1.0), "prior_weight"),
    ("prior weight NaN", lambda r: setattr(r, "prior_weight", float("nan")), "prior_weight"),
    ("boolean vectors", lambda r: r.add_expert("x", np.ones((2, DIM), dtype=bool)), "booleans"),
    ("boolean query", lambda r: r.search(np.ones(DIM, dtype=bool)), "booleans"),
    ("split names a str", lambda r: split_expert(r, "expert3", 2, names="xy"), "names must be a list"),
    ("split max_imbalance str", lambda r: split_expert(r, "expert3", 2, max_imbalance="x"), "max_imbalance"),
    ("per_expert 'no'", lambda r: r.search(np.ones(DIM), per_expert="no"), "per_expert must be True or False"),
    ("with_text 'no'", lambda r: r.search(np.ones(DIM), with_text="no"), "with_text must be True or False"),
    ("max_experts -5", lambda r: r.search(np.ones(DIM), top_p=0.5, max_experts=-5), "max_experts must be"),
    ("feedback positive 'no'", lambda r: r.record_feedback(np.ones(DIM), "expert0", "no"), "positive must be"),
    ("abstain without a threshold", lambda r: r.search(np.ones((3, DIM)), abstain=True), "abstain_threshold"),
]


@pytest.mark.parametrize("call, field", [c[1:] for c in REFUSED], ids=[c[0] for c in REFUSED])
def test_value_a_load_would_refuse__is_refused_where_it_enters_and_changes_nothing(
    tmp_path: Path, call, field: str
) -> None:
    router = make_router()
    before = state(router)
    with pytest.raises(ValueError, match=field):
        call(router)
    assert state(router) == before  # refused whole: nothing counted, added or changed
    router.save(tmp_path / "ckpt")
    assert state(Router.load(tmp_path / "ckpt")) == before


def test_save__checks_the_manifest_with_the_readers_schema_and_commits_nothing_it_refuses(tmp_path: Path) -> None:
    router = make_router()
    router.save(tmp_path / "ckpt")
    before = tree(tmp_path / "ckpt")
    nan_stats = RoutingStats(np.array([1, 0, 0, 0]), np.array([float("nan"), 0.0, 0.0, 0.0]))
    router.update(lambda parts: Change(parts.replace(stats=nan_stats)))  # what a NaN-routing gate once recorded
    with pytest.raises(CheckpointError, match="JSON cannot store"):
        router.save(tmp_path / "ckpt")
    assert tree(tmp_path / "ckpt") == before  # CURRENT still names the last good version
    Router.load(tmp_path / "ckpt")


@pytest.mark.parametrize("temperature", [0.0, -1.0, float("nan"), float("inf")])
def test_gate_temperature__must_be_finite_and_positive(temperature: float) -> None:
    with pytest.raises(ValueError, match="temperature must be a finite number > 0"):
        Gate(DIM, 3, temperature=temperature)
    with pytest.raises(ValueError, match="temperature must be a finite number > 0"):
        Gate(DIM, 3).set_temperature(temperature)


def _rewrite_gate(ckpt: Path, edit) -> None:
    """Change the current version's gate weights and re-point the manifest at their sha256."""
    path = version_path(ckpt) / GATE_FILE
    state = load_safetensors(path.read_bytes())
    edit(state)
    data = save_safetensors(state)
    path.write_bytes(data)
    manifest = read_manifest(ckpt)
    manifest["files"][GATE_FILE] = hashlib.sha256(data).hexdigest()
    write_manifest(ckpt, manifest)


def test_load__a_gate_with_temperature_0__is_refused_not_routed_on_nan(tmp_path: Path) -> None:
    make_router().save(tmp_path / "ckpt")
    _rewrite_gate(tmp_path / "ckpt", lambda s: s["temperature"].fill_(0.0))
    with pytest.raises(CheckpointError, match=r"the gate cannot route \(temperature is 0.0"):
        Router.load(tmp_path / "ckpt")


def test_set_gate__refuses_a_gate_that_cannot_route() -> None:
    router = make_router()
    broken = Gate(DIM, router.num_experts)
    with torch.no_grad():
        broken.temperature.fill_(0.0)
    with pytest.raises(ValueError, match="cannot route: temperature is 0.0"):
        router.set_gate(broken)


# ---------------------------------------------------------------- 4. no state dropped


def test_plain_save_after_load__keeps_config_and_metrics(tmp_path: Path) -> None:
    router = make_router()
    router.set_training_info({"partition": 16, "seed": 3}, {"val/acc@1": 0.9})
    router.save(tmp_path / "a")
    loaded = Router.load(tmp_path / "a")
    loaded.save(tmp_path / "a")
    again = Router.load(tmp_path / "a")
    assert again.config == {"partition": 16, "seed": 3} and again.metrics == {"val/acc@1": 0.9}


def test_counts_recorded_while_a_change_is_planned__are_kept() -> None:
    router = make_router()
    xq = np.ones((5, DIM), np.float32)

    def plan(parts):
        router.search(xq, k=2, top_experts=1)  # a search running while the change is planned
        return Change(parts.replace(prior_weight=0.5))

    router.update(plan)
    assert int(router.parts().stats.counts.sum()) == 5 and router.prior_weight == 0.5


# ---------------------------------------------------------------- 6. hostile checkpoints, before memory is spent

MEMORY_PROBE = """
import sys
from moe_router import Router, CheckpointError

def peak_mb():  # VmHWM: this process's own peak; ru_maxrss would carry the parent's (pytest's) across exec
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) // 1024

before = peak_mb()
try:
    Router.load(sys.argv[1], verify=sys.argv[2] == "1")
    print("loaded")
except CheckpointError as exc:
    print("refused:", exc)
print("grown_mb", peak_mb() - before)
"""


def _probe(ckpt: Path, verify: bool) -> tuple[str, int]:
    """Load in a fresh process: the outcome, and how far its peak memory grew during the load (MB).

    The growth is asserted, not the peak: what importing torch costs differs by machine."""
    out = subprocess.run(
        [sys.executable, "-c", MEMORY_PROBE, str(ckpt), "1" if verify else "0"],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    ).stdout
    lines = out.strip().splitlines()
    return lines[0], int(lines[-1].split()[-1])


def test_forged_gate_config__is_refused_before_its_layers_are_allocated(tmp_path: Path) -> None:
    make_router().save(tmp_path / "ckpt")
    manifest = read_manifest(tmp_path / "ckpt")
    manifest["gate"]["config"]["hidden_dims"] = [20000, 20000]  # 1.7 GB of weights the file does not hold
    write_manifest(tmp_path / "ckpt", manifest)
    outcome, rss_mb = _probe(tmp_path / "ckpt", verify=True)
    assert outcome.startswith("refused:") and "do not fit the gate config" in outcome
    assert rss_mb < 400, f"grew {rss_mb} MB during the load: the forged layers were allocated"


def test_sparse_expert_files__are_refused_before_they_are_read(tmp_path: Path) -> None:
    make_router().save(tmp_path / "ckpt")
    manifest = read_manifest(tmp_path / "ckpt")
    rows = 10_000_000  # 1.3 GB of float32 rows at d = 32, 80 MB of ids: holes on disk
    entry = manifest["experts"][0]
    for rel, row_bytes, dtype, shape in (
        (entry["ids"], 8, "<i8", (rows,)),
        (entry["vectors"], 4 * DIM, "<f4", (rows, DIM)),
    ):
        path = version_path(tmp_path / "ckpt") / rel
        with open(path, "wb") as f:
            np.lib.format.write_array_header_1_0(f, {"descr": dtype, "fortran_order": False, "shape": shape})
            f.truncate(f.tell() + rows * row_bytes)
    entry["size"] = rows
    write_manifest(tmp_path / "ckpt", manifest)
    for verify in (True, False):
        outcome, rss_mb = _probe(tmp_path / "ckpt", verify)
        assert outcome.startswith("refused:") and "sparse file" in outcome, outcome
        assert rss_mb < 400, f"grew {rss_mb} MB during the load: spent on a sparse file"


# ---------------------------------------------------------------- 7. sharing


def test_every_file_of_a_checkpoint__follows_the_umask(tmp_path: Path) -> None:
    old = os.umask(0o022)
    try:
        make_router().save(tmp_path / "ckpt")
    finally:
        os.umask(old)
    modes = {
        str(p.relative_to(tmp_path / "ckpt")): stat.S_IMODE(p.stat().st_mode)
        for p in (tmp_path / "ckpt").rglob("*")
        if p.is_file()
    }
    assert modes and all(m == 0o644 for m in modes.values()), modes
