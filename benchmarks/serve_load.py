"""HTTP load on loopback: queries/s and p50/p99 latency at 1, 8 and 64 concurrent clients, with and
without micro-batching, beside direct in-process calls on the same checkpoint, in one run.

    python benchmarks/serve_load.py --ckpt /tmp/serve_demo                # a trained checkpoint
    python benchmarks/serve_load.py --synthetic 200000 --dim 384 --experts 16
    python benchmarks/serve_load.py --ckpt /tmp/serve_demo --synthetic 200000 --out /tmp/load.json

Each server is scripts/serve.py in its own process; the load generator is another process (a
closed loop per client: send a POST /search, wait for the answer, send the next; keep-alive
connections, asyncio + uvloop in a separate process). Each point's seconds are split into
--rounds rounds, and each round measures every configuration in turn, so a shift in the load of
a shared machine hits all of them alike.
Queries are stored vectors plus noise, k=10 over the gate's top-2 experts. Direct rows: the
same searches through Router.search in one process - one query per call from 1/8/64 threads
("direct, per query") and 1/8/64 queries per call ("direct, batched": what micro-batching at
best achieves). Everything binds 127.0.0.1 only.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
HOST = "127.0.0.1"


# ---------------------------------------------------------------- load generator (its own process)


async def _client(port: int, bodies: list[bytes], start: float, stop: float, lat: list[float], bad: list[int]) -> None:
    reader, writer = await asyncio.open_connection(HOST, port)
    i = random.randrange(len(bodies))
    try:
        while (t0 := time.perf_counter()) < stop:
            body = bodies[i % len(bodies)]
            i += 1
            writer.write(
                b"POST /search HTTP/1.1\r\nHost: bench\r\nContent-Type: application/json\r\n"
                b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
            )
            status = int((await reader.readline()).split()[1])
            length = 0
            while (line := await reader.readline()) not in (b"\r\n", b""):
                if line.lower().startswith(b"content-length:"):
                    length = int(line.split(b":")[1])
            await reader.readexactly(length)
            if t0 >= start:  # after the warm-up
                lat.append(time.perf_counter() - t0)
                if status != 200:
                    bad.append(status)
    finally:
        writer.close()


def generate(port: int, bodies_file: Path, clients: int, seconds: float, warmup: float) -> dict:
    """Closed-loop load from `clients` connections; run in a process of its own."""
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    bodies = bodies_file.read_bytes().splitlines()
    lat: list[float] = []
    bad: list[int] = []

    async def run() -> None:
        start = time.perf_counter() + warmup
        await asyncio.gather(*(_client(port, bodies, start, start + seconds, lat, bad) for _ in range(clients)))

    cpu0 = time.process_time()
    asyncio.run(run())
    return {"lat": lat, "seconds": seconds, "errors": len(bad), "client_cpu_s": time.process_time() - cpu0}


def summarize(parts: list[dict], queries_per_call: int = 1) -> dict:
    """Pool the rounds of one configuration: queries/s over all measured time, latency percentiles over all calls."""
    lat = np.concatenate([np.asarray(p["lat"], dtype=np.float64) for p in parts])
    seconds = sum(p["seconds"] for p in parts)
    if len(lat) == 0:
        return {"qps": 0.0, "p50_ms": float("nan"), "p99_ms": float("nan"), "calls": 0, "errors": 0}
    return {
        "qps": queries_per_call * len(lat) / seconds,
        "p50_ms": 1e3 * float(np.percentile(lat, 50)),
        "p99_ms": 1e3 * float(np.percentile(lat, 99)),
        "calls": int(len(lat)),
        "errors": sum(p.get("errors", 0) for p in parts),
        "client_cpu_share": sum(p.get("client_cpu_s", 0.0) for p in parts) / seconds,
    }


# ---------------------------------------------------------------- checkpoints and queries


def synthetic_checkpoint(path: Path, n: int, dim: int, experts: int, seed: int) -> Path:
    """n clustered vectors cut into `experts` experts (one cluster each) and a centroid-initialised gate."""
    from moe_router import Router
    from moe_router.gate import initial_gate

    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((experts, dim)).astype(np.float32)
    router = Router(dim, "ip")
    for e in range(experts):
        xb = centers[e] + 0.9 * rng.standard_normal((n // experts, dim)).astype(np.float32)  # (n/E, d)
        router.add_expert(f"shard{e:02d}", vectors=xb)
    router.set_gate(initial_gate(router.experts, hidden_dims=[512], dropout=0.0))
    return router.save(path)


def query_vectors(ckpt: Path, count: int, seed: int) -> np.ndarray:
    """Stored vectors plus noise, normalised."""
    from moe_router import Router

    router = Router.load(ckpt, verify=False)
    xbs = [e.vectors() for e in router.experts]  # (n_e, d) each
    router.close()
    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(count):
        xb = xbs[rng.integers(len(xbs))]
        rows.append(xb[rng.integers(len(xb))] + 0.05 * rng.standard_normal(xb.shape[1]))
    xq = np.array(rows, dtype=np.float32)
    return xq / np.linalg.norm(xq, axis=1, keepdims=True)


# ---------------------------------------------------------------- direct in-process calls (own process)


def direct_worker(ckpt: Path, xq: np.ndarray, k: int, top_experts: int, threads: int | None) -> None:
    """Answer 'per_query C SECONDS' / 'batched C SECONDS' lines on stdin with JSON timings (stays up between rounds)."""
    from moe_router import Router

    set_threads(threads)
    router = Router.load(ckpt, verify=False)
    for x in xq[:32]:  # warm-up
        router.search(x, k=k, top_experts=top_experts)
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        kind, c, seconds = line.split()
        c, seconds = int(c), float(seconds)
        lat: list[float] = []
        stop = time.perf_counter() + seconds
        if kind == "per_query":  # c threads, one query per call
            lock = threading.Lock()

            def loop(offset: int) -> None:
                set_threads(threads)  # FAISS's OpenMP setting is per thread
                mine, i = [], offset
                while (t0 := time.perf_counter()) < stop:
                    router.search(xq[i % len(xq)], k=k, top_experts=top_experts)
                    mine.append(time.perf_counter() - t0)
                    i += 1
                with lock:
                    lat.extend(mine)

            threads_ = [threading.Thread(target=loop, args=(j * 97,)) for j in range(c)]
            for t in threads_:
                t.start()
            for t in threads_:
                t.join()
        else:  # c queries per call: every query of a call waits for the whole call
            n = 0
            while (t0 := time.perf_counter()) < stop:
                start = (n * c) % (len(xq) - c)
                router.search(xq[start : start + c], k=k, top_experts=top_experts)
                lat.append(time.perf_counter() - t0)
                n += 1
        print(json.dumps({"lat": lat, "seconds": seconds}), flush=True)


def set_threads(threads: int | None) -> None:
    """As RouterState does: torch's setting is global, FAISS's is per calling thread."""
    if threads:
        import faiss
        import torch

        if torch.get_num_threads() != threads:
            torch.set_num_threads(threads)
        faiss.omp_set_num_threads(threads)


# ---------------------------------------------------------------- driver


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def start_server(
    ckpt: Path, batching: bool, run_dir: Path, extra: list[str], tries: int = 2
) -> tuple[subprocess.Popen, int]:
    """scripts/serve.py on a free loopback port; retried once (another process may take the port first)."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "MOE_ROUTER_API_KEY"}
    run_dir.mkdir(parents=True, exist_ok=True)
    log = run_dir / "server.log"
    proc = subprocess.Popen(
        [
            sys.executable,
            str(REPO / "scripts" / "serve.py"),
            f"ckpt={ckpt}",
            f"host={HOST}",
            f"port={port}",
            "log_level=warning",
            f"batching.enabled={str(batching).lower()}",
            f"hydra.run.dir={run_dir}",
            *extra,
        ],
        stdout=subprocess.DEVNULL,
        stderr=open(log, "wb"),
        env=env,
    )
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            with urllib.request.urlopen(f"http://{HOST}:{port}/ready", timeout=1):
                return proc, port
        except OSError:
            time.sleep(0.3)
    proc.kill()
    proc.wait()
    if tries > 1:
        return start_server(ckpt, batching, run_dir, extra, tries - 1)
    raise RuntimeError(f"server did not start: {log.read_text()[-2000:]}")


