"""Scale-out on Ray (issue 12): top-2 routing vs broadcasting to all experts, in Ray actors and in-process.

    python benchmarks/ray_scaleout.py [--n 200000 --d 384 --experts 16] [--json reports/ray_scaleout.json]

One run, one local Ray cluster (ray.init(num_cpus=--cpus)), one checkpoint of --experts equal
synthetic experts (moe_router.data.synthetic, a centroid gate: routing quality is not the point
here). Four ways of answering the same held-out queries, interleaved round by round so the
machine's load falls on all of them alike:

- ray routed:     each query sent only to its top-2 experts' actors (the Ray backend)
- ray broadcast:  each query sent to every expert's actor and merged (FAISS IndexShards /
                  distributed-faiss style: every shard sees every query)
- local routed / local broadcast: the same searches with every index in this process

At batch 1 and batch --batch: queries/s, p50/p99 latency of one call, query bytes sent to the
experts per query, actor calls per search call, and recall@10 of routed against broadcast
(broadcast is exhaustive). Also the bare round trip of one actor call (the fixed cost per expert
contacted) and the overhead of the Ray backend over the in-process one at the same work.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import faiss
import numpy as np
import ray

from moe_router import Router
from moe_router.data.synthetic import cluster_layout, held_out_queries
from moe_router.gate import initial_gate
from moe_router.routing.backends import make_backend
from moe_router.train.build import clustered_router
from moe_router.types import SearchParams


def timed(router: Router, xq: np.ndarray, batch: int, top: int, k: int) -> tuple[list[float], list]:
    """Seconds of each search call over xq in batches of `batch`, and the hits."""
    times, hits = [], []
    for a in range(0, len(xq), batch):
        start = time.perf_counter()
        hits += router.search(xq[a : a + batch], k=k, top_experts=top, with_text=False)
        times.append(time.perf_counter() - start)
    return times, hits


def summary(times: list[float], batch: int) -> dict:
    t = np.array(times)
    return {
        "qps": batch * len(t) / t.sum(),
        "p50_ms": 1e3 * float(np.percentile(t, 50)),
        "p99_ms": 1e3 * float(np.percentile(t, 99)),
        "calls": len(t),
    }


def recall(routed: list, full: list, k: int) -> float:
    return float(np.mean([len({h.id for h in a} & {h.id for h in b}) / k for a, b in zip(routed, full)]))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n", type=int, default=200_000, help="stored vectors (--experts equal experts)")
    p.add_argument("--d", type=int, default=384, help="vector dimension")
    p.add_argument("--experts", type=int, default=16, help="experts, one Ray actor each")
    p.add_argument("--top", type=int, default=2, help="experts a routed query is sent to")
    p.add_argument("--k", type=int, default=10, help="hits per query")
    p.add_argument("--batch", type=int, default=100, help="the large batch size")
    p.add_argument("--single", type=int, default=60, help="queries timed one by one per round and mode")
    p.add_argument("--batches", type=int, default=4, help="large batches per round and mode")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds")
    p.add_argument("--cpus", type=int, default=2, help="CPUs of the local Ray cluster")
    p.add_argument("--actor-cpus", type=float, default=0.1, help="CPUs Ray reserves per expert actor")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, default=None, help="write the report here")
    args = p.parse_args()

    ray.init(num_cpus=args.cpus, include_dashboard=False, log_to_driver=False)
    tmp = Path(tempfile.mkdtemp(prefix="ray_scaleout_"))
    try:
        layout = cluster_layout(args.d, args.experts, args.seed)
        built = clustered_router(args.n, args.d, args.experts, args.seed, layout)
        built.set_gate(initial_gate(built.experts, hidden_dims=[], dropout=0.0))  # centroid routing
        ckpt = built.save(tmp / "ckpt")
        del built
        local = Router.load(ckpt)
        start = time.perf_counter()
        backend = make_backend("ray", num_cpus=args.actor_cpus, timeout_s=120.0)
        remote = Router.load(ckpt, backend=backend)
        load_s = time.perf_counter() - start
        print(
            f"{args.experts} experts x {args.n // args.experts} vectors, d={args.d}; Ray load (actors read their "
            f"files) {load_s:.1f} s",
            flush=True,
        )

        nq = args.rounds * max(args.single, args.batches * args.batch)
        xq = held_out_queries(layout, nq, args.seed)
        modes = {
            "ray routed": (remote, args.top),
            "ray broadcast": (remote, args.experts),
            "local routed": (local, args.top),
            "local broadcast": (local, args.experts),
        }
        for router, top in modes.values():  # warm up: first calls pay for imports and allocation
            timed(router, xq[: args.batch], args.batch, top, args.k)
        times = {(m, b): [] for m in modes for b in (1, args.batch)}
        sent = {(m, b): [0, 0] for m in ("ray routed", "ray broadcast") for b in (1, args.batch)}  # bytes, calls
        hits = {m: [] for m in modes}
        for r in range(args.rounds):
            one = xq[r * args.single : (r + 1) * args.single]
            many = xq[r * args.batches * args.batch : (r + 1) * args.batches * args.batch]
            for m, (router, top) in modes.items():
                for b, qs in ((1, one), (args.batch, many)):
                    before = (backend.sent_bytes, backend.calls)
                    t, h = timed(router, qs, b, top, args.k)
                    times[(m, b)] += t
                    if m.startswith("ray"):
                        sent[(m, b)][0] += backend.sent_bytes - before[0]
                        sent[(m, b)][1] += backend.calls - before[1]
                    if b == args.batch:
                        hits[m] += h
            print(f"round {r + 1}/{args.rounds} done", flush=True)

        def ms(fn, reps: int = 100) -> dict:
            fn()
            t = []
            for _ in range(reps):
                start = time.perf_counter()
                fn()
                t.append(time.perf_counter() - start)
            return {"p50": 1e3 * float(np.median(t)), "p99": 1e3 * float(np.percentile(t, 99))}

        actor, name = remote.experts[0].replicas[0], remote.experts[0].name
        rt = ms(lambda: ray.get(actor.pid.remote()), 200)  # the bare cost of contacting one actor (no search)
        parts = {  # the model's terms (docs/scaling.md): gate, one expert's search in an actor and in-process
            "gate batch 1": ms(lambda: local.select(xq[:1], SearchParams(top_experts=args.top), record=False)),
            f"gate batch {args.batch}": ms(
                lambda: local.select(xq[: args.batch], SearchParams(top_experts=args.top), record=False)
            ),
            "one expert search in its actor, 1 query": ms(
                lambda: ray.get(actor.search_many.remote([(name, xq[:1])], args.k))
            ),
            "one expert search in-process, 1 query": ms(lambda: local.experts[0].search(xq[:1], args.k)),
        }
        threads = faiss.omp_get_max_threads()
        faiss.omp_set_num_threads(1)  # as in an actor: one FAISS thread, no OpenMP barrier
        parts["one expert search in-process, 1 query, 1 thread"] = ms(lambda: local.experts[0].search(xq[:1], args.k))
        faiss.omp_set_num_threads(threads)

        rows = []
        for (m, b), t in times.items():
            row = {"mode": m, "batch": b, **summary(t, b)}
            if (m, b) in sent:
                nqs = b * len(t)
                row["bytes_per_query"] = sent[(m, b)][0] / nqs
                row["actor_calls_per_search"] = sent[(m, b)][1] / len(t)
            rows.append(row)
        by = {(r["mode"], r["batch"]): r for r in rows}
        report = {
            "n": args.n,
            "d": args.d,
            "experts": args.experts,
            "top": args.top,
            "k": args.k,
            "cpus": args.cpus,
            "ray_load_s": load_s,
            "rows": rows,
            "actor_round_trip_ms": rt,
            "parts_ms": parts,
            "recall@10 routed vs broadcast": {
                "ray": recall(hits["ray routed"], hits["ray broadcast"], args.k),
                "local": recall(hits["local routed"], hits["local broadcast"], args.k),
            },
            "ray results equal local": all(
                [h.id for h in a] == [h.id for h in b] for a, b in zip(hits["ray routed"], hits["local routed"])
            ),
            "overhead_ms_per_call (ray - local, p50)": {
                f"{kind} batch {b}": by[(f"ray {kind}", b)]["p50_ms"] - by[(f"local {kind}", b)]["p50_ms"]
                for kind in ("routed", "broadcast")
                for b in (1, args.batch)
            },
        }
        print(
            "\n| mode | batch | queries/s | p50 ms | p99 ms | query bytes to experts / query | actor calls / search |"
        )
        print("|---|---|---|---|---|---|---|")
        for r in rows:
            print(
                f"| {r['mode']} | {r['batch']} | {r['qps']:,.0f} | {r['p50_ms']:.2f} | {r['p99_ms']:.2f} | "
                f"{r.get('bytes_per_query', 0):,.0f} | {r.get('actor_calls_per_search', 0):.1f} |"
            )
        for key in (
            "actor_round_trip_ms",
            "parts_ms",
            "recall@10 routed vs broadcast",
            "ray results equal local",
            "overhead_ms_per_call (ray - local, p50)",
        ):
            print(f"{key}: {report[key]}")
        if args.json is not None:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(report, indent=2, default=float))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        ray.shutdown()


if __name__ == "__main__":
    main()
