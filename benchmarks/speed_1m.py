"""Speed at 1M vectors, side by side with one exhaustive IndexFlatIP in the same run (issue 3, speed goals).

    python benchmarks/speed_1m.py --json reports/speed_1m.json
    python benchmarks/speed_1m.py --n 100000 --rounds 2 --latency-queries 50   # a quick look

1. A seeded clustered collection (see "synthetic collection" below): n x d unit vectors in `experts` equal experts.
2. The gate is trained on neighbour targets over a seeded sample of `train-queries` stored vectors
   used as pseudo-queries; their exact top-10 over all n vectors cost train_queries * n * d * 2 flops
   (4,096 x 1M x 384 x 2 = 3.1 TFLOP), which bounds the training time.
3. Batch `batch` held-out queries: gate + routed search over the top-`top` experts vs one exhaustive
   IndexFlatIP, in alternating order, `rounds` times; medians and the median of the per-round ratios.
   The exhaustive side is timed three ways (FAISS defaults; a 16,384-vector BLAS block; one thread),
   which rank differently on an idle and a busy CPU; the fastest each round is the baseline.
4. Batch 1: p50/p99 latency of routed vs exhaustive, alternating query by query.
5. Save the router, then load it in fresh processes (benchmarks/load_probe.py), with and without the
   sha256 check, page cache warm (just written) and cold (the files' pages dropped first).
Prints a table and writes every number to --json. Memory: 5.1 GB at peak at 1M x 384 (3.3x the
raw vectors, while computing the training targets); 2x (router + exhaustive index) while timing.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import faiss
import lightning as L
import numpy as np
import torch

from moe_router.checkpoint.io import save_router
from moe_router.data.synthetic import cluster_layout, held_out_queries
from moe_router.gate.model import Gate
from moe_router.index.exact import exhaustive_index
from moe_router.metrics import load_stats, overlap_at_k
from moe_router.routing.router import Router
from moe_router.train.build import clustered_router
from moe_router.train.fit import fit_router
from moe_router.train.module import GateModule
from moe_router.types import SearchParams

# How the exhaustive baseline is run; the fastest of them in each round is the baseline. FAISS
# parallelises one search with OpenMP barriers per block of stored vectors, and on a busy CPU a
# barrier waits for a descheduled thread: bigger blocks, or one thread, can beat its defaults.
EXHAUSTIVE = {  # name: (FAISS OpenMP threads, None = as configured; BLAS database block, in stored vectors)
    "exhaustive_default": (None, 1024),  # FAISS as shipped
    "exhaustive_large_block": (None, 16384),
    "exhaustive_one_thread": (1, 1024),
}

GOALS = {  # issue 3, "Speed goals"
    "routed_speedup": 7.0,  # x the exhaustive queries/s at batch 1,000 (ideal 8)
    "gate_share": 0.05,  # of routed-search time at batch 1,000
    "train_seconds": 600.0,  # training the gate with neighbour targets
    "load_seconds": 3.0,  # Router.load
    "load_memory_ratio": 1.3,  # peak resident memory of a load / raw vector bytes
}

SMOKE = {  # --smoke: toy sizes that still run every step (the numbers mean nothing)
    "n": 8000,
    "d": 32,
    "experts": 4,
    "batch": 200,
    "rounds": 1,
    "latency_queries": 5,
    "train_queries": 256,
    "epochs": 2,
    "load_rounds": 1,
}

# ---------------------------------------------------------------- measurements


def machine() -> dict[str, Any]:
    """What the numbers were measured on, and how busy it was."""
    mem = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines())
    return {
        "cpu": next(
            (
                line.split(":", 1)[1].strip()
                for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")
            ),
            platform.processor(),
        ),
        "cpus": len(os.sched_getaffinity(0)),
        "faiss_threads": faiss.omp_get_max_threads(),
        "torch_threads": torch.get_num_threads(),
        "mem_available_gb": int(mem["MemAvailable"].split()[0]) / 1e6,
        "faiss": faiss.__version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
    }


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def with_faiss(threads: int | None, block: int, fn: Callable[[], Any]) -> Any:
    """Run fn with FAISS's OpenMP threads and BLAS database block set (process-wide settings), then restore them."""
    old_threads, old_block = faiss.omp_get_max_threads(), faiss.cvar.distance_compute_blas_database_bs
    faiss.omp_set_num_threads(threads or old_threads)
    faiss.cvar.distance_compute_blas_database_bs = block
    try:
        return fn()
    finally:
        faiss.omp_set_num_threads(old_threads)
        faiss.cvar.distance_compute_blas_database_bs = old_block


