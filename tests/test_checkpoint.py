"""Checkpoints: round trips (in process and in a fresh process), atomic replace, and clear errors on damage."""

from __future__ import annotations

import json
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from moe_router import CheckpointError, HashingEmbedder, Router
from moe_router.checkpoint.format import GATE_FILE, MANIFEST, STORE
from moe_router.routing.parts import Change
from tests.helpers import DIM, make_router, read_manifest, version_path, write_manifest


def _hits_as_dicts(hits: list[list]) -> list[list[dict]]:
    return [
        [
            {
                "id": h.id,
                "score": h.score,
                "expert": h.expert,
                "routing_score": h.routing_score,
                "text": h.text,
                "metadata": h.metadata,
                "specialization": h.specialization,
                "parent": h.parent,
            }
            for h in row
        ]
        for row in hits
    ]


def _routes_as_lists(routes: list[list]) -> list[list]:
    return [[[r.expert, r.probability, r.weight] for r in row] for row in routes]


@pytest.fixture
def saved(text_router: Router, tmp_path: Path) -> Path:
    text_router.set_parent("finance", "money")
    text_router.route(["a question about loan tax"] * 3, top_experts=2)  # some stats to carry over
    text_router.set_training_info({"seed": 0}, {"val/acc@1": 0.5})
    return text_router.save(tmp_path / "ckpt")


TEXT_QUERIES = ["a question about stock bond", "a question about comet orbit", "oven garlic and tax"]

# Loads the checkpoint in a new interpreter and prints what it routes and finds, as JSON.
FRESH_PROCESS = """
import json, sys
import numpy as np
from moe_router import Router
ckpt, xq_file, texts = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
router = Router.load(ckpt)
xq = np.load(xq_file)
def hits(rows):
    return [[{"id": h.id, "score": h.score, "expert": h.expert, "routing_score": h.routing_score, "text": h.text,
              "metadata": h.metadata, "specialization": h.specialization, "parent": h.parent} for h in row]
            for row in rows]
out = {
    "probs": router.gate_probs(router.prepare(xq)[0]).tolist(),
    "routes": [[[r.expert, r.probability, r.weight] for r in row] for row in router.route(texts, top_experts=3)],
    "hits": hits(router.search(xq, k=5, top_experts=2)),
    "text_hits": hits(router.search(texts, k=4, top_experts=1)),
}
print(json.dumps(out))
"""


