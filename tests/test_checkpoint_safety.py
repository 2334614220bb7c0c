"""Checkpoint safety (issue 10): loads never write, saves switch versions atomically, hostile files, strict manifest.

Each test states a rule; most failed on format 1 (flat directory, renamed into place, store opened in place).
"""

from __future__ import annotations

import builtins
import hashlib
import json
import os
import shutil
import sqlite3
import stat
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

from moe_router import CheckpointError, Router
from moe_router.checkpoint import io as ckpt_io
from moe_router.checkpoint.format import MANIFEST, POINTER, STORE, VERSIONS
from moe_router.checkpoint.io import KEEP_VERSIONS
from moe_router.lifecycle.merge_split import merge_experts, split_expert
from tests.helpers import REPO, read_manifest, version_path, write_manifest


def tree_digest(path: Path) -> dict[str, str]:
    """Every entry under `path`: a file's sha256, a link's target, or the kind of anything else."""
    out = {}
    for p in sorted(path.rglob("*")):
        st = os.lstat(p)
        rel = str(p.relative_to(path))
        if stat.S_ISLNK(st.st_mode):
            out[rel] = "link -> " + os.readlink(p)
        elif stat.S_ISREG(st.st_mode):
            out[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
        else:
            out[rel] = "dir" if stat.S_ISDIR(st.st_mode) else oct(st.st_mode)
    return out


def hits(router: Router, queries: list[str]) -> list:
    return [[(h.id, h.expert, h.text, h.metadata) for h in row] for row in router.search(queries, k=5, top_experts=2)]


QUERIES = ["a question about stock bond", "a question about comet orbit", "oven garlic and tax"]


@pytest.fixture
def ckpt(text_router: Router, tmp_path: Path) -> Path:
    text_router.record_feedback("a question about loan", "finance", True)
    return text_router.save(tmp_path / "ckpt")


# ---------------------------------------------------------------- 1. nothing changes on disk before save()


@pytest.mark.parametrize("change", ["remove", "add", "merge", "split", "feedback", "move_rows"])
def test_loaded_router__changes_nothing_on_disk_until_saved(ckpt: Path, change: str) -> None:
    before = tree_digest(ckpt)
    loaded = Router.load(ckpt)
    {
        "remove": lambda: loaded.remove_expert("cooking"),
        "add": lambda: loaded.add_expert("gardening", texts=["a question about roses", "tulips and soil"]),
        "merge": lambda: merge_experts(loaded, "cooking", "finance", "home"),
        "split": lambda: split_expert(loaded, "astronomy", 2),
        "feedback": lambda: loaded.record_feedback("a question about comet", "astronomy", False),
        "move_rows": lambda: loaded.parts().store.apply_changes([(loaded.expert("finance").ids[:3], "cooking")]),
    }[change]()
    assert tree_digest(ckpt) == before  # format 1: store.sqlite changed at once (texts deleted, rows added)
    again = Router.load(ckpt)
    assert again.expert_names == ["astronomy", "cooking", "finance"]
    assert all(h[2] is not None for row in hits(again, QUERIES) for h in row)  # every hit keeps its text
    assert len(again.parts().store.feedback()) == 1


def test_save_same_path__is_how_a_change_reaches_the_checkpoint(ckpt: Path) -> None:
    loaded = Router.load(ckpt)
    loaded.remove_expert("cooking")
    loaded.record_feedback("a question about comet", "astronomy", False)
    loaded.save(ckpt)
    again = Router.load(ckpt)
    assert again.expert_names == ["astronomy", "finance"]
    assert [(r.expert, r.positive) for r in again.parts().store.feedback()] == [("finance", True), ("astronomy", False)]
    assert hits(again, QUERIES) == hits(loaded, QUERIES)


def test_store_edited_on_disk__fails_its_sha256(ckpt: Path) -> None:
    store = version_path(ckpt) / STORE
    with sqlite3.connect(str(store)) as conn:  # a valid database, its rows changed: only a checksum sees it
        conn.execute("UPDATE items SET text = NULL")
    with pytest.raises(CheckpointError, match=r"store.sqlite is corrupted \(sha256 does not match the manifest\)"):
        Router.load(ckpt)


# ---------------------------------------------------------------- 2. loading is read-only; versions switch atomically


WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND


def test_load__performs_no_write(ckpt: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Root ignores permissions, so this proves read-only loading by refusing every call that could write."""
    calls: list[str] = []

    def refuse(name):
        def call(*args, **kwargs):
            calls.append(f"{name}{args[:2]}")
            raise AssertionError(f"load called {name}{args[:2]}")

        return call

    for name in (
        "rename",
        "replace",
        "unlink",
        "remove",
        "rmdir",
        "mkdir",
        "makedirs",
        "link",
        "symlink",
        "truncate",
        "chmod",
        "utime",
        "mkfifo",
    ):
        monkeypatch.setattr(os, name, refuse(f"os.{name}"))
    monkeypatch.setattr(shutil, "rmtree", refuse("shutil.rmtree"))
    monkeypatch.setattr(
        sqlite3,
        "connect",
        lambda db, *a, **k: sqlite3.Connection(db, *a, **k) if db == ":memory:" else refuse("sqlite3.connect")(db),
    )
    real_open, real_os_open = builtins.open, os.open

    def guarded_open(file, mode="r", *args, **kwargs):
        if any(c in mode for c in "wax+"):
            refuse("open")(file, mode)
        return real_open(file, mode, *args, **kwargs)

    def guarded_os_open(path, flags, *args, **kwargs):
        if flags & WRITE_FLAGS:
            refuse("os.open")(path, flags)
        return real_os_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", guarded_open)
    monkeypatch.setattr(os, "open", guarded_os_open)
    loaded = Router.load(ckpt)
    result = hits(loaded, QUERIES)
    monkeypatch.undo()
    assert calls == [] and result == hits(Router.load(ckpt), QUERIES)


READ_ONLY_LOAD = """
import json, os, sys
from moe_router import Router
queries = json.loads(sys.argv[3])
# The same load and search once before the switch, so every module they import lazily is loaded
# while this process may still read the interpreter's files (a virtualenv in root's 0700 home is
# not readable by nobody); after it, only the read-only checkpoint is read.
Router.load(sys.argv[1]).search(queries, k=5, top_experts=2)
if os.geteuid() == 0:
    os.setgid(65534); os.setuid(65534)  # nobody: permissions apply
router = Router.load(sys.argv[2])
hits = router.search(queries, k=5, top_experts=2)
print(json.dumps([[[h.id, h.expert, h.text] for h in row] for row in hits]))
"""


def test_load__on_read_only_storage_serves_reads(ckpt: Path, tmp_path: Path) -> None:
    ro = Path(f"/tmp/moe_ro_{os.getpid()}_{tmp_path.name}")  # outside pytest's 0700 tmp, so `nobody` can reach it
    shutil.copytree(ckpt, ro / "ckpt")
    try:
        subprocess.run(["chmod", "-R", "a-w,a+rX", str(ro)], check=True)
        proc = subprocess.run(
            [sys.executable, "-c", READ_ONLY_LOAD, str(ckpt), str(ro / "ckpt"), json.dumps(QUERIES)],
            capture_output=True,
            text=True,
            timeout=120,
            cwd="/",
            env={**os.environ, "PYTHONPATH": str(REPO)},
        )
        assert proc.returncode == 0, proc.stderr[-2000:]
        expected = [[[h[0], h[1], h[2]] for h in row] for row in hits(Router.load(ckpt), QUERIES)]
        assert json.loads(proc.stdout) == expected
        assert tree_digest(ro / "ckpt") == tree_digest(ckpt)
    finally:
        subprocess.run(["chmod", "-R", "u+w", str(ro)], check=False)
        shutil.rmtree(ro, ignore_errors=True)


def test_save__switches_the_pointer_atomically_and_keeps_the_last_versions(text_router: Router, tmp_path: Path) -> None:
    path = tmp_path / "ckpt"
    for i in range(5):
        text_router.abstain_threshold = 0.1 * i  # a change a reader can see
        text_router.save(path)
    assert json.loads((path / POINTER).read_text())["version"] == 5
    assert sorted(os.listdir(path / VERSIONS)) == [f"{n:06d}" for n in range(6 - KEEP_VERSIONS, 6)]
    assert sorted(os.listdir(path)) == [POINTER, VERSIONS]
    assert Router.load(path).abstain_threshold == pytest.approx(0.4)
    # unchanged experts are the same files (hard links) in every kept version
    inodes = {os.stat(path / VERSIONS / v / "experts/0000.npy").st_ino for v in os.listdir(path / VERSIONS)}
    assert len(inodes) == 1


@pytest.mark.parametrize("fail_at", ["replace", "rename", "store"])
def test_save_interrupted__leaves_the_previous_version_current_and_nothing_behind(
    ckpt: Path, text_router: Router, monkeypatch: pytest.MonkeyPatch, fail_at: str
) -> None:
    before = tree_digest(ckpt)
    boom = OSError(28, "No space left on device")
    target = {
        "replace": (os, "replace"),
        "rename": (os, "rename"),
        "store": (type(text_router.parts().store), "image"),
    }[fail_at]
    monkeypatch.setattr(*target, lambda *a, **k: (_ for _ in ()).throw(boom))
    text_router.remove_expert("cooking")
    with pytest.raises(OSError, match="No space left"):
        text_router.save(ckpt)
    monkeypatch.undo()
    assert tree_digest(ckpt) == before
    assert Router.load(ckpt).expert_names == ["astronomy", "cooking", "finance"]


def test_load__while_saves_collect_its_version__reads_the_new_one_whole(
    ckpt: Path, text_router: Router, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A reader between the pointer and its files when KEEP_VERSIONS saves land: it starts again, never fails."""
    real = ckpt_io._read_store
    saves = []

    def saves_meanwhile(path, pre, digests):
        if not saves:
            for i in range(KEEP_VERSIONS):
                text_router.abstain_threshold = 0.5 + i
                text_router.save(ckpt)
                saves.append(i)
        return real(path, pre, digests)

    monkeypatch.setattr(ckpt_io, "_read_store", saves_meanwhile)
    loaded = Router.load(ckpt)
    assert len(saves) == KEEP_VERSIONS and loaded.abstain_threshold == 0.5 + KEEP_VERSIONS - 1
    assert read_manifest(ckpt)["abstain_threshold"] == loaded.abstain_threshold


# ---------------------------------------------------------------- 3. hostile files


def _expert_file(ckpt: Path, i: int = 0, kind: str = "vectors") -> Path:
    return version_path(ckpt) / read_manifest(ckpt)["experts"][i][kind]


def _load_in_thread(ckpt: Path, timeout: float = 20.0) -> BaseException | None:
    """Router.load in a thread: the error it raised (None if it loaded); fails the test if it hangs."""
    out: list = []

    def go() -> None:
        try:
            Router.load(ckpt)
            out.append(None)
        except BaseException as exc:  # noqa: BLE001 - handed to the test to judge
            out.append(exc)

    t = threading.Thread(target=go, daemon=True)
    t.start()
    t.join(timeout)
    if t.is_alive():
        # unblock the FIFO so the thread can end, then fail
        pytest.fail(f"Router.load hung for {timeout} s")
    return out[0]


def test_fifo_in_place_of_an_expert_file__is_a_checkpoint_error_not_a_hang(ckpt: Path) -> None:
    target = _expert_file(ckpt)
    target.unlink()
    os.mkfifo(target)
    exc = _load_in_thread(ckpt)
    assert isinstance(exc, CheckpointError) and "experts/0000.npy is a FIFO (named pipe), not a regular file" in str(
        exc
    )


def test_cli_stats__on_a_fifo_exits_2_not_hangs(ckpt: Path) -> None:
    store = version_path(ckpt) / STORE
    store.unlink()
    os.mkfifo(store)
    proc = subprocess.run(
        [sys.executable, "-m", "moe_router.cli", "stats", "--ckpt", str(ckpt)],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert proc.returncode == 2 and "store.sqlite is a FIFO" in proc.stderr


@pytest.mark.parametrize("where", ["inside", "outside"])
@pytest.mark.parametrize("what", ["vectors", "ids"])
def test_symlinked_expert_file__is_refused_even_when_its_bytes_verify(
    ckpt: Path, tmp_path: Path, where: str, what: str
) -> None:
    target = _expert_file(ckpt, 0, what)
    real = (version_path(ckpt) / f"real.{target.name}") if where == "inside" else (tmp_path / f"outside.{target.name}")
    os.rename(target, real)
    os.symlink(real, target)  # same bytes: format 1 verified and linked them into the next save
    exc = _load_in_thread(ckpt)
    assert isinstance(exc, CheckpointError) and f"{target.name} is a symbolic link, not a regular file" in str(exc)


@pytest.mark.parametrize("name", [STORE, MANIFEST, "experts"])
def test_symlinked_store_manifest_or_directory__is_refused_and_nothing_is_written_outside(
    ckpt: Path, tmp_path: Path, name: str
) -> None:
    inside = version_path(ckpt) / name
    outside = tmp_path / "elsewhere" / name
    outside.parent.mkdir()
    os.rename(inside, outside)
    os.symlink(outside, inside)
    before = tree_digest(outside.parent)
    exc = _load_in_thread(ckpt)
    assert isinstance(exc, CheckpointError) and f"{name} is a symbolic link" in str(exc)
    assert tree_digest(outside.parent) == before  # format 1 opened a linked store in WAL mode: -wal, -shm outside


def test_symlinked_pointer_or_versions__are_refused_by_load_and_save(
    ckpt: Path, text_router: Router, tmp_path: Path
) -> None:
    elsewhere = tmp_path / "elsewhere"
    os.rename(ckpt / VERSIONS, elsewhere)
    os.symlink(elsewhere, ckpt / VERSIONS)
    assert "versions is a symbolic link" in str(_load_in_thread(ckpt))
    before = tree_digest(elsewhere)
    with pytest.raises(CheckpointError, match="versions is a symbolic link, not a directory"):
        text_router.save(ckpt)
    assert tree_digest(elsewhere) == before  # the save wrote nothing through the link


def test_save_onto_a_file__is_a_clear_error(text_router: Router, tmp_path: Path) -> None:
    (tmp_path / "file").write_text("keep")
    with pytest.raises(ValueError, match="it is a file, not a directory"):
        text_router.save(tmp_path / "file")
    with pytest.raises(ValueError, match="file is a file, not a directory"):
        text_router.save(tmp_path / "file" / "ckpt")
    assert (tmp_path / "file").read_text() == "keep"


# ---------------------------------------------------------------- 8. strict manifest schema


def _set(ckpt: Path, edit) -> None:
    manifest = read_manifest(ckpt)
    edit(manifest)
    write_manifest(ckpt, manifest)


STRICT = [
    ("dim -1", lambda m: m.update(dim=-1), r"'dim' must be between 1 and 65536, got -1"),
    ("dim bool", lambda m: m.update(dim=True), r"'dim' must be an integer, got True"),
    ("dim float", lambda m: m.update(dim=64.0), r"'dim' must be an integer, got 64.0"),
    ("size bool", lambda m: m["experts"][0].update(size=True), r"experts\[0\].size must be an integer, got True"),
    ("size float", lambda m: m["experts"][0].update(size=15.0), r"experts\[0\].size must be an integer, got 15.0"),
    ("size str", lambda m: m["experts"][0].update(size="15"), r"experts\[0\].size must be an integer"),
    (
        "null name",
        lambda m: m["experts"][1].update(name=None),
        r"experts\[1\]: expert name must be a non-empty string, got NoneType None",
    ),
    (
        "blank name",
        lambda m: m["experts"][1].update(name="  "),
        r"experts\[1\]: expert name must be a non-empty string",
    ),
    ("empty files", lambda m: m.update(files={}), r"'files' does not list experts/0000.npy"),
    ("store unlisted", lambda m: m["files"].pop(STORE), r"'files' does not list store.sqlite"),
    ("gate unlisted", lambda m: m["files"].pop("gate.safetensors"), r"'files' does not list gate.safetensors"),
    ("bad digest", lambda m: m["files"].update({STORE: "abc"}), r"files\['store.sqlite'\] must be a sha256"),
    ("unused file", lambda m: m["files"].update({"extra.npy": "0" * 64}), r"'files' lists extra.npy, which no part"),
    ("shared file", lambda m: m["experts"][1].update(vectors=m["experts"][0]["vectors"]), r"is used by experts"),
    ("unknown key", lambda m: m.update(surprise=1), r"unknown key 'surprise'"),
    ("stats of no expert", lambda m: m["stats"].update(ghost={"queries": 1}), r"'stats' has an entry for 'ghost'"),
    ("negative queries", lambda m: m["stats"]["finance"].update(queries=-3), r"stats\['finance'\].queries must be"),
    ("nan threshold", lambda m: m.update(abstain_threshold=float("nan")), r"'abstain_threshold' must be a finite"),
    ("metric", lambda m: m.update(metric="cosine"), r"'metric' must be 'ip' or 'l2'"),
    ("absolute path", lambda m: m["experts"][0].update(ids="/etc/passwd"), r"points outside the checkpoint"),
    ("parent path", lambda m: m["experts"][0].update(ids="../../x.npy"), r"points outside the checkpoint"),
]


@pytest.mark.parametrize("verify", [True, False])
@pytest.mark.parametrize("case, edit, message", STRICT, ids=[c[0] for c in STRICT])
def test_manifest_schema__refuses_with_a_message_naming_the_field(
    ckpt: Path, case: str, edit, message: str, verify: bool
) -> None:
    _set(ckpt, edit)
    with pytest.raises(CheckpointError, match=message):
        Router.load(ckpt, verify=verify)


def test_ids_duplicated_across_experts__are_detected(ckpt: Path) -> None:
    manifest = read_manifest(ckpt)
    first = np.load(version_path(ckpt) / manifest["experts"][0]["ids"])
    ids_rel = manifest["experts"][1]["ids"]
    forged = np.load(version_path(ckpt) / ids_rel)
    forged[3] = first[0]
    (version_path(ckpt) / ids_rel).unlink()  # a new file: the other versions' hard links keep the old bytes
    np.save(version_path(ckpt) / ids_rel, forged)
    manifest["files"][ids_rel] = hashlib.sha256((version_path(ckpt) / ids_rel).read_bytes()).hexdigest()
    write_manifest(ckpt, manifest)  # every checksum matches: only the id check can see it
    with pytest.raises(
        CheckpointError,
        match=rf"id {first[0]} is stored more than once \(experts \['astronomy', "
        rf"'cooking'\]\)",
    ):
        Router.load(ckpt)
