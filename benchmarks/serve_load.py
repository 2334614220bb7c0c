"""HTTP load on loopback: queries/s and p50/p99 latency at 1, 8 and 64 concurrent clients, with and
without micro-batching, beside direct in-process calls on the same checkpoint, in one run.

    python benchmarks/serve_load.py --ckpt /tmp/serve_demo                # a trained checkpoint
    python benchmarks/serve_load.py --synthetic 200000 --dim 384 --experts 16
    python benchmarks/serve_load.py --ckpt /tmp/serve_demo --synthetic 200000 --out /tmp/load.json
    python benchmarks/serve_load.py --synthetic 200000 --texts             # text queries (MiniLM), top-2 and all
    python benchmarks/serve_load.py --synthetic 200000 --baseline /tmp/old-checkout   # before/after, one run
    python benchmarks/serve_load.py --smoke --out /tmp/smoke.json          # seconds: every path once (the tests)

Each server is scripts/serve.py in its own process; the load generator is another process (a
closed loop per client: send a POST /search, wait for the answer, send the next; keep-alive
connections, asyncio + uvloop in a separate process). Each point's seconds are split into
--rounds rounds, and each round measures every configuration in turn, so a shift in the load of
a shared machine hits all of them alike. A call counts when it was sent after the warm-up and
answered before the round's end, for HTTP and direct calls alike (text passes of 64 take seconds
here: give --texts rounds of many passes, e.g. --seconds 60 --rounds 3).
Queries are stored vectors plus noise, k=10 over the gate's top-2 experts. Direct rows: the
same searches through Router.search in one process - one query per call from 1/8/64 threads
("direct, per query") and 1/8/64 queries per call ("direct, batched": what micro-batching at
best achieves). Each HTTP point also reports its queries per pass and the embedder's share of the
time in passes (deltas of GET /stats), and "HTTP micro-batched / direct batched" per client count.
With --texts the queries are short texts (the demo corpus) sent as `text` and embedded by the
checkpoint's embedder in the server's passes, against Router.search(texts) called directly, over
the gate's top-2 experts and over all of them (the synthetic checkpoint then carries MiniLM, or
the hashing embedder with --embedder hashing). --baseline REPO also serves the checkpoint with
another checkout's scripts/serve.py, measured in the same rounds. Everything binds 127.0.0.1 only.
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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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
            if t0 >= start and (t1 := time.perf_counter()) <= stop:  # sent after the warm-up, answered in time
                lat.append(t1 - t0)
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


# ---------------------------------------------------------------- checkpoints and queries


def synthetic_checkpoint(
    path: Path, n: int, dim: int, experts: int, seed: int, embedder: str | None = None, hidden: int = 512
) -> Path:
    """n clustered vectors cut into `experts` experts (one cluster each) and a centroid-initialised gate.

    `embedder` ("minilm" or "hashing") is saved with it, so text queries work (the search costs the same).
    """
    from moe_router import Router
    from moe_router.embed.registry import embedder_from_spec
    from moe_router.gate import initial_gate

    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((experts, dim)).astype(np.float32)
    spec = {"type": embedder, **({"dim": dim} if embedder == "hashing" else {})} if embedder else None
    router = Router(dim, "ip", embedder=embedder_from_spec(spec))
    for e in range(experts):
        xb = centers[e] + 0.9 * rng.standard_normal((n // experts, dim)).astype(np.float32)  # (n/E, d)
        router.add_expert(f"shard{e:02d}", vectors=xb)
    router.set_gate(initial_gate(router.experts, hidden_dims=[hidden], dropout=0.0))
    return router.save(path)


def query_texts(count: int, seed: int) -> list[str]:
    """Short texts from the demo corpus (one sentence each, as users ask), shuffled."""
    from importlib.resources import files

    rows = [json.loads(line)["text"] for line in files("moe_router.demo").joinpath("demo.jsonl").open()]
    rng = np.random.default_rng(seed)
    return [rows[i] for i in rng.integers(len(rows), size=count)]


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


def direct_worker(ckpt: Path, xq: np.ndarray | list[str], k: int, threads: int | None) -> None:
    """Answer 'per_query|batched C SECONDS TOP' lines on stdin with JSON timings (stays up between rounds).

    `xq` is query vectors or query texts: Router.search takes either (texts are embedded in the call).
    """
    from moe_router import Router

    set_threads(threads)
    router = Router.load(ckpt, verify=False)
    for x in xq[:32]:  # warm-up
        router.search(x, k=k, top_experts=1)
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        kind, c, seconds, top = line.split()
        lat = timed_calls(router, xq, k, int(top), kind, int(c), float(seconds), threads)
        print(json.dumps({"lat": lat, "seconds": float(seconds)}), flush=True)


def timed_calls(
    router: Any, xq: np.ndarray | list[str], k: int, top: int, kind: str, c: int, seconds: float, threads: int | None
) -> list[float]:
    """Latencies of Router.search calls for `seconds`: one query per call from c threads, or c queries per call."""
    lat: list[float] = []
    stop = time.perf_counter() + seconds
    if kind == "per_query":
        lock = threading.Lock()

        def loop(offset: int) -> None:
            set_threads(threads)  # FAISS's OpenMP setting is per thread
            mine, i = [], offset
            while (t0 := time.perf_counter()) < stop:
                router.search(xq[i % len(xq)], k=k, top_experts=top)
                if (t1 := time.perf_counter()) <= stop:  # as the load generator: calls that end in time
                    mine.append(t1 - t0)
                i += 1
            with lock:
                lat.extend(mine)

        workers = [threading.Thread(target=loop, args=(j * 97,)) for j in range(c)]
        for t in workers:
            t.start()
        for t in workers:
            t.join()
        return lat
    n = 0  # c queries per call: every query of a call waits for the whole call
    while (t0 := time.perf_counter()) < stop:
        start = (n * c) % (len(xq) - c)
        router.search(xq[start : start + c], k=k, top_experts=top)
        if (t1 := time.perf_counter()) <= stop:
            lat.append(t1 - t0)
        n += 1
    return lat


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


def spawn_server(ckpt: Path, batching: bool, run_dir: Path, extra: list[str], repo: Path = REPO) -> Server:
    """`repo`'s scripts/serve.py on a free loopback port, started (ready_server waits for it)."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "MOE_ROUTER_API_KEY"}
    if repo != REPO:  # another checkout: its own package, not the one installed or on this path
        env["PYTHONPATH"] = str(repo)
    run_dir.mkdir(parents=True, exist_ok=True)
    log = run_dir / "server.log"
    cmd = [
        sys.executable,
        str(repo / "scripts" / "serve.py"),
        f"ckpt={ckpt}",
        f"host={HOST}",
        f"port={port}",
        "log_level=warning",
        f"batching.enabled={str(batching).lower()}",
        f"hydra.run.dir={run_dir}",
        *extra,
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=open(log, "wb"), env=env)
    return Server(proc, port, log, (ckpt, batching, run_dir, extra, repo))


