"""Fuzz Router.load with damaged and hostile checkpoints: each load must end in a clear error or a usable router.

    python benchmarks/fuzz_checkpoint.py                       # a small synthetic checkpoint
    python benchmarks/fuzz_checkpoint.py --ckpt /tmp/serve_demo --per-file 300 --out /tmp/fuzz.json

For every file of the checkpoint's current version (experts: the first expert's two files) and its
pointer CURRENT it makes --per-file seeded byte-level mutations (bit flips, overwritten / inserted /
deleted runs, truncation, appended junk, zeroed blocks) and, for manifest.json, value mutations of
every JSON leaf (negative, huge, wrong type, absolute and parent paths; CURRENT re-pointed at the
mutated manifest, so the schema meets them even with verification on). Each damaged copy is loaded
twice, with verify=True (sha256 check) and verify=False (so the parsers themselves meet the
damage), in a worker process under a memory cap (RLIMIT_AS) with a per-load timeout. A loaded
router must also answer a search.

Hostile cases (--special): every file and directory replaced by a FIFO, a directory, a symlink to a
copy of itself inside or outside the checkpoint, or to /dev/zero; each must be a CheckpointError (a
link is refused even when its bytes verify), never a hang, and nothing outside may change. Read-only
cases: the intact checkpoint made read-only (chmod -R a-w) must load. When run as root the worker
drops to the user `nobody` after its imports, so permissions apply.

Outcomes: checkpoint_error and value_error (clear errors) and loaded are fine for damage;
unexpected (any other exception), crash (the worker died) and hang (timeout) are failures, as is
any outcome but checkpoint_error for a hostile case and any but loaded for a read-only one.
Exit status 1 on any failure.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import os
import random
import resource
import select
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from collections import Counter, defaultdict
from pathlib import Path

GOOD = ("checkpoint_error", "value_error", "loaded")
NOBODY = 65534  # uid and gid the worker drops to when started as root
MEMORY_CAP = 6 << 30  # bytes of address space per worker: a forged huge shape fails to allocate, never OOMs the host
ADVERSARIAL = [
    -1,
    0,
    2**31,
    2**63,
    10**12,
    1e308,
    -1e308,
    0.5,
    "x",
    "",
    None,
    True,
    [],
    {},
    [1, 2],
    {"a": 1},
    "/etc/passwd",
    "../../outside.npy",
    "/dev/zero",
]


# ---------------------------------------------------------------- mutations (parent side)


def byte_mutation(data: bytes, rng: random.Random) -> tuple[str, bytes]:
    """One seeded byte-level corruption of `data`; returns (kind, new bytes)."""
    n = len(data)
    kind = rng.choice(["bitflip", "overwrite", "insert", "delete", "truncate", "append", "zero"])
    b = bytearray(data)
    if n == 0:
        return "append", bytes(rng.randbytes(rng.randint(1, 64)))
    if kind == "bitflip":
        for _ in range(rng.randint(1, 8)):
            i = rng.randrange(n)
            b[i] ^= 1 << rng.randrange(8)
    elif kind == "overwrite":
        i = rng.randrange(n)
        run = rng.randbytes(rng.randint(1, 32))
        b[i : i + len(run)] = run
    elif kind == "insert":
        i = rng.randrange(n + 1)
        b[i:i] = rng.randbytes(rng.randint(1, 64))
    elif kind == "delete":
        i = rng.randrange(n)
        del b[i : i + rng.randint(1, 64)]
    elif kind == "truncate":
        del b[rng.randrange(n) :]
    elif kind == "append":
        b += rng.randbytes(rng.randint(1, 256))
    else:
        i = rng.randrange(n)
        b[i : i + rng.randint(1, 512)] = bytes(min(512, n - i))
    return kind, bytes(b)


def json_leaves(obj, path=()):
    if isinstance(obj, dict) and obj:
        for k, v in obj.items():
            yield from json_leaves(v, (*path, k))
    elif isinstance(obj, list) and obj:
        for i, v in enumerate(obj):
            yield from json_leaves(v, (*path, i))
    else:
        yield path


def json_mutations(text: str, limit: int, rng: random.Random):
    """(name, new text) for leaf x adversarial value, plus removed keys; seeded sample of at most `limit`."""
    manifest = json.loads(text)
    cases = []
    for path in json_leaves(manifest):
        for value in ADVERSARIAL:
            cases.append((path, "set", value))
        cases.append((path, "drop", None))
    rng.shuffle(cases)
    for path, op, value in cases[:limit]:
        m = copy.deepcopy(manifest)
        parent = m
        for p in path[:-1]:
            parent = parent[p]
        if not path:
            continue
        if op == "drop" and isinstance(parent, dict):
            del parent[path[-1]]
        else:
            parent[path[-1]] = value
        yield f"json {op} {'.'.join(map(str, path))}={value!r}"[:120], json.dumps(m).encode()


# ---------------------------------------------------------------- worker (child side)


def worker(warm: str | None = None) -> None:
    resource.setrlimit(resource.RLIMIT_AS, (MEMORY_CAP, MEMORY_CAP))
    import numpy as np

    from moe_router import CheckpointError, Router

    if warm is not None and os.geteuid() == 0:
        # Drop to nobody so permissions apply, after one load of the intact checkpoint has imported
        # everything a load needs (the interpreter's own files may not be readable by nobody).
        router = Router.load(warm)
        router.search(np.random.default_rng(0).standard_normal(router.dim).astype(np.float32), k=1, top_experts=1)
        os.setgid(NOBODY)
        os.setuid(NOBODY)

    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        job = json.loads(line)
        out = {}
        for verify in (True, False):
            try:
                router = Router.load(job["path"], verify=verify)
                try:
                    xq = np.random.default_rng(0).standard_normal(router.dim).astype(np.float32)
                    router.search(xq, k=1, top_experts=1, with_text=True)
                    outcome = "loaded"
                except Exception as exc:  # loaded, but not usable: only acceptable as a clear ValueError
                    outcome = (
                        "value_error" if isinstance(exc, ValueError) else f"unexpected:{type(exc).__name__}: {exc}"
                    )
                router.close()
            except CheckpointError:
                outcome = "checkpoint_error"
            except ValueError:
                outcome = "value_error"
            except BaseException as exc:
                where = traceback.extract_tb(exc.__traceback__)[-1]
                outcome = (
                    f"unexpected:{type(exc).__name__}: {str(exc)[:200]} (at {Path(where.filename).name}:{where.lineno})"
                )
            out["verify" if verify else "no_verify"] = outcome
        print(json.dumps(out), flush=True)


class Worker:
    def __init__(self, as_nobody_after: Path | None = None) -> None:
        extra = ["--as-nobody-after", str(as_nobody_after)] if as_nobody_after is not None else []
        self.proc = subprocess.Popen(
            [sys.executable, __file__, "--worker", *extra],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
            bufsize=1,
        )
        assert self._read(120) == {"ready": True}, "fuzz worker did not start"

    def _read(self, timeout: float):
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        if not ready:
            return "hang"
        line = self.proc.stdout.readline()
        return json.loads(line) if line else "crash"

    def load(self, path: Path, timeout: float) -> dict:
        self.proc.stdin.write(json.dumps({"path": str(path)}) + "\n")
        self.proc.stdin.flush()
        res = self._read(timeout)
        if isinstance(res, dict):
            return res
        self.proc.kill()
        code = self.proc.wait()
        outcome = "hang" if res == "hang" else f"crash:{code}"
        return {"verify": outcome, "no_verify": outcome}

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(30)


# ---------------------------------------------------------------- driver


def synthetic_checkpoint(path: Path) -> Path:
    import numpy as np

    from moe_router import HashingEmbedder, Router
    from moe_router.gate import initial_gate

    router = Router(32, "ip", embedder=HashingEmbedder(32))
    rng = np.random.default_rng(0)
    for name in ("alpha", "beta", "gamma", "delta"):
        router.add_expert(
            name,
            texts=[f"{name} {w} {i}" for i, w in enumerate(rng.choice(list("abcdefgh"), 16))],
            metadata=[{"i": i} for i in range(16)],
        )
    router.set_gate(initial_gate(router.experts, hidden_dims=[16]))
    return router.save(path)


def current_dir(ckpt: Path) -> str:
    """The current version's directory, relative to the checkpoint ('' for a format-1 checkpoint)."""
    pointer = ckpt / "CURRENT"
    return f"versions/{json.loads(pointer.read_text())['version']:06d}/" if pointer.is_file() else ""


