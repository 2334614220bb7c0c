"""Property-based fuzz of the HTTP API from its own OpenAPI schema (schemathesis), on loopback.

    python benchmarks/serve_fuzz_api.py                                   # synthetic checkpoint
    python benchmarks/serve_fuzz_api.py --ckpt /tmp/serve_demo --max-examples 100 --out /tmp/st.json

Starts scripts/serve.py on a copy of the checkpoint (the stateful phase adds and removes experts
and records feedback), runs `schemathesis run` with every check but positive_data_acceptance
(it flags rules JSON Schema cannot state: k at most the stored vectors, top_experts at most the
experts, one metadata entry per vector) and prints how many cases ran and how many got a 5xx.
Exit status: schemathesis's (0 = no failure).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
EXCLUDED_CHECKS = "positive_data_acceptance"


def synthetic_checkpoint(path: Path) -> Path:
    import numpy as np

    from moe_router import HashingEmbedder, Router

    router = Router(64, "ip", embedder=HashingEmbedder(64))
    rng = np.random.default_rng(0)
    for name, words in {"security": "password token auth login", "frontend": "css flexbox layout grid",
                        "databases": "sql index join table", "devops": "docker deploy build helm"}.items():
        vocab = words.split()
        router.add_expert(name, texts=[" ".join(rng.choice(vocab, 3)) + f" {i}" for i in range(30)])
    router.init_gate(hidden_dims=[], dropout=0.0)
    return router.save(path)


def start_server(ckpt: Path, run_dir: Path, log: Path) -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if k != "MOE_ROUTER_API_KEY"}
    proc = subprocess.Popen(
        [sys.executable, str(REPO / "scripts" / "serve.py"), f"ckpt={ckpt}", f"port={port}", "log_level=error",
         f"hydra.run.dir={run_dir}"],
        stdout=subprocess.DEVNULL, stderr=open(log, "wb"), env=env,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited: {log.read_text()[-2000:]}")
        try:
            with urllib.request.urlopen(f"{url}/ready", timeout=1) as r:
                if r.status == 200:
                    return proc, url
        except OSError:
            time.sleep(0.2)
    proc.kill()
    raise RuntimeError("server did not become ready")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--ckpt", type=Path, help="checkpoint to serve (a copy); default: a synthetic one")
    p.add_argument("--max-examples", type=int, default=50, help="cases per operation and phase")
    p.add_argument("--phases", default="examples,coverage,fuzzing,stateful")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-time", type=int, default=None, help="seconds for the whole schemathesis run")
    p.add_argument("--out", type=Path, help="write schemathesis's JSON report here")
    args = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="moe_st_") as tmp:
        tmp = Path(tmp)
        ckpt = tmp / "ckpt"
        if args.ckpt:
            shutil.copytree(args.ckpt, ckpt)
        else:
            synthetic_checkpoint(ckpt)
        server_log = tmp / "server.log"
        proc, url = start_server(ckpt, tmp / "run", server_log)
        report = tmp / "report.json"
        cmd = [str(Path(sys.executable).parent / "schemathesis"), "run", f"{url}/openapi.json", "--checks", "all",
               "--exclude-checks", EXCLUDED_CHECKS, "-n", str(args.max_examples), "--seed", str(args.seed),
               "--phases", args.phases, "--no-color", "--report", "json", "--report-json-path", str(report),
               "--generation-database", "none"]
        if args.max_time:
            cmd += ["--max-time", str(args.max_time)]
        try:
            st = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp)
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(30)
        print(st.stdout[-6000:])
        result = json.loads(report.read_text())
        server_errors = sum(f["count"] for f in result["failures"] if f["code"] in ("ST101", "ST102"))
        logged_500s = server_log.read_text().count("unhandled error")
        print(f"schemathesis {result['schemathesis_version']}: {result['test_cases']['generated']} cases over "
              f"{result['operations']['tested']} operations; failures: "
              f"{ {f['code']: f['count'] for f in result['failures']} }; 5xx answers: {server_errors} "
              f"(server log: {logged_500s} unhandled errors)")
        if args.out:
            args.out.write_text(json.dumps(result, indent=2))
        return st.returncode


if __name__ == "__main__":
    sys.exit(main())