@dataclass
class Server:
    proc: subprocess.Popen
    port: int
    log: Path
    spawned_with: tuple  # spawn_server's arguments, to start it again


def ready_server(server: Server, tries: int = 2) -> Server:
    """`server` once /ready answers; started again once if it died (another process may have taken the port)."""
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and server.proc.poll() is None:
        try:
            with urllib.request.urlopen(f"http://{HOST}:{server.port}/ready", timeout=1):
                return server
        except OSError:
            time.sleep(0.3)
    server.proc.kill()
    server.proc.wait()
    if tries > 1:
        return ready_server(spawn_server(*server.spawned_with), tries - 1)
    raise RuntimeError(f"server did not start: {server.log.read_text()[-2000:]}")


def server_counters(port: int) -> dict:
    with urllib.request.urlopen(f"http://{HOST}:{port}/stats") as r:
        return json.load(r)["server"]


def load_point(port: int, bodies: Path, clients: int, seconds: float, warmup: float) -> dict:
    """One closed-loop run from a load-generator process, with the server's pass counters over it (GET /stats)."""
    before = server_counters(port)
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
    after = server_counters(port)
    point = json.loads(out.strip().splitlines()[-1])
    # warm-up passes included: the generator's clients all run the whole time, so passes look alike
    point["server"] = {k: after.get(k, 0) - before.get(k, 0) for k in ("passes", "queries", "pass_s", "embed_s")}
    return point