def targets(ckpt: Path, all_files: bool) -> list[str]:
    """CURRENT and the current version's files (experts: only the first one's unless `all_files`)."""
    pre = current_dir(ckpt)
    files = sorted(str(p.relative_to(ckpt)) for p in (ckpt / pre if pre else ckpt).rglob("*") if p.is_file())
    files = [f for f in files if all_files or "experts/" not in f or "experts/0000." in f]
    return (["CURRENT"] if pre else []) + files


def repoint(case: Path, manifest_rel: str) -> None:
    """CURRENT names the sha256 of the (mutated) manifest, so verification does not stop the mutation first."""
    pointer = case / "CURRENT"
    if pointer.is_file():
        ptr = json.loads(pointer.read_text())
        ptr["manifest_sha256"] = hashlib.sha256((case / manifest_rel).read_bytes()).hexdigest()
        pointer.write_text(json.dumps(ptr))


def readable(path: Path) -> None:
    """Let the worker (nobody, when run as root) read the copy: a+rX on everything."""
    for p in [path, *path.rglob("*")]:
        if not p.is_symlink():
            p.chmod(p.stat().st_mode | 0o444 | (0o111 if p.is_dir() else 0))


def tree(path: Path) -> dict[str, str]:
    """sha256 (or kind) of every entry under `path`, to prove a load wrote nothing there."""
    out = {}
    for p in sorted(path.rglob("*")):
        rel = str(p.relative_to(path))
        out[rel] = (
            ("link " + os.readlink(p))
            if p.is_symlink()
            else (hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir")
        )
    return out


def special_cases(ckpt: Path) -> list[tuple[str, str]]:
    """(entry, how) hostile replacements: every file and directory of the current version, CURRENT, versions/."""
    pre = current_dir(ckpt)
    entries = [t for t in targets(ckpt, False)] + [pre + "experts"] + ([pre.rstrip("/"), "versions"] if pre else [])
    hows = ["fifo", "dir", "link_inside", "link_outside", "link_dev_zero"]
    return [(e, h) for e in entries for h in hows if not (h == "dir" and (ckpt / e).is_dir())]


def make_special(case: Path, outside: Path, rel: str, how: str) -> None:
    target = case / rel
    if how == "link_inside":  # the same bytes under another name inside: only refusing links catches it
        moved = target.with_name(f"moved.{target.name}")
        os.rename(target, moved)
        os.symlink(moved, target)
        return
    if how == "link_outside":
        dest = outside / rel.replace("/", "_")
        os.rename(target, dest)
        os.symlink(dest, target)
        return
    if target.is_dir():
        shutil.rmtree(target)
    else:
        target.unlink()
    if how == "fifo":
        os.mkfifo(target)
    elif how == "dir":
        target.mkdir()
    else:
        os.symlink("/dev/zero", target)


def record(results, failures, rel: str, name: str, res: dict, expected: tuple[str, ...]) -> None:
    for mode, outcome in res.items():
        results[f"{rel} [{mode}]"][outcome.split(":")[0]] += 1
        if not outcome.startswith(expected):
            failures.append({"file": rel, "mutation": name, "mode": mode, "outcome": outcome})


def fuzz(
    ckpt: Path, per_file: int, json_cases: int, seed: int, timeout: float, all_files: bool, special: bool = True
) -> dict:
    rng = random.Random(seed)
    work = Path(tempfile.mkdtemp(prefix="moe_fuzz_"))
    work.chmod(0o755)  # the worker may run as nobody
    w = Worker()
    results: dict[str, Counter] = defaultdict(Counter)
    failures = []
    counts = Counter()
    t0 = time.perf_counter()

    def load(case: Path) -> dict:
        nonlocal w
        readable(case)
        res = w.load(case, timeout)
        if res["verify"].startswith(("crash", "hang")):
            w = Worker()
        return res

    try:
        for rel in targets(ckpt, all_files):
            data = (ckpt / rel).read_bytes()
            muts = [(f"bytes {kind}", new, False) for kind, new in (byte_mutation(data, rng) for _ in range(per_file))]
            if rel.endswith("manifest.json"):
                muts += [(name, new, True) for name, new in json_mutations(data.decode(), json_cases, rng)]
            for name, new, schema in muts:
                case = work / f"case{sum(counts.values())}"
                shutil.copytree(ckpt, case, symlinks=True)
                (case / rel).unlink()  # a new file: hard-linked copies in older versions keep their bytes
                (case / rel).write_bytes(new)
                if schema:
                    repoint(case, rel)
                record(results, failures, rel, name, load(case), GOOD)
                shutil.rmtree(case, ignore_errors=True)
                counts["json" if schema else "bytes"] += 1
        if special:
            for rel, how in special_cases(ckpt):
                case, outside = work / f"case{sum(counts.values())}", work / f"outside{sum(counts.values())}"
                shutil.copytree(ckpt, case, symlinks=True)
                outside.mkdir()
                make_special(case, outside, rel, how)
                readable(outside)
                before = tree(outside)
                res = load(case)
                if tree(outside) != before:
                    res = {mode: "unexpected: the load changed files outside the checkpoint" for mode in res}
                record(results, failures, rel, how, res, ("checkpoint_error",))
                shutil.rmtree(case, ignore_errors=True)
                shutil.rmtree(outside, ignore_errors=True)
                counts["special"] += 1
            case = work / f"case{sum(counts.values())}"
            shutil.copytree(ckpt, case, symlinks=True)
            readable(case)
            subprocess.run(["chmod", "-R", "a-w", str(case)], check=True)
            before = tree(case)
            nobody = Worker(as_nobody_after=ckpt)  # root ignores permission bits: load as nobody when root
            res = nobody.load(case, timeout)
            nobody.close()
            if tree(case) != before:
                res = {mode: "unexpected: the load changed the read-only checkpoint" for mode in res}
            record(results, failures, "(whole checkpoint)", "read-only (chmod -R a-w)", res, ("loaded",))
            subprocess.run(["chmod", "-R", "u+w", str(case)], check=True)
            counts["read_only"] += 1
    finally:
        w.close()
        subprocess.run(["chmod", "-R", "u+w", str(work)], check=False)
        shutil.rmtree(work, ignore_errors=True)
    cases = sum(counts.values())
    return {
        "checkpoint": str(ckpt),
        "cases": cases,
        "case_kinds": dict(counts),
        "loads": 2 * cases,
        "seconds": time.perf_counter() - t0,
        "outcomes": {k: dict(v) for k, v in results.items()},
        "failures": failures,
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--ckpt", type=Path, help="checkpoint to corrupt (copies only); default: a small synthetic one")
    p.add_argument("--per-file", type=int, default=300, help="byte-level mutations per file")
    p.add_argument("--json-cases", type=int, default=300, help="value mutations of manifest.json")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timeout", type=float, default=60.0, help="seconds one case (two loads) may take")
    p.add_argument("--all-files", action="store_true", help="every expert's files, not only the first expert's")
    p.add_argument(
        "--no-special", action="store_true", help="skip the hostile (FIFO, link, directory) and read-only cases"
    )
    p.add_argument("--out", type=Path, help="write the JSON report here")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--as-nobody-after", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        worker(args.as_nobody_after)
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = args.ckpt or synthetic_checkpoint(Path(tmp) / "ckpt")
        report = fuzz(
            ckpt, args.per_file, args.json_cases, args.seed, args.timeout, args.all_files, not args.no_special
        )
    for target, counts in report["outcomes"].items():
        print(f"{target:<40} " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())))
    print(
        f"{report['cases']} damaged checkpoints ({report['case_kinds']}), {report['loads']} loads in "
        f"{report['seconds']:.0f} s; "
        f"{len(report['failures'])} failures"
    )
    for f in report["failures"][:20]:
        print(f"  FAIL {f['file']} [{f['mode']}] {f['mutation']}: {f['outcome']}")
    if args.out:
        args.out.write_text(json.dumps(report, indent=2))
    return 1 if report["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