def test_checkpoint_in_fresh_process__routes_and_searches_exactly_like_the_original(
    text_router: Router, saved: Path, tmp_path: Path
) -> None:
    xq = np.random.default_rng(7).normal(size=(6, 64)).astype(np.float32)
    np.save(tmp_path / "xq.npy", xq)
    proc = subprocess.run(
        [sys.executable, "-c", FRESH_PROCESS, str(saved), str(tmp_path / "xq.npy"), json.dumps(TEXT_QUERIES)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    fresh = json.loads(proc.stdout.strip().splitlines()[-1])
    # JSON round-trips Python floats exactly, so these comparisons are bit-for-bit.
    assert fresh["probs"] == text_router.gate_probs(text_router.prepare(xq)[0]).tolist()
    assert fresh["routes"] == _routes_as_lists(text_router.route(TEXT_QUERIES, top_experts=3))
    assert fresh["hits"] == _hits_as_dicts(text_router.search(xq, k=5, top_experts=2))
    text_hits = _hits_as_dicts(text_router.search(TEXT_QUERIES, k=4, top_experts=1))
    assert fresh["text_hits"] == text_hits
    assert all(h["text"] and h["metadata"]["domain"] == h["expert"] for row in text_hits for h in row)


def test_checkpoint_in_process__round_trips_everything(text_router: Router, saved: Path) -> None:
    loaded = Router.load(saved)
    assert (loaded.dim, loaded.metric, loaded.expert_names) == (
        text_router.dim,
        text_router.metric,
        text_router.expert_names,
    )
    assert loaded.expert("finance").parent == "money"
    assert loaded.embedder.spec() == text_router.embedder.spec()
    assert loaded.gate.config() == text_router.gate.config()
    for a, b in zip(loaded.experts, text_router.experts):
        np.testing.assert_array_equal(a.vectors(), b.vectors())
        np.testing.assert_array_equal(a.ids, b.ids)
    assert loaded.metrics == {"val/acc@1": 0.5} and loaded.config == {"seed": 0}
    assert _routes_as_lists(loaded.route(TEXT_QUERIES, top_experts=3)) == _routes_as_lists(
        text_router.route(TEXT_QUERIES, top_experts=3)
    )
    assert _hits_as_dicts(loaded.search(TEXT_QUERIES, k=6)) == _hits_as_dicts(text_router.search(TEXT_QUERIES, k=6))


def test_checkpoint__preserves_stats(text_router: Router, tmp_path: Path) -> None:
    text_router.route(TEXT_QUERIES * 4, top_experts=2)
    before = text_router.stats()
    after = Router.load(text_router.save(tmp_path / "ckpt")).stats()
    assert [(s.name, s.vectors, s.queries, s.load_share) for s in after] == [
        (s.name, s.vectors, s.queries, s.load_share) for s in before
    ]
    assert [s.mean_confidence for s in after] == pytest.approx([s.mean_confidence for s in before], rel=1e-12)


def test_checkpoint__router_without_gate_or_embedder_round_trips(tmp_path: Path) -> None:
    router = make_router("l2", gate=False)
    loaded = Router.load(router.save(tmp_path / "ckpt"))
    assert loaded.gate is None and loaded.embedder is None and loaded.metric == "l2"
    assert loaded.ntotal == router.ntotal
    assert loaded.parts().store.get([0])[0] == ("doc 0-0", {"expert": 0, "row": 0})


def test_loaded_router__new_ids_continue_after_stored_ones(saved: Path) -> None:
    loaded = Router.load(saved)
    new = loaded.add_expert("extra", np.ones((2, 64)))
    assert new.ids.tolist() == [45, 46]


def test_save_over_existing_checkpoint__replaces_it_atomically(text_router: Router, saved: Path) -> None:
    text_router.add_expert("gardening", texts=["a question about roses", "a question about tulips"])
    text_router.save(saved)
    assert Router.load(saved).expert_names == ["astronomy", "cooking", "finance", "gardening"]
    leftovers = [p.name for p in saved.parent.iterdir() if p.name.startswith(f".{saved.name}.")]
    assert leftovers == []  # no temporary or old copy left beside it


def _expert_files(ckpt: Path) -> dict[str, tuple[int, int]]:
    """Expert name -> (inode of its vectors file, inode of its ids file) in the current version."""
    v = version_path(ckpt)
    return {
        e["name"]: ((v / e["vectors"]).stat().st_ino, (v / e["ids"]).stat().st_ino)
        for e in read_manifest(ckpt)["experts"]
    }


def test_save_after_adding_an_expert__links_unchanged_experts_and_round_trips(saved: Path, tmp_path: Path) -> None:
    loaded = Router.load(saved)
    before = _expert_files(saved)
    loaded.add_expert("gardening", texts=["a question about roses", "a question about tulips"])
    loaded.save(saved)  # over itself
    after = _expert_files(saved)
    assert {n: after[n] for n in before} == before  # the same files, linked into the new checkpoint
    copy = loaded.save(tmp_path / "elsewhere")  # and into another directory
    assert {n: _expert_files(copy)[n] for n in before} == before
    for ckpt in (saved, copy):
        again = Router.load(ckpt)  # sha256-verified
        assert _hits_as_dicts(again.search(TEXT_QUERIES, k=6)) == _hits_as_dicts(loaded.search(TEXT_QUERIES, k=6))


def test_save__rewrites_an_expert_whose_rows_or_files_changed(saved: Path, tmp_path: Path) -> None:
    loaded = Router.load(saved)
    files = _expert_files(saved)
    cooking = loaded.expert("cooking")

    def fewer_rows(parts):  # rows changed in memory: a new expert without two of them
        i = parts.position("cooking")
        experts = (*parts.experts[:i], cooking.without_ids(cooking.ids[:2]), *parts.experts[i + 1 :])
        return Change(parts.replace(experts=experts))

    loaded.update(fewer_rows)
    finance = next(e for e in read_manifest(saved)["experts"] if e["name"] == "finance")
    _flip_bytes(version_path(saved) / finance["vectors"])  # damaged on disk after the load
    out = loaded.save(tmp_path / "next")
    now = _expert_files(out)
    assert now["astronomy"] == files["astronomy"]
    assert now["cooking"] != files["cooking"] and now["finance"][0] != files["finance"][0]
    again = Router.load(out)  # verified: the damaged file was written again from memory, not linked
    assert again.expert("cooking").ntotal == loaded.expert("cooking").ntotal
    for a, b in zip(again.experts, loaded.experts):
        np.testing.assert_array_equal(a.vectors(), b.vectors())
        np.testing.assert_array_equal(a.ids, b.ids)


def test_loaded_router_saved_over_itself__stays_usable(saved: Path) -> None:
    loaded = Router.load(saved)
    loaded.add_expert("gardening", texts=["a question about roses", "a question about tulips"])
    loaded.save(saved)
    hit = loaded.search("a question about roses", k=1, top_experts=4)[0]
    assert (hit.expert, hit.text) == ("gardening", "a question about roses")
    again = Router.load(saved).search("a question about roses", k=1, top_experts=4)[0]
    assert (again.id, again.text) == (hit.id, hit.text)


def test_save__refuses_to_replace_a_non_checkpoint_directory(text_router: Router, tmp_path: Path) -> None:
    target = tmp_path / "precious"
    target.mkdir()
    (target / "notes.txt").write_text("keep me")
    with pytest.raises(CheckpointError, match="refusing to save into .*not a moe_router checkpoint"):
        text_router.save(target)
    assert [p.name for p in target.iterdir()] == ["notes.txt"]
    assert (target / "notes.txt").read_text() == "keep me"
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".precious")) == []