def summarize(parts: list[dict], queries_per_call: int = 1) -> dict:
    """Pool the rounds of one configuration: queries/s over all measured time, latency percentiles over all calls."""
    lat = np.concatenate([np.asarray(p["lat"], dtype=np.float64) for p in parts])
    seconds = sum(p["seconds"] for p in parts)
    if len(lat) == 0:
        return {"qps": 0.0, "p50_ms": float("nan"), "p99_ms": float("nan"), "calls": 0, "errors": 0}
    row = {
        "qps": queries_per_call * len(lat) / seconds,
        "p50_ms": 1e3 * float(np.percentile(lat, 50)),
        "p99_ms": 1e3 * float(np.percentile(lat, 99)),
        "calls": int(len(lat)),
        "errors": sum(p.get("errors", 0) for p in parts),
        "client_cpu_share": sum(p.get("client_cpu_s", 0.0) for p in parts) / seconds,
    }
    if all("server" in p for p in parts):
        passes = sum(p["server"]["passes"] for p in parts)
        pass_s = sum(p["server"]["pass_s"] for p in parts)
        row["queries_per_pass"] = sum(p["server"]["queries"] for p in parts) / passes if passes else 0.0
        row["embed_share"] = sum(p["server"]["embed_s"] for p in parts) / pass_s if pass_s > 0 else 0.0
    return row


def request_bodies(path: Path, queries: np.ndarray | list[str], k: int, top_experts: int) -> Path:
    """One POST /search body per line: a `vector` or a `text`."""
    field = "text" if isinstance(queries, list) else "vector"
    rows = [q if field == "text" else [round(float(v), 6) for v in q] for q in queries]
    path.write_text("\n".join(json.dumps({field: q, "k": k, "top_experts": top_experts}) for q in rows) + "\n")
    return path