def train_gate(router, train_queries: int, epochs: int, seed: int, workdir: Path) -> dict[str, Any]:
    """Neighbour targets over a seeded sample of stored vectors, then Lightning on one CPU process."""
    module = GateModule(
        Gate(router.dim, router.num_experts), optimizer=functools.partial(torch.optim.AdamW, lr=1e-3, weight_decay=0.01)
    )
    trainer = L.Trainer(
        max_epochs=epochs,
        accelerator="cpu",
        devices=1,
        deterministic=True,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=str(workdir),
    )
    seconds, fit = timed(
        lambda: fit_router(
            router, targets="neighbours", max_queries=train_queries, module=module, trainer=trainer, seed=seed
        )
    )
    return {
        "seconds": seconds,
        "fit_seconds": fit.seconds,
        "targets_and_validation_seconds": seconds - fit.seconds,
        "epochs": fit.epochs,
        "train_queries": train_queries,
        "target_tflop": train_queries * router.ntotal * router.dim * 2 / 1e12,
        "val": {k: v for k, v in fit.metrics.items() if k.startswith("val/")},
    }


def batch_speed(router, flat, ids: np.ndarray, xq: np.ndarray, k: int, top: int, rounds: int) -> dict[str, Any]:
    """Gate + routed search vs exhaustive search of the same batch, alternating order each round."""

    def routed() -> tuple[float, float, Any]:
        t_gate, experts = timed(lambda: router.select(xq, SearchParams(top_experts=top), record=False).top)
        t_search, res = timed(lambda: router.search_experts(xq, k, experts))
        return t_gate, t_search, (experts, res)

    rows = []
    exact_ids = routed_out = None
    for r in range(rounds):
        row: dict[str, float] = {}
        steps = [*EXHAUSTIVE, "routed"]
        for step in steps if r % 2 == 0 else steps[::-1]:
            if step == "routed":
                row["gate"], row["search"], routed_out = routed()
                row["routed"] = row["gate"] + row["search"]
            else:
                threads, block = EXHAUSTIVE[step]
                row[step], (_, I) = timed(functools.partial(with_faiss, threads, block, lambda: flat.search(xq, k)))
                exact_ids = ids[I]
        row["exhaustive"] = min(row[name] for name in EXHAUSTIVE)
        row["load_avg_1m"] = os.getloadavg()[0]
        rows.append(row)
        print(
            f"  round {r + 1}/{rounds}: exhaustive "
            + ", ".join(f"{row[name]:.2f} s ({name})" for name in EXHAUSTIVE)
            + f"; routed {row['routed']:.2f} s (gate {row['gate'] * 1e3:.1f} ms); load {row['load_avg_1m']:.1f}",
            flush=True,
        )
    experts, res = routed_out
    med = {key: float(np.median([row[key] for row in rows])) for key in rows[0]}
    n = len(xq)
    one = router.search_experts(xq, k, experts[:, :1])
    return {
        "queries": n,
        "k": k,
        "top": top,
        "rounds": rows,
        "median_seconds": med,
        "routed_qps": n / med["routed"],
        "exhaustive_qps": n / med["exhaustive"],
        **{f"{name}_qps": n / med[name] for name in EXHAUSTIVE},
        "speedup": float(np.median([row["exhaustive"] / row["routed"] for row in rows])),
        "speedup_vs_faiss_default": float(np.median([row["exhaustive_default"] / row["routed"] for row in rows])),
        "gate_share": float(np.median([row["gate"] / row["routed"] for row in rows])),
        f"recall@{k}": overlap_at_k(res.I, exact_ids),
        f"recall@{k}@1": overlap_at_k(one.I, exact_ids),
        "scanned": float(res.scanned.mean() / router.ntotal),
        "load": {key: v for key, v in load_stats(experts, router.num_experts).items() if key != "shares"},
    }


MERGES = {  # name: search_experts options; the merges a search can ask for (SearchParams.prior_weight, decide_weight)
    "by score": {},
    "log-prior (prior_weight 0.1)": {"prior_weight": 0.1},
    "re-decided (decide_weight 30)": {"decide_weight": 30.0},
}