def test_save__into_empty_existing_directory_works(text_router: Router, tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    assert Router.load(text_router.save(tmp_path / "empty")).ntotal == text_router.ntotal


# ---------------------------------------------------------------- damaged checkpoints


def _edit_manifest(path: Path, **changes: object) -> None:
    manifest = read_manifest(path)
    manifest.update(changes)
    write_manifest(path, manifest)


def _flip_bytes(file: Path, offset: int = -16, count: int = 8) -> None:
    data = bytearray(file.read_bytes())
    for i in range(offset, offset + count):
        data[i] ^= 0xFF
    file.write_bytes(bytes(data))


def test_load_missing_directory__raises_checkpoint_error(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="no checkpoint at"):
        Router.load(tmp_path / "nowhere")


def test_load_missing_manifest__raises_checkpoint_error(saved: Path) -> None:
    (version_path(saved) / MANIFEST).unlink()
    with pytest.raises(CheckpointError, match="manifest.json is missing"):
        Router.load(saved)


@pytest.mark.parametrize("content", ["{not json", "\xff\xfe", ""])
def test_load_corrupted_manifest_json__raises_checkpoint_error(saved: Path, content: str) -> None:
    (version_path(saved) / MANIFEST).write_bytes(content.encode("latin-1"))
    with pytest.raises(CheckpointError, match="manifest.json is corrupted .sha256 does not match CURRENT"):
        Router.load(saved)
    with pytest.raises(CheckpointError, match="not valid JSON"):
        Router.load(saved, verify=False)


def test_load_foreign_json_manifest__raises_checkpoint_error(saved: Path) -> None:
    write_manifest(saved, [1, 2, 3])
    with pytest.raises(CheckpointError, match="not a moe_router manifest"):
        Router.load(saved)


@pytest.mark.parametrize("version", [0, 1, 3, "2", None, True, 2.0])
def test_load_unsupported_format_version__raises_checkpoint_error(saved: Path, version: object) -> None:
    _edit_manifest(saved, format_version=version)
    with pytest.raises(CheckpointError, match="format_version"):
        Router.load(saved)


@pytest.mark.parametrize("key", ["dim", "metric", "experts", "files"])
def test_load_incomplete_manifest__raises_checkpoint_error(saved: Path, key: str) -> None:
    manifest = read_manifest(saved)
    del manifest[key]
    write_manifest(saved, manifest)
    with pytest.raises(CheckpointError, match=f"missing '{key}'"):
        Router.load(saved)


MALFORMED = [
    ("dim", "abc"),
    ("metric", "cosine"),
    ("experts", "oops"),
    ("experts", [5]),
    ("gate", "yes"),
    ("embedder", "hashing"),
    ("stats", []),
    ("stats", {"finance": [1, 2]}),
]


@pytest.mark.parametrize(
    "field, value, verify",
    [
        *((f, v, True) for f, v in MALFORMED),
        *((f, v, False) for f, v in MALFORMED),
        ("files", [], True),
        ("files", None, True),  # "files" is only read when verifying
    ],
)
def test_load_manifest_with_malformed_field__raises_checkpoint_error(
    saved: Path, field: str, value: object, verify: bool
) -> None:
    _edit_manifest(saved, **{field: value})
    with pytest.raises(CheckpointError):
        Router.load(saved, verify=verify)


def test_load_manifest_with_duplicate_expert_names__raises_checkpoint_error(saved: Path) -> None:
    manifest = read_manifest(saved)
    manifest["experts"][1] = {**manifest["experts"][1], "name": manifest["experts"][0]["name"]}
    write_manifest(saved, manifest)
    with pytest.raises(CheckpointError, match="duplicate expert name"):
        Router.load(saved)


@pytest.mark.parametrize("rel", ["experts/0001.npy", "experts/0001.ids.npy", GATE_FILE])
def test_load_flipped_bytes__raises_sha256_mismatch(saved: Path, rel: str) -> None:
    _flip_bytes(version_path(saved) / rel)
    with pytest.raises(CheckpointError, match=f"{rel} is corrupted .sha256 does not match"):
        Router.load(saved)


@pytest.mark.parametrize("rel", ["experts/0002.npy", "experts/0002.ids.npy"])
def test_load_truncated_npy_without_verify__raises_checkpoint_error(saved: Path, rel: str) -> None:
    file = version_path(saved) / rel
    file.write_bytes(file.read_bytes()[:-40])
    with pytest.raises(CheckpointError, match="sha256 does not match"):
        Router.load(saved)
    with pytest.raises(CheckpointError, match=rf"{rel} (is corrupted|has dtype)"):
        Router.load(saved, verify=False)


def test_load_missing_npy__raises_checkpoint_error(saved: Path) -> None:
    (version_path(saved) / "experts/0000.npy").unlink()
    with pytest.raises(CheckpointError, match="experts/0000.npy is missing"):
        Router.load(saved)
    with pytest.raises(CheckpointError, match="experts/0000.npy is missing"):
        Router.load(saved, verify=False)


def test_load_npy_of_wrong_shape__raises_checkpoint_error(saved: Path) -> None:
    np.save(version_path(saved) / "experts/0000.npy", np.zeros((20, 64), dtype=np.float32))
    with pytest.raises(CheckpointError, match=r"has dtype float32 and shape \(20, 64\), expected float32 \(15, 64\)"):
        Router.load(saved, verify=False)
    np.save(version_path(saved) / "experts/0000.npy", np.zeros((3, 64), dtype=np.float32))
    with pytest.raises(
        CheckpointError, match=r"0000.npy is corrupted \(the manifest says 15 rows; the file is too small"
    ):
        Router.load(saved, verify=False)


@pytest.mark.parametrize(
    "size, message", [(10**12, "the file is too small to hold them"), (-1, r"experts\[0\].size must be between 0 and")]
)
def test_load_hostile_expert_size__raises_checkpoint_error_without_allocating(
    saved: Path, size: int, message: str
) -> None:
    manifest = read_manifest(saved)
    manifest["experts"][0]["size"] = size
    write_manifest(saved, manifest)
    with pytest.raises(CheckpointError, match=message):
        Router.load(saved, verify=False)


@pytest.mark.parametrize("damage", ["truncate", "flip_header", "huge_header_length", "empty", "zeros"])
def test_load_corrupted_gate_without_verify__raises_checkpoint_error(saved: Path, damage: str) -> None:
    file = version_path(saved) / GATE_FILE
    data = file.read_bytes()
    file.write_bytes(
        {
            "truncate": data[: len(data) // 2],
            "flip_header": data[:8] + bytes(b ^ 0xFF for b in data[8:40]) + data[40:],
            "huge_header_length": b"\xff" * 8 + data[8:],
            "empty": b"",
            "zeros": bytes(len(data)),
        }[damage]
    )
    with pytest.raises(CheckpointError, match="gate.safetensors"):
        Router.load(saved, verify=False)


def test_load_gate_config_not_matching_weights__raises_checkpoint_error(saved: Path) -> None:
    manifest = read_manifest(saved)
    manifest["gate"]["config"]["hidden_dims"] = [8]
    write_manifest(saved, manifest)
    with pytest.raises(CheckpointError, match="gate weights do not fit the gate config"):
        Router.load(saved)


def test_load_gate_config_for_other_expert_count__raises_checkpoint_error(saved: Path) -> None:
    manifest = read_manifest(saved)
    manifest["gate"]["config"]["num_experts"] = 7
    write_manifest(saved, manifest)
    with pytest.raises(CheckpointError, match="does not match the checkpoint"):
        Router.load(saved)


@pytest.mark.parametrize("damage", ["garbage", "header", "truncate", "second_page"])
def test_load_corrupted_store__raises_checkpoint_error(saved: Path, damage: str) -> None:
    file = version_path(saved) / STORE
    data = file.read_bytes()
    file.write_bytes(
        {
            "garbage": b"not a database" * 100,
            "header": data[:100] + b"\xff" * 200 + data[300:],
            "truncate": data[: len(data) // 2],
            "second_page": data[:4096] + bytes(b ^ 0x5A for b in data[4096:8192]) + data[8192:],
        }[damage]
    )
    with pytest.raises(CheckpointError, match="store.sqlite is corrupted .sha256 does not match the manifest"):
        Router.load(saved)
    with pytest.raises(CheckpointError, match="store.sqlite is not a valid SQLite database"):
        Router.load(saved, verify=False)


def test_load_missing_store__raises_checkpoint_error(saved: Path) -> None:
    (version_path(saved) / STORE).unlink()
    with pytest.raises(CheckpointError, match="store.sqlite is missing"):
        Router.load(saved)


@pytest.mark.parametrize(
    "spec",
    [
        {"type": "os.system", "command": "touch pwned"},
        {"type": "builtins.eval"},
        {"type": "moe_router.embed.HashingEmbedder", "dim": 64},
        {"dim": 64},
        {"type": "hashing", "dim": 64, "__class__": "os.system"},
    ],
)
def test_load_unregistered_embedder__raises_without_running_code(saved: Path, spec: dict, tmp_path: Path) -> None:
    _edit_manifest(saved, embedder=spec)
    with pytest.raises(CheckpointError, match="embedder|unexpected keyword"):
        Router.load(saved)
    assert not (tmp_path / "cwd" / "pwned").exists()


class _Boom:
    """Unpickling this object would create a file: proof that the loader unpickled something."""

    def __init__(self, target: str) -> None:
        self.target = target

    def __reduce__(self):
        return (Path.touch, (Path(self.target),))


def test_load_pickled_files__are_refused_not_unpickled(saved: Path, tmp_path: Path) -> None:
    target = tmp_path / "unpickled"
    np.save(version_path(saved) / "experts/0000.npy", np.array([_Boom(str(target))], dtype=object), allow_pickle=True)
    with pytest.raises(CheckpointError, match="experts/0000.npy"):
        Router.load(saved, verify=False)
    (version_path(saved) / GATE_FILE).write_bytes(pickle.dumps({"head.weight": _Boom(str(target))}))
    with pytest.raises(CheckpointError):
        Router.load(saved, verify=False)
    assert not target.exists()


def test_load_embedder_of_other_dim__raises_checkpoint_error(saved: Path) -> None:
    _edit_manifest(saved, embedder=HashingEmbedder(dim=DIM).spec())
    with pytest.raises(CheckpointError, match="gives 32-d vectors"):
        Router.load(saved)


def test_load_with_cache_dir__wraps_embedder_in_cache(saved: Path, tmp_path: Path) -> None:
    loaded = Router.load(saved, cache_dir=tmp_path / "emb")
    loaded.route(TEXT_QUERIES)
    assert (tmp_path / "emb" / "embeddings.sqlite").is_file()
    assert loaded.embedder.misses == len(TEXT_QUERIES)
