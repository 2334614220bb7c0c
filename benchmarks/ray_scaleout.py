"""Scale-out on Ray (issues 12, 19): top-2 routing vs broadcasting to all experts, in Ray actors and in-process.

    python benchmarks/ray_scaleout.py [--n 200000 --d 384 --experts 16] [--json reports/ray_scaleout.json]
    python benchmarks/ray_scaleout.py --nodes 2 --node-loss [--json ...]   # Ray's multi-node test cluster
    python benchmarks/ray_scaleout.py --smoke [--nodes 2 --node-loss]      # seconds: tiny sizes, one round

One run, one Ray cluster, one checkpoint of --experts equal synthetic experts
(moe_router.data.synthetic, a centroid gate: routing quality is not the point here). The cluster is
a local one (ray.init(num_cpus=--cpus)), or with --nodes N a ray.cluster_utils.Cluster on this
machine: a head without CPUs and N worker nodes of --node-cpus each, the experts spread over them
(placement "spread"). Every cluster binds 127.0.0.1 only. Four ways of answering the same held-out
queries, interleaved round by round so the machine's load falls on all of them alike:

- ray routed:     each query sent only to its top-2 experts' actors (the Ray backend)
- ray broadcast:  each query sent to every expert's actor and merged (FAISS IndexShards /
                  distributed-faiss style: every shard sees every query)
- local routed / local broadcast: the same searches with every index in this process

At batch 1 and batch --batch: queries/s, p50/p99 latency of one call, query bytes sent to the
experts per query, actor calls per search call, and how many nodes a search call contacted and
its calls by node; recall@10 of routed against broadcast (broadcast is exhaustive). Also the bare
round trip of one actor call (the fixed cost per expert contacted) and the overhead of the Ray
backend over the in-process one at the same work. With --node-loss (--nodes >= 2): a stream of
routed searches on one router with 1 replica and one with 2 while the node holding the first
expert is removed and a fresh node added: answers complete / partial per phase, the slowest
search, and the time until the lost actors answer again.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # before Ray is imported: it then binds 127.0.0.1

import faiss  # noqa: E402
import numpy as np  # noqa: E402
import ray  # noqa: E402
from ray.cluster_utils import Cluster  # noqa: E402

from moe_router import Router  # noqa: E402
from moe_router.data.synthetic import cluster_layout, held_out_queries  # noqa: E402
from moe_router.gate import initial_gate  # noqa: E402
from moe_router.routing.backends import make_backend  # noqa: E402
from moe_router.train.build import clustered_router  # noqa: E402
from moe_router.types import SearchParams  # noqa: E402

LOOPBACK = "127.0.0.1"
NODE_LOSS_TIMEOUT_S = 1.5  # timeout_s of the node-loss routers: searches take milliseconds, restarts seconds
SMOKE = {
    "n": 4_000,
    "d": 32,
    "experts": 4,
    "batch": 20,
    "single": 10,
    "batches": 1,
    "rounds": 1,
    "reps": 20,
    "down_s": 1.5,
}


def start_cluster(nodes: int, cpus: int, node_cpus: int) -> Cluster | None:
    """Join a fresh cluster on loopback: local (nodes=0), or a head without CPUs and `nodes` workers."""
    if nodes == 0:
        ray.init(num_cpus=cpus, _node_ip_address=LOOPBACK, include_dashboard=False, log_to_driver=False)
        return None
    cluster = Cluster(
        initialize_head=True, head_node_args={"num_cpus": 0, "node_ip_address": LOOPBACK, "include_dashboard": False}
    )
    for _ in range(nodes):
        cluster.add_node(num_cpus=node_cpus, node_ip_address=LOOPBACK)
    ray.init(address=cluster.address, _node_ip_address=LOOPBACK, log_to_driver=False)
    return cluster


def timed(router: Router, xq: np.ndarray, batch: int, top: int, k: int) -> tuple[list[float], list, list[Counter]]:
    """Seconds of each search call over xq in batches of `batch`, the hits, and each call's actor calls by node."""
    backend = router.backend if router.backend.name == "ray" else None
    times, hits, by_node = [], [], []
    for a in range(0, len(xq), batch):
        before = Counter(backend.calls_by_node) if backend else Counter()
        start = time.perf_counter()
        hits += router.search(xq[a : a + batch], k=k, top_experts=top, with_text=False)
        times.append(time.perf_counter() - start)
        by_node.append(Counter(backend.calls_by_node) - before if backend else Counter())
    return times, hits, by_node


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