def merge_costs(router, xq: np.ndarray, k: int, top: int, rounds: int) -> dict[str, Any]:
    """Routed search of the batch merged each way of MERGES, side by side (order rotated each round)."""
    routing = router.select(xq, SearchParams(top_experts=top), record=False)
    probs = router.gate_probs(xq)
    seconds: dict[str, list[float]] = {name: [] for name in MERGES}
    names = list(MERGES)
    for r in range(rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            t, _ = timed(lambda o=MERGES[name]: router.search_experts(xq, k, routing.top, probs=probs, **o))
            seconds[name].append(t)
    med = {name: float(np.median(v)) for name, v in seconds.items()}
    base = med["by score"]
    return {"median_seconds": med, "over_by_score": {name: m / base for name, m in med.items()}}


def latency(router, flat, xq: np.ndarray, k: int, top: int) -> dict[str, Any]:
    """Batch 1: p50/p99 of routed (gate + search) vs exhaustive, alternating query by query."""
    times: dict[str, list[float]] = {"routed": [], "exhaustive": [], "gate": []}
    for i in range(len(xq)):
        q = xq[i : i + 1]  # (1, d)
        t_gate, routing = timed(functools.partial(router.select, q, SearchParams(top_experts=top), record=False))
        experts = routing.top
        t_search, _ = timed(functools.partial(router.search_experts, q, k, experts))
        t_flat, _ = timed(functools.partial(flat.search, q, k))
        times["gate"].append(t_gate)
        times["routed"].append(t_gate + t_search)
        times["exhaustive"].append(t_flat)
    ms = {
        name: {"p50": 1e3 * float(np.percentile(v, 50)), "p99": 1e3 * float(np.percentile(v, 99))}
        for name, v in times.items()
    }
    return {
        "queries": len(xq),
        "ms": ms,
        "p50_ratio": ms["exhaustive"]["p50"] / ms["routed"]["p50"],
        "p99_ratio": ms["exhaustive"]["p99"] / ms["routed"]["p99"],
    }


def drop_page_cache(path: Path) -> None:
    """Evict this checkpoint's files (only them) from the page cache, so the next read comes from disk."""
    for f in path.rglob("*"):
        if f.is_file():
            fd = os.open(f, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def probe_load(ckpt: Path, verify: bool) -> dict[str, Any]:
    probe = Path(__file__).resolve().parent / "load_probe.py"
    cmd = [sys.executable, str(probe), str(ckpt), *([] if verify else ["--no-verify"])]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def save_and_load(router, ckpt: Path, rounds: int, raw_bytes: int) -> dict[str, Any]:
    """Save time; load time and peak memory in fresh processes, verify on/off, warm and cold page cache."""
    save_seconds, _ = timed(lambda: router.save(ckpt))
    disk = sum(f.stat().st_size for f in ckpt.rglob("*") if f.is_file())
    runs = []
    for r in range(rounds):
        for verify in (True, False) if r % 2 == 0 else (False, True):
            runs.append({"cache": "warm", **probe_load(ckpt, verify)})
    for verify in (True, False):
        drop_page_cache(ckpt)
        runs.append({"cache": "cold", **probe_load(ckpt, verify)})
    summary = {}
    for cache in ("warm", "cold"):
        for verify in (True, False):
            sel = [x for x in runs if x["cache"] == cache and x["verify"] == verify]
            peak = float(np.median([x["after_kb"]["VmHWM"] for x in sel])) * 1e3
            base = float(np.median([x["before_kb"]["VmRSS"] for x in sel])) * 1e3
            summary[f"{cache}_{'verify' if verify else 'no_verify'}"] = {
                "seconds": float(np.median([x["seconds"] for x in sel])),
                "runs": len(sel),
                "peak_rss_gb": peak / 1e9,
                "peak_over_raw": peak / raw_bytes,
                "load_only_gb": (peak - base) / 1e9,
                "load_only_over_raw": (peak - base) / raw_bytes,
            }
    return {
        "save_seconds": save_seconds,
        "disk_gb": disk / 1e9,
        "raw_vectors_gb": raw_bytes / 1e9,
        "summary": summary,
        "runs": runs,
        "save_after_add": save_after_add(ckpt),
    }


def save_after_add(ckpt: Path) -> dict[str, float]:
    """Load, add one expert as large as the others, then save: over the checkpoint (unchanged experts'
    files linked) and, side by side, to a new directory with every file written (the previous way)."""
    router = Router.load(ckpt)
    xb = router.experts[0].vectors()  # (n/E, d) a copy, stored again under a new name
    router.add_expert("added", xb, fit_row=False)
    linked, _ = timed(lambda: router.save(ckpt))
    full_dir = ckpt.parent / f"{ckpt.name}-full"
    written, _ = timed(lambda: save_router(router, full_dir, link=False))  # every expert written
    shutil.rmtree(full_dir, ignore_errors=True)
    return {"linked_seconds": linked, "written_seconds": written, "speedup": written / linked}


def goals(report: dict[str, Any]) -> dict[str, dict[str, Any]]:
    speed, load = report["batch"], report["checkpoint"]["summary"]
    worst_load = max(load.values(), key=lambda s: s["seconds"])
    measured = {
        "routed_speedup": speed["speedup"],
        "gate_share": speed["gate_share"],
        "train_seconds": report["train"]["seconds"],
        "load_seconds": max(load["warm_verify"]["seconds"], load["warm_no_verify"]["seconds"]),
        "load_memory_ratio": max(s["peak_over_raw"] for s in load.values()),
    }
    out = {}
    for name, target in GOALS.items():
        higher_is_better = name == "routed_speedup"
        value = measured[name]
        out[name] = {"value": value, "target": target, "met": value >= target if higher_is_better else value <= target}
    out["load_seconds"]["cold_cache_slowest"] = worst_load["seconds"]
    return out


def print_table(report: dict[str, Any]) -> None:
    b, lat, t, c = report["batch"], report["latency"], report["train"], report["checkpoint"]
    m = b["median_seconds"]
    k = b["k"]
    print(
        f"\n{report['n']:,} x {report['d']} vectors, {report['experts']} experts, top-{b['top']}, "
        f"batch {b['queries']:,}; {report['machine']['cpus']} CPUs, load average "
        f"{report['load_avg_start'][0]:.1f} at start, {report['load_avg_end'][0]:.1f} at end\n"
    )
    print("| measure | routed (gate + 2 experts) | exhaustive IndexFlatIP | ratio |")
    print("|---|---|---|---|")
    print(
        f"| queries/s, batch {b['queries']:,} (median of {len(b['rounds'])}) | {b['routed_qps']:.0f} | "
        f"{b['exhaustive_qps']:.0f} (fastest way each round; FAISS defaults: {b['exhaustive_default_qps']:.0f}, "
        f"block {EXHAUSTIVE['exhaustive_large_block'][1]}: {b['exhaustive_large_block_qps']:.0f}, "
        f"1 thread: {b['exhaustive_one_thread_qps']:.0f}) | "
        f"{b['speedup']:.2f}x ({b['speedup_vs_faiss_default']:.2f}x vs FAISS defaults) |"
    )
    print(f"| gate share of routed time | {100 * b['gate_share']:.2f}% ({1e3 * m['gate']:.1f} ms) | | |")
    for p in ("p50", "p99"):
        print(
            f"| latency {p}, batch 1 ({lat['queries']} queries) | {lat['ms']['routed'][p]:.1f} ms "
            f"(gate {lat['ms']['gate'][p]:.2f} ms) | {lat['ms']['exhaustive'][p]:.1f} ms | "
            f"{lat[f'{p}_ratio']:.2f}x |"
        )
    print(f"| recall@{k}, top-2 / top-1 experts | {b[f'recall@{k}']:.4f} / {b[f'recall@{k}@1']:.4f} | 1 | |")
    print(f"| share of vectors scanned | {b['scanned']:.4f} | 1 | |")
    merges = report["merges"]
    print(
        f"\nMerging the routed batch (search_experts, median of {len(b['rounds'])}; ratio to merging by score): "
        + ", ".join(
            f"{name} {merges['median_seconds'][name]:.3f} s ({merges['over_by_score'][name]:.2f}x)" for name in MERGES
        )
    )
    print(
        f"\nTraining (neighbour targets, {t['train_queries']:,} sampled pseudo-queries, {t['target_tflop']:.1f} "
        f"TFLOP of exact search): {t['seconds']:.0f} s in all ({t['targets_and_validation_seconds']:.0f} s targets "
        f"+ validation, {t['fit_seconds']:.0f} s Lightning fit, {t['epochs']} epochs); "
        + ", ".join(f"{key} {v:.4f}" for key, v in t["val"].items())
    )
    print(
        f"Checkpoint: saved in {c['save_seconds']:.1f} s, {c['disk_gb']:.2f} GB on disk "
        f"(raw vectors {c['raw_vectors_gb']:.3f} GB)"
    )
    a = c["save_after_add"]
    print(
        f"Save after adding one expert: {a['linked_seconds']:.2f} s with unchanged experts linked vs "
        f"{a['written_seconds']:.2f} s writing every file ({a['speedup']:.1f}x)"
    )
    print("| load (fresh process) | seconds | peak RSS | peak / raw | load-only RSS / raw |")
    print("|---|---|---|---|---|")
    for name, s in c["summary"].items():
        print(
            f"| {name.replace('_', ' ')} (median of {s['runs']}) | {s['seconds']:.2f} | {s['peak_rss_gb']:.2f} GB | "
            f"{s['peak_over_raw']:.2f} | {s['load_only_over_raw']:.2f} |"
        )
    print("\nGoals:")
    for name, g in report["goals"].items():
        print(f"  {'met   ' if g['met'] else 'MISSED'} {name}: {g['value']:.4g} (target {g['target']})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=1_000_000, help="stored vectors")
    parser.add_argument("--d", type=int, default=384, help="vector dimension")
    parser.add_argument("--experts", type=int, default=16, help="equal experts (n must be a multiple)")
    parser.add_argument("--top", type=int, default=2, help="experts searched per query")
    parser.add_argument("--batch", type=int, default=1000, help="queries per batch for queries/s")
    parser.add_argument("--k", type=int, default=10, help="hits per query (recall@k)")
    parser.add_argument("--seed", type=int, default=0, help="seeds the data, the sample and the training")
    parser.add_argument("--rounds", type=int, default=3, help="side-by-side repeats at batch size --batch")
    parser.add_argument("--latency-queries", type=int, default=100, help="queries timed one by one")
    parser.add_argument("--train-queries", type=int, default=4096, help="sampled pseudo-queries for the gate")
    parser.add_argument("--epochs", type=int, default=30, help="training epochs over the sample")
    parser.add_argument("--load-rounds", type=int, default=3, help="warm-cache loads of each kind")
    parser.add_argument("--ckpt", type=Path, default=None, help="checkpoint directory (default: a temporary one)")
    parser.add_argument("--keep-ckpt", action="store_true", help="keep the checkpoint after the run")
    parser.add_argument("--json", type=Path, default=None, help="write the report here")
    parser.add_argument("--smoke", action="store_true", help="every step at toy sizes, in seconds (the tests run it)")
    args = parser.parse_args()
    if args.smoke:
        for name, value in SMOKE.items():
            setattr(args, name, value)

    start = time.perf_counter()
    report: dict[str, Any] = {
        "n": args.n,
        "d": args.d,
        "experts": args.experts,
        "seed": args.seed,
        "machine": machine(),
        "load_avg_start": os.getloadavg(),
        "args": vars(args) | {"ckpt": str(args.ckpt), "json": str(args.json)},
    }
    workdir = Path(tempfile.mkdtemp(prefix="moe_router-speed-"))
    ckpt = args.ckpt or workdir / "ckpt"
    try:
        print(f"Building {args.n:,} x {args.d} clustered vectors in {args.experts} experts ...", flush=True)
        layout = cluster_layout(args.d, args.experts, args.seed)
        report["build_seconds"], router = timed(
            lambda: clustered_router(args.n, args.d, args.experts, args.seed, layout)
        )
        xq = held_out_queries(layout, args.batch, args.seed)  # (batch, d)

        print(f"Training the gate on neighbour targets of {args.train_queries:,} sampled vectors ...", flush=True)
        report["train"] = train_gate(router, args.train_queries, args.epochs, args.seed, workdir)

        flat, ids = exhaustive_index(router.experts)
        print(f"Batch {args.batch:,}: routed vs exhaustive, {args.rounds} rounds ...", flush=True)
        report["batch"] = batch_speed(router, flat, ids, xq, args.k, args.top, args.rounds)
        report["merges"] = merge_costs(router, xq, args.k, args.top, args.rounds)
        print(f"Batch 1: {args.latency_queries} queries ...", flush=True)
        report["latency"] = latency(router, flat, xq[: args.latency_queries], args.k, args.top)
        del flat

        print("Save, then load in fresh processes ...", flush=True)
        report["checkpoint"] = save_and_load(router, ckpt, args.load_rounds, args.n * args.d * 4)
        del router
    finally:
        if not args.keep_ckpt:
            shutil.rmtree(workdir, ignore_errors=True)
            if args.ckpt:
                shutil.rmtree(args.ckpt, ignore_errors=True)
    report["load_avg_end"] = os.getloadavg()
    report["peak_rss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6
    report["total_seconds"] = time.perf_counter() - start
    report["goals"] = goals(report)
    print_table(report)
    print(f"\nTotal {report['total_seconds']:.0f} s; this process peaked at {report['peak_rss_gb']:.1f} GB resident.")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2, default=float))
        print(f"Report: {args.json}")


if __name__ == "__main__":
    main()