def load_point(port: int, bodies: Path, clients: int, seconds: float, warmup: float) -> dict:
    out = subprocess.run(
        [
            sys.executable,
            __file__,
            "--generate",
            str(port),
            "--bodies",
            str(bodies),
            "--clients",
            str(clients),
            "--seconds",
            str(seconds),
            "--warmup",
            str(warmup),
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return json.loads(out.strip().splitlines()[-1])


def bench_checkpoint(label: str, ckpt: Path, args: argparse.Namespace, tmp: Path) -> dict:
    """Both servers and the direct worker stay up; every round measures each configuration in turn."""
    xq = query_vectors(ckpt, 512, args.seed)
    np.save(tmp / "xq.npy", xq)
    bodies = tmp / f"bodies-{label}.jsonl"
    bodies.write_text(
        "\n".join(
            json.dumps({"vector": [round(float(v), 6) for v in x], "k": args.k, "top_experts": args.top_experts})
            for x in xq
        )
        + "\n"
    )
    clients = [int(c) for c in args.clients.split(",")]
    server_args = [*args.server_args, *([f"threads={args.threads}"] if args.threads else [])]
    servers = {}
    worker = None
    try:
        for batching in (True, False):
            servers[batching] = start_server(ckpt, batching, tmp / f"run-{label}-{batching}", server_args)
        worker = subprocess.Popen(
            [
                sys.executable,
                __file__,
                "--direct",
                str(ckpt),
                "--xq",
                str(tmp / "xq.npy"),
                "--k",
                str(args.k),
                "--top-experts",
                str(args.top_experts),
                *(["--threads", str(args.threads)] if args.threads else []),
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            bufsize=1,
        )
        assert json.loads(worker.stdout.readline()) == {"ready": True}

        def direct(kind: str, c: int) -> dict:
            worker.stdin.write(f"{kind} {c} {slot}\n")
            return json.loads(worker.stdout.readline())

        parts: dict[str, list[dict]] = {}
        slot = args.seconds / args.rounds
        for c in clients:
            for r in range(args.rounds):
                for batching, name in ((True, NAMES[0]), (False, NAMES[1])):
                    parts.setdefault(f"{name}/{c}", []).append(
                        load_point(servers[batching][1], bodies, c, slot, args.warmup if r == 0 else 0.2)
                    )
                parts.setdefault(f"{NAMES[2]}/{c}", []).append(direct("per_query", c))
                parts.setdefault(f"{NAMES[3]}/{c}", []).append(direct("batched", c))
            print(f"  {label}: {c} clients done", flush=True)
        rows = {
            key: summarize(p, int(key.split("/")[1]) if key.startswith(NAMES[3]) else 1) for key, p in parts.items()
        }
        with urllib.request.urlopen(f"http://{HOST}:{servers[True][1]}/stats") as r:
            rows["server"] = json.load(r)["server"]
        rows["expert_change"] = expert_change(servers[True][1], xq, bodies)
        return rows
    finally:
        for proc, _ in servers.values():
            proc.send_signal(signal.SIGTERM)
            proc.wait(60)
        if worker is not None:
            worker.kill()
            worker.wait()


def post(port: int, path: str, body: bytes | None, method: str = "POST") -> tuple[int, float]:
    req = urllib.request.Request(
        f"http://{HOST}:{port}{path}", data=body, method=method, headers={"Content-Type": "application/json"}
    )
    t0 = time.perf_counter()
    try:
        with urllib.request.urlopen(req, timeout=600) as r:
            r.read()
            return r.status, time.perf_counter() - t0
    except urllib.error.HTTPError as exc:
        return exc.code, time.perf_counter() - t0


def expert_change(port: int, xq: np.ndarray, bodies: Path, vectors: int = 500) -> dict:
    """Add then remove a `vectors`-vector expert (each saves the whole checkpoint) while one client searches."""
    search_bodies = bodies.read_bytes().splitlines()
    lat: list[float] = []
    codes: set[int] = set()
    stop = threading.Event()

    def searcher() -> None:
        i = 0
        while not stop.is_set():
            code, dt = post(port, "/search", search_bodies[i % len(search_bodies)])
            codes.add(code)
            lat.append(dt)
            i += 1

    rng = np.random.default_rng(1)
    new = xq[rng.integers(len(xq), size=vectors)] + 0.1 * rng.standard_normal((vectors, xq.shape[1]))
    add_body = json.dumps({"name": "bench-new", "vectors": np.round(new, 5).tolist()}).encode()
    t = threading.Thread(target=searcher)
    t.start()
    time.sleep(1.0)
    before = len(lat)
    add_code, add_s = post(port, "/experts", add_body)
    remove_code, remove_s = post(port, "/experts/bench-new", None, method="DELETE")
    during = lat[before:]
    stop.set()
    t.join()
    return {
        "add_s": add_s,
        "remove_s": remove_s,
        "codes": sorted({add_code, remove_code, *codes}),
        "search_p50_ms_before": 1e3 * float(np.median(lat[:before])),
        "search_p50_ms_during": 1e3 * float(np.median(during)) if during else float("nan"),
        "search_max_ms_during": 1e3 * float(np.max(during)) if during else float("nan"),
        "searches_during": len(during),
    }


NAMES = ["HTTP, micro-batched", "HTTP, one request per pass", "direct, per query", "direct, batched"]


def table(label: str, rows: dict, clients: list[int]) -> str:
    lines = [
        f"\n{label}\n",
        "| path | clients | queries/s | p50 ms | p99 ms | vs HTTP one-per-pass |",
        "|---|---|---|---|---|---|",
    ]
    for c in clients:
        base = rows[f"{NAMES[1]}/{c}"]["qps"]
        for name in NAMES:
            r = rows[f"{name}/{c}"]
            err = f" ({r['errors']} errors)" if r.get("errors") else ""
            lines.append(
                f"| {name} | {c} | {r['qps']:.0f}{err} | {r['p50_ms']:.2f} | {r['p99_ms']:.2f} | "
                f"{r['qps'] / base:.2f}x |"
            )
    s = rows.get("server")
    if s:
        lines.append(
            f"\nmicro-batching: {s['passes']} passes, mean {s['mean_pass']:.1f} queries per pass, "
            f"largest {s['largest_pass']}"
        )
    c = rows.get("expert_change")
    if c:
        lines.append(
            f"expert change (500 vectors, checkpoint saved each time): add {c['add_s']:.2f} s, remove "
            f"{c['remove_s']:.2f} s, HTTP codes {c['codes']}; {c['searches_during']} searches meanwhile, "
            f"p50 {c['search_p50_ms_during']:.1f} ms (before {c['search_p50_ms_before']:.1f}), "
            f"max {c['search_max_ms_during']:.0f} ms"
        )
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--ckpt", type=Path, help="a trained checkpoint (e.g. scripts/train.py out=/tmp/serve_demo)")
    p.add_argument("--synthetic", type=int, default=0, help="also a synthetic checkpoint with this many vectors")
    p.add_argument("--dim", type=int, default=384)
    p.add_argument("--experts", type=int, default=16)
    p.add_argument("--clients", default="1,8,64", help="concurrent clients, comma-separated")
    p.add_argument("--seconds", type=float, default=5.0, help="measured seconds per point")
    p.add_argument("--warmup", type=float, default=1.0, help="unmeasured seconds before each point")
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--top-experts", type=int, default=2)
    p.add_argument(
        "--rounds", type=int, default=5, help="each point's seconds are split into this many interleaved rounds"
    )
    p.add_argument(
        "--threads", type=int, default=None, help="torch/FAISS threads for server and direct calls (null = all)"
    )
    p.add_argument("--server-args", nargs="*", default=[], help="extra Hydra overrides for scripts/serve.py")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path)
    p.add_argument("--generate", type=int, help=argparse.SUPPRESS)  # internal: be the load generator on this port
    p.add_argument("--bodies", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--direct", type=Path, help=argparse.SUPPRESS)  # internal: time direct calls on this checkpoint
    p.add_argument("--xq", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.generate:
        print(json.dumps(generate(args.generate, args.bodies, int(args.clients), args.seconds, args.warmup)))
        return 0
    if args.direct:
        direct_worker(args.direct, np.load(args.xq), args.k, args.top_experts, args.threads)
        return 0
    if not args.ckpt and not args.synthetic:
        p.error("give --ckpt, --synthetic N, or both")
    report = {
        "machine": f"{os.cpu_count()} CPUs, load average at start {os.getloadavg()[0]:.1f}",
        "threads": args.threads,
        "rounds": args.rounds,
        "seconds": args.seconds,
        "k": args.k,
        "top_experts": args.top_experts,
        "checkpoints": {},
    }
    clients = [int(c) for c in args.clients.split(",")]
    with tempfile.TemporaryDirectory(prefix="moe_load_") as tmp:
        tmp = Path(tmp)
        todo = []
        if args.ckpt:
            shutil.copytree(args.ckpt, tmp / "trained")  # serving opens the store read-write: leave the original alone
            todo.append((f"trained checkpoint {args.ckpt.name}", tmp / "trained"))
        if args.synthetic:
            t0 = time.perf_counter()
            ck = synthetic_checkpoint(tmp / "synthetic", args.synthetic, args.dim, args.experts, args.seed)
            print(f"built a synthetic checkpoint in {time.perf_counter() - t0:.0f} s", flush=True)
            todo.append((f"synthetic {args.synthetic} x {args.dim}, {args.experts} experts", ck))
        for label, ckpt in todo:
            rows = bench_checkpoint(label.split()[0], ckpt, args, tmp)
            report["checkpoints"][label] = rows
            print(table(label, rows, clients), flush=True)
    report["load_average_at_end"] = os.getloadavg()[0]
    print(
        f"\n{report['machine']}; at end {report['load_average_at_end']:.1f}; "
        f"k={args.k}, top_experts={args.top_experts}, {args.seconds:.0f} s per point"
    )
    if args.out:
        args.out.write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