def ms(fn, reps: int) -> dict:
    """p50 and p99 milliseconds of fn() over `reps` calls, after one warm-up call."""
    fn()
    t = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        t.append(time.perf_counter() - start)
    return {"p50": 1e3 * float(np.median(t)), "p99": 1e3 * float(np.percentile(t, 99))}


def node_loss(cluster: Cluster, ckpt: Path, xq: np.ndarray, args: argparse.Namespace) -> dict:
    """Routed searches on a 1-replica and a 2-replica router while a worker node is removed, then one added."""
    routers = {
        f"replicas={r}": Router.load(ckpt, backend=make_backend("ray", replicas=r, timeout_s=NODE_LOSS_TIMEOUT_S))
        for r in (1, 2)
    }
    dead = routers["replicas=1"].experts[0].nodes[0]
    victim = next(node for node in cluster.worker_nodes if node.node_id == dead)
    lost = sorted(e.name for e in routers["replicas=1"].experts if dead in e.nodes)
    phase = ["before"]
    rows: list[tuple[str, str, float, float, tuple]] = []  # (router, phase, start, seconds, missing names)
    stop = threading.Event()

    def stream() -> None:
        while not stop.is_set():
            for name, router in routers.items():
                start, now = time.monotonic(), phase[0]  # a search counts in the phase it started in
                hits = router.search(xq[: args.batch], k=args.k, top_experts=args.top, with_text=False)
                missing = tuple(sorted({m for h in hits for m in h.missing_experts}))
                rows.append((name, now, start, time.monotonic() - start, missing))
            time.sleep(0.02)

    def recovered() -> bool:
        last = [r for r in rows if r[0] == "replicas=1" and r[2] > added]
        return bool(last) and not last[-1][4] and not any(e.group.suspects for r in routers.values() for e in r.experts)

    reader = threading.Thread(target=stream)
    reader.start()
    try:
        time.sleep(1.0)
        phase[0] = "removing"
        removed = time.monotonic()
        cluster.remove_node(victim)
        remove_s = time.monotonic() - removed
        phase[0] = "node down"  # searches started from here on find it gone
        down = time.monotonic()
        while time.monotonic() < down + 60 and (
            time.monotonic() < down + args.down_s
            or min(sum(r[0] == name and r[1] == "node down" for r in rows) for name in routers) < 2
        ):  # a search that waits out its timeout can span the whole window: two each, at least
            time.sleep(0.05)
        phase[0] = "node added"
        adding = time.monotonic()
        cluster.add_node(num_cpus=args.node_cpus, node_ip_address=LOOPBACK)
        added = time.monotonic()
        while not recovered() and time.monotonic() < added + 120:
            time.sleep(0.05)
        back = time.monotonic()
        phase[0] = "after"
        time.sleep(1.0)
    finally:
        stop.set()
        reader.join(60)
    report: dict = {"removed_node_experts (replicas=1)": lost}
    for name in routers:
        mine = [r for r in rows if r[0] == name]
        report[name] = {
            p: {
                "searches": sum(r[1] == p for r in mine),
                "complete": sum(r[1] == p and not r[4] for r in mine),
                "partial": sum(r[1] == p and bool(r[4]) for r in mine),
                "missing named": sorted({m for r in mine if r[1] == p for m in r[4]}),
            }
            for p in ("before", "removing", "node down", "node added", "after")
        }
        report[name]["slowest_search_s"] = max(r[3] for r in mine)
    partial = [r[2] + r[3] for r in rows if r[0] == "replicas=1" and r[4]]  # when each partial answer came
    report["remove_node_s"], report["add_node_s"] = remove_s, added - adding
    report["seconds_from_remove_node_to_first_partial_answer"] = partial[0] - removed if partial else None
    report["recovered"] = recovered()
    report["seconds_from_add_node_to_all_answering"] = back - added
    return report


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n", type=int, default=200_000, help="stored vectors (--experts equal experts)")
    p.add_argument("--d", type=int, default=384, help="vector dimension")
    p.add_argument("--experts", type=int, default=16, help="experts")
    p.add_argument("--experts-per-actor", type=int, default=1, help="experts an actor holds (0: chosen by the backend)")
    p.add_argument("--top", type=int, default=2, help="experts a routed query is sent to")
    p.add_argument("--k", type=int, default=10, help="hits per query")
    p.add_argument("--batch", type=int, default=100, help="the large batch size")
    p.add_argument("--single", type=int, default=60, help="queries timed one by one per round and mode")
    p.add_argument("--batches", type=int, default=4, help="large batches per round and mode")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds")
    p.add_argument("--reps", type=int, default=200, help="calls timed for the round trip and the model's parts")
    p.add_argument("--cpus", type=int, default=2, help="CPUs of the local Ray cluster (--nodes 0)")
    p.add_argument("--nodes", type=int, default=0, help="worker nodes of a multi-node test cluster (0: local)")
    p.add_argument("--node-cpus", type=int, default=1, help="CPUs of each worker node")
    p.add_argument("--actor-cpus", type=float, default=None, help="CPUs Ray reserves per actor (default: chosen)")
    p.add_argument("--timeout", type=float, default=120.0, help="timeout_s of the timed router's backend")
    p.add_argument("--node-loss", action="store_true", help="remove and add a worker during searches (--nodes >= 2)")
    p.add_argument("--down-s", type=float, default=3.0, help="seconds the removed node stays away (at least)")
    p.add_argument("--smoke", action="store_true", help=f"tiny sizes, one round: {SMOKE}")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, default=None, help="write the report here")
    args = p.parse_args()
    if args.smoke:
        for key, value in SMOKE.items():
            setattr(args, key, value)
    if args.node_loss and args.nodes < 2:
        p.error("--node-loss needs --nodes >= 2 (a replica of each expert on two nodes)")

    cluster = start_cluster(args.nodes, args.cpus, args.node_cpus)
    tmp = Path(tempfile.mkdtemp(prefix="ray_scaleout_"))
    try:
        layout = cluster_layout(args.d, args.experts, args.seed)
        built = clustered_router(args.n, args.d, args.experts, args.seed, layout)
        built.set_gate(initial_gate(built.experts, hidden_dims=[], dropout=0.0))  # centroid routing
        ckpt = built.save(tmp / "ckpt")
        del built
        local = Router.load(ckpt)
        start = time.perf_counter()
        backend = make_backend(
            "ray", num_cpus=args.actor_cpus, experts_per_actor=args.experts_per_actor or None, timeout_s=args.timeout
        )
        remote = Router.load(ckpt, backend=backend)
        load_s = time.perf_counter() - start
        workers = [n["NodeID"] for n in ray.nodes() if n["Alive"] and n["Resources"].get("CPU", 0) > 0]
        label = {node: f"node-{i}" for i, node in enumerate(workers)}
        print(
            f"{args.experts} experts x {args.n // args.experts} vectors, d={args.d}, {len(workers)} node(s) with CPUs; "
            f"{backend.plan.reason}; Ray load (actors read their files) {load_s:.1f} s",
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
        by_node = {key: [] for key in sent}  # per search call: its actor calls by node
        hits = {m: [] for m in modes}
        for r in range(args.rounds):
            one = xq[r * args.single : (r + 1) * args.single]
            many = xq[r * args.batches * args.batch : (r + 1) * args.batches * args.batch]
            for m, (router, top) in modes.items():
                for b, qs in ((1, one), (args.batch, many)):
                    before = (backend.sent_bytes, backend.calls)
                    t, h, nodes = timed(router, qs, b, top, args.k)
                    times[(m, b)] += t
                    if m.startswith("ray"):
                        sent[(m, b)][0] += backend.sent_bytes - before[0]
                        sent[(m, b)][1] += backend.calls - before[1]
                        by_node[(m, b)] += nodes
                    if b == args.batch:
                        hits[m] += h
            print(f"round {r + 1}/{args.rounds} done", flush=True)

        actor, name = remote.experts[0].replicas[0], remote.experts[0].key
        rt = ms(lambda: ray.get(actor.pid.remote()), args.reps)  # the bare cost of contacting one actor (no search)
        parts = {  # the model's terms (docs/scaling.md): gate, one expert's search in an actor and in-process
            "gate batch 1": ms(lambda: local.select(xq[:1], SearchParams(top_experts=args.top), record=False), 100),
            f"gate batch {args.batch}": ms(
                lambda: local.select(xq[: args.batch], SearchParams(top_experts=args.top), record=False), 100
            ),
            "one expert search in its actor, 1 query": ms(
                lambda: ray.get(actor.search_many.remote([(name, xq[:1])], args.k)), args.reps
            ),
            "one expert search in-process, 1 query": ms(lambda: local.experts[0].search(xq[:1], args.k), args.reps),
        }
        threads = faiss.omp_get_max_threads()
        faiss.omp_set_num_threads(1)  # as in an actor: one FAISS thread, no OpenMP barrier
        parts["one expert search in-process, 1 query, 1 thread"] = ms(
            lambda: local.experts[0].search(xq[:1], args.k), args.reps
        )
        faiss.omp_set_num_threads(threads)

        rows = []
        for (m, b), t in times.items():
            row = {"mode": m, "batch": b, **summary(t, b)}
            if (m, b) in sent:
                calls = by_node[(m, b)]
                row["bytes_per_query"] = sent[(m, b)][0] / (b * len(t))
                row["actor_calls_per_search"] = sent[(m, b)][1] / len(t)
                row["nodes_per_search"] = float(np.mean([len(c) for c in calls]))
                total = sum(calls, Counter())
                row["actor_calls_per_search_by_node"] = {label[n]: total[n] / len(t) for n in workers}
            rows.append(row)
        by = {(r["mode"], r["batch"]): r for r in rows}
        report = {
            "n": args.n,
            "d": args.d,
            "experts": args.experts,
            "top": args.top,
            "k": args.k,
            "cluster": f"{args.nodes} worker nodes x {args.node_cpus} CPUs + a head without CPUs"
            if args.nodes
            else f"local, {args.cpus} CPUs",
            "plan": backend.plan.reason,
            "node_addresses": sorted({n["NodeManagerAddress"] for n in ray.nodes()}),
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
            "\n| mode | batch | queries/s | p50 ms | p99 ms | query bytes to experts / query | actor calls / search "
            "| nodes / search | calls / search by node |"
        )
        print("|---|---|---|---|---|---|---|---|---|")
        for r in rows:
            spread = ", ".join(f"{n} {c:.2f}" for n, c in r.get("actor_calls_per_search_by_node", {}).items())
            print(
                f"| {r['mode']} | {r['batch']} | {r['qps']:,.0f} | {r['p50_ms']:.2f} | {r['p99_ms']:.2f} | "
                f"{r.get('bytes_per_query', 0):,.0f} | {r.get('actor_calls_per_search', 0):.1f} | "
                f"{r.get('nodes_per_search', 0):.2f} | {spread} |"
            )
        for key in (
            "actor_round_trip_ms",
            "parts_ms",
            "recall@10 routed vs broadcast",
            "ray results equal local",
            "overhead_ms_per_call (ray - local, p50)",
            "node_addresses",
        ):
            print(f"{key}: {report[key]}")
        if args.node_loss:
            del remote, modes, backend
            gc.collect()  # the timed router's actors and placement group go: room for the two below
            total = ray.cluster_resources().get("CPU", 0.0)
            deadline = time.monotonic() + 30
            while ray.available_resources().get("CPU", 0.0) < total and time.monotonic() < deadline:
                time.sleep(0.1)
            report["node_loss"] = node_loss(cluster, ckpt, xq, args)
            print(f"node_loss: {json.dumps(report['node_loss'], indent=1)}")
        if args.json is not None:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(report, indent=2, default=float))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        ray.shutdown()
        if cluster is not None:
            cluster.shutdown()


if __name__ == "__main__":
    main()