def bench_checkpoint(label: str, ckpt: Path, args: argparse.Namespace, tmp: Path) -> dict:
    """The servers and the direct worker stay up; every round measures each configuration in turn.

    Vectors: micro-batched, one request per pass, [baseline], direct per query, direct batched, top_experts
    as asked. Texts: micro-batched, [baseline], direct per query, direct batched, at top-2 and at all experts.
    """
    from moe_router import Router

    router = Router.load(ckpt, verify=False)
    num_experts = router.num_experts
    router.close()
    if args.texts:
        queries: np.ndarray | list[str] = query_texts(512, args.seed)
        (tmp / "queries.json").write_text(json.dumps(queries))
        tops = sorted({min(2, num_experts), num_experts})
    else:
        queries = query_vectors(ckpt, 512, args.seed)
        np.save(tmp / "queries.npy", queries)
        tops = [args.top_experts]
    bodies = {t: request_bodies(tmp / f"bodies-{label}-{t}.jsonl", queries, args.k, t) for t in tops}
    clients = [int(c) for c in args.clients.split(",")]
    server_args = [*args.server_args, *([f"threads={args.threads}"] if args.threads else [])]
    http = {NAMES[0]: (True, REPO)}
    if not args.texts:
        http[NAMES[1]] = (False, REPO)
    if args.baseline:
        http[BASELINE] = (True, args.baseline)
    servers: dict[str, Server] = {}
    worker = None
    try:
        for name, (batching, repo) in http.items():  # all started at once, then waited for
            servers[name] = spawn_server(ckpt, batching, tmp / f"run-{label}-{len(servers)}", server_args, repo)
        query_file = tmp / ("queries.json" if args.texts else "queries.npy")
        worker = subprocess.Popen(
            [
                sys.executable,
                __file__,
                "--direct",
                str(ckpt),
                *(["--query-texts"] if args.texts else ["--xq"]),
                str(query_file),
                "--k",
                str(args.k),
                *(["--threads", str(args.threads)] if args.threads else []),
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            bufsize=1,
        )
        servers = {name: ready_server(server) for name, server in servers.items()}
        assert json.loads(worker.stdout.readline()) == {"ready": True}

        def direct(kind: str, c: int, top: int) -> dict:
            worker.stdin.write(f"{kind} {c} {slot} {top}\n")
            return json.loads(worker.stdout.readline())

        parts: dict[str, list[dict]] = {}
        slot = args.seconds / args.rounds
        for top in tops:
            for c in clients:
                for r in range(args.rounds):
                    warmup = args.warmup if r == 0 else 0.2
                    for name, server in servers.items():
                        point = load_point(server.port, bodies[top], c, slot, warmup)
                        parts.setdefault(key(name, c, top), []).append(point)
                    parts.setdefault(key(NAMES[2], c, top), []).append(direct("per_query", c, top))
                    parts.setdefault(key(NAMES[3], c, top), []).append(direct("batched", c, top))
                print(f"  {label}: top_experts={top}, {c} clients done", flush=True)
        rows: dict = {k: summarize(p, int(k.split("/")[1]) if k.startswith(NAMES[3]) else 1) for k, p in parts.items()}
        rows["ratio_http_batched_to_direct_batched"] = {
            f"{name}/top{top}": {
                str(c): rows[key(name, c, top)]["qps"] / max(rows[key(NAMES[3], c, top)]["qps"], 1e-9) for c in clients
            }
            for name in servers
            if name != NAMES[1]
            for top in tops
        }
        rows["server"] = server_counters(servers[NAMES[0]].port)
        if not args.texts and not args.no_expert_change:
            rows["expert_change"] = expert_change(servers[NAMES[0]].port, queries, bodies[tops[0]])
        rows["top_experts"] = tops
        return rows
    finally:
        for server in servers.values():
            server.proc.send_signal(signal.SIGTERM)
            server.proc.wait(60)
        if worker is not None:
            worker.kill()
            worker.wait()


def key(name: str, clients: int, top: int) -> str:
    return f"{name}/{clients}/top{top}"


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
BASELINE = "HTTP, micro-batched (baseline)"


def table(label: str, rows: dict, clients: list[int]) -> str:
    lines = [
        f"\n{label}\n",
        "| path | top | clients | queries/s | p50 ms | p99 ms | vs direct batched | queries/pass | embed share |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for top in rows["top_experts"]:
        for c in clients:
            base = rows[key(NAMES[3], c, top)]["qps"]
            for name in [NAMES[0], BASELINE, *NAMES[1:]]:
                r = rows.get(key(name, c, top))
                if r is None:
                    continue
                err = f" ({r['errors']} errors)" if r.get("errors") else ""
                per_pass = f"{r['queries_per_pass']:.1f}" if r.get("queries_per_pass") else ""
                share = f"{r['embed_share']:.0%}" if r.get("queries_per_pass") else ""
                lines.append(
                    f"| {name} | {top} | {c} | {r['qps']:.0f}{err} | {r['p50_ms']:.2f} | {r['p99_ms']:.2f} | "
                    f"{r['qps'] / base:.2f}x | {per_pass} | {share} |"
                )
    for path, by_clients in rows["ratio_http_batched_to_direct_batched"].items():
        shown = ", ".join(f"{c} clients {ratio:.2f}x" for c, ratio in by_clients.items())
        lines.append(f"\n{path}: HTTP micro-batched / direct batched: {shown}")
    shares = [r["client_cpu_share"] for k, r in rows.items() if k.startswith("HTTP") and "client_cpu_share" in r]
    if shares:
        lines.append(f"load generator: at most {max(shares):.0%} of a core (its own process)")
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
    p.add_argument("--texts", action="store_true", help="text queries: top-2 and all experts (MiniLM checkpoint)")
    p.add_argument(
        "--embedder", default="minilm", choices=["minilm", "hashing"], help="the synthetic checkpoint's embedder"
    )
    p.add_argument("--baseline", type=Path, help="also serve with this checkout's scripts/serve.py (before/after)")
    p.add_argument("--no-expert-change", action="store_true", help="skip the add/remove-under-load measurement")
    p.add_argument(
        "--smoke", action="store_true", help="seconds: a tiny checkpoint, 1 and 4 clients, vectors and texts"
    )
    p.add_argument("--server-args", nargs="*", default=[], help="extra Hydra overrides for scripts/serve.py")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path)
    p.add_argument("--generate", type=int, help=argparse.SUPPRESS)  # internal: be the load generator on this port
    p.add_argument("--bodies", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--direct", type=Path, help=argparse.SUPPRESS)  # internal: time direct calls on this checkpoint
    p.add_argument("--xq", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--query-texts", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.generate:
        print(json.dumps(generate(args.generate, args.bodies, int(args.clients), args.seconds, args.warmup)))
        return 0
    if args.direct:
        xq = json.loads(args.query_texts.read_text()) if args.query_texts else np.load(args.xq)
        direct_worker(args.direct, xq, args.k, args.threads)
        return 0
    if args.smoke:
        args.synthetic, args.dim, args.experts, args.embedder = 4000, 32, 4, "hashing"
        args.clients, args.seconds, args.rounds, args.warmup, args.threads = "1,4", 0.4, 1, 0.2, 1
        args.no_expert_change = True
    if not args.ckpt and not args.synthetic:
        p.error("give --ckpt, --synthetic N, or both (or --smoke)")
    report = {
        "machine": f"{os.cpu_count()} CPUs, load average at start {os.getloadavg()[0]:.1f}",
        "threads": args.threads,
        "rounds": args.rounds,
        "seconds": args.seconds,
        "k": args.k,
        "top_experts": args.top_experts,
        "baseline": str(args.baseline) if args.baseline else None,
        "checkpoints": {},
    }
    clients = [int(c) for c in args.clients.split(",")]
    with tempfile.TemporaryDirectory(prefix="moe_load_") as tmp:
        tmp = Path(tmp)
        todo = []
        if args.ckpt:
            shutil.copytree(args.ckpt, tmp / "trained")  # serving saves into it (stats, changes): leave the original
            todo.append((f"trained checkpoint {args.ckpt.name}", tmp / "trained"))
        if args.synthetic:
            t0 = time.perf_counter()
            embedder = args.embedder if args.texts or args.smoke else None
            hidden = 16 if args.smoke else 512
            ck = synthetic_checkpoint(
                tmp / "synthetic", args.synthetic, args.dim, args.experts, args.seed, embedder, hidden
            )
            print(f"built a synthetic checkpoint in {time.perf_counter() - t0:.0f} s", flush=True)
            todo.append((f"synthetic {args.synthetic} x {args.dim}, {args.experts} experts", ck))
        modes = [False, True] if args.smoke else [args.texts]
        for label, ckpt in todo:
            for texts in modes:
                args.texts = texts
                rows = bench_checkpoint(label.split()[0], ckpt, args, tmp)
                name = f"{label}, {'texts' if texts else 'vectors'}"
                report["checkpoints"][name] = rows
                print(table(name, rows, clients), flush=True)
    report["load_average_at_end"] = os.getloadavg()[0]
    print(
        f"\n{report['machine']}; at end {report['load_average_at_end']:.1f}; k={args.k}, {args.seconds:g} s per point"
    )
    if args.out:
        args.out.write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
