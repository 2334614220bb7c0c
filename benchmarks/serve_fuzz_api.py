"""Property-based fuzz of the HTTP API from its own OpenAPI schema (schemathesis), on loopback,
plus what a web browser could send: content types and origins.

    python benchmarks/serve_fuzz_api.py                                   # synthetic checkpoint
    python benchmarks/serve_fuzz_api.py --ckpt /tmp/serve_demo --max-examples 100 --out /tmp/st.json

Starts scripts/serve.py on a copy of the checkpoint (the stateful phase adds and removes experts
and records feedback; auth.allowed_origins names one extra origin) and runs three phases:

1. `schemathesis run` with every check but positive_data_acceptance (it flags rules JSON Schema
   cannot state: k at most the stored vectors, top_experts at most the experts, one metadata entry
   per vector);
2. `schemathesis run` again with a foreign `Origin` header on every request: every POST and DELETE
   must answer 403 and the checkpoint on disk must not change (a cross-site page cannot drive it);
3. a hypothesis run of valid bodies for every POST/DELETE operation sent with random content types
   and origins (same-origin, allowed, foreign, "null", malformed, random text), checked against an
   oracle: foreign origin -> 403, a POST not declared application/json (UTF-8) -> 415, a refused
   request changes nothing on disk or in the expert set, and nothing answers 5xx.

Prints the cases and 5xx answers of each phase. Exit status: 0 when no phase found a failure.
"""

from __future__ import annotations

import argparse
import hashlib
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
from typing import Any

REPO = Path(__file__).resolve().parents[1]
EXCLUDED_CHECKS = "positive_data_acceptance"
ALLOWED_ORIGIN = "http://allowed.example:3000"  # given to the server in auth.allowed_origins
FOREIGN_ORIGIN = "http://evil.example"


def synthetic_checkpoint(path: Path, metric: str = "ip") -> Path:
    import numpy as np

    from moe_router import HashingEmbedder, Router
    from moe_router.gate import initial_gate

    router = Router(64, metric, embedder=HashingEmbedder(64))
    rng = np.random.default_rng(0)
    for name, words in {
        "security": "password token auth login",
        "frontend": "css flexbox layout grid",
        "databases": "sql index join table",
        "devops": "docker deploy build helm",
    }.items():
        vocab = words.split()
        router.add_expert(name, texts=[" ".join(rng.choice(vocab, 3)) + f" {i}" for i in range(30)])
    router.set_gate(initial_gate(router.experts, hidden_dims=[], dropout=0.0))
    return router.save(path)


def start_server(ckpt: Path, run_dir: Path, log: Path) -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if k != "MOE_ROUTER_API_KEY"}
    proc = subprocess.Popen(
        [
            sys.executable,
            str(REPO / "scripts" / "serve.py"),
            f"ckpt={ckpt}",
            f"port={port}",
            "log_level=error",
            f"hydra.run.dir={run_dir}",
            f'auth.allowed_origins=["{ALLOWED_ORIGIN}"]',
        ],
        stdout=subprocess.DEVNULL,
        stderr=open(log, "wb"),
        env=env,
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


def tree_digest(root: Path) -> str:
    """sha256 over every file's path and bytes under `root` (the checkpoint, its store and WAL included)."""
    h = hashlib.sha256()
    for f in sorted(p for p in root.rglob("*") if p.is_file()):
        h.update(str(f.relative_to(root)).encode() + b"\0" + f.read_bytes())
    return h.hexdigest()


def schemathesis(
    url: str, tmp: Path, args: argparse.Namespace, name: str, extra: list[str], phases: str
) -> tuple[dict, Any]:
    """One `schemathesis run`; (its JSON report, the finished process), with a HAR of every exchange."""
    report, har = tmp / f"{name}.json", tmp / f"{name}.har"
    cmd = [
        str(Path(sys.executable).parent / "schemathesis"),
        "run",
        f"{url}/openapi.json",
        "--checks",
        "all",
        "--exclude-checks",
        EXCLUDED_CHECKS,
        "-n",
        str(args.max_examples),
        "--seed",
        str(args.seed),
        "--phases",
        phases,
        "--no-color",
        "--report",
        "json,har",
        "--report-json-path",
        str(report),
        "--report-har-path",
        str(har),
        "--generation-database",
        "none",
        *extra,
    ]
    if args.max_time:
        cmd += ["--max-time", str(args.max_time)]
    st = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp)
    print(st.stdout[-6000:])
    result = json.loads(report.read_text())
    result["exchanges"] = [
        (e["request"]["method"], e["response"]["status"]) for e in json.loads(har.read_text())["log"]["entries"]
    ]
    return result, st


def _oracle(method: str, content_type: str | None, origin: str | None, own: set[str]) -> int | None:
    """The status the server must give, written apart from its code: 403, 415, or None (not refused)."""
    if origin is not None and origin.strip().lower().rstrip("/") not in own | {ALLOWED_ORIGIN}:
        return 403
    if method == "POST":
        media, _, params = (content_type or "").partition(";")
        charsets = [
            v.strip().strip('"').lower()
            for k, _, v in (p.partition("=") for p in params.split(";"))
            if k.strip().lower() == "charset"
        ]
        if media.strip().lower() != "application/json" or charsets not in ([], ["utf-8"]):
            return 415
    return None


def browser_phase(url: str, ckpt: Path, cases: int, seed: int) -> dict:
    """Valid bodies with random content types and origins, against the oracle (see the module docstring)."""
    import httpx
    from hypothesis import HealthCheck, given, settings
    from hypothesis import seed as hyp_seed
    from hypothesis import strategies as st

    host = url.split("://", 1)[1]
    own = {f"http://{host}", f"https://{host}"}  # the server's own origin (the scheme may differ behind a proxy)
    json_types = [
        "application/json",
        "application/json; charset=utf-8",
        "APPLICATION/JSON",
        'application/json;charset="UTF-8"',
    ]
    other_types = [
        "text/plain",
        "text/plain; charset=utf-8",
        "application/x-www-form-urlencoded",
        "multipart/form-data; boundary=x",
        "application/json; charset=latin-1",
        "application/xml",
        "application/jsonx",
        "text/json",
        "application/merge-patch+json",
        "",
    ]
    header_text = st.text(st.characters(min_codepoint=32, max_codepoint=126), max_size=40).map(
        str.strip
    )  # h11 refuses edge blanks
    content_types = st.one_of(st.sampled_from(json_types + other_types), header_text, st.none())
    origins = st.one_of(
        st.sampled_from(
            [
                None,
                *own,
                ALLOWED_ORIGIN,
                FOREIGN_ORIGIN,
                "null",
                "http://127.0.0.1:1",
                f"http://{host}/path",
                "HTTP://EVIL.EXAMPLE",
                f"{ALLOWED_ORIGIN}/",
                "file://",
                "garbage",
            ]
        ),
        header_text,
    )
    counts = {
        "cases": 0,
        "refused_403": 0,
        "refused_415": 0,
        "accepted_2xx": 0,
        "other_4xx": 0,
        "5xx": 0,
        "wrong_status": 0,
        "changed_by_refused": 0,
    }
    failures: list[str] = []
    http = httpx.Client(base_url=url, timeout=60)

    def body_for(op: str, rnd: Any) -> tuple[str, str, dict | None]:
        experts = [e["name"] for e in http.get("/experts").json()["experts"]]
        name = f"x{rnd.randrange(10**9)}"
        text = rnd.choice(["password token", "sql join", "docker helm", "css grid"])
        return {
            "route": ("POST", "/route", {"text": text}),
            "search": ("POST", "/search", {"text": text, "k": 2}),
            "feedback": ("POST", "/feedback", {"text": text, "expert": experts[0], "positive": True}),
            "add": ("POST", "/experts", {"name": name, "texts": [f"{text} {i}" for i in range(3)]}),
            "merge": (
                "POST",
                "/merge",
                {"a": experts[-2], "b": experts[-1], "name": name}
                if len(experts) > 3
                else {"a": experts[0], "b": "missing"},
            ),
            "split": ("POST", "/split", {"name": experts[-1], "names": [name, name + "b"]}),
            "remove": ("DELETE", f"/experts/{experts[-1]}" if len(experts) > 3 else "/experts/missing", None),
        }[op]

    @hyp_seed(seed)
    @settings(max_examples=cases, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(
        op=st.sampled_from(["route", "search", "feedback", "add", "merge", "split", "remove"]),
        content_type=content_types,
        origin=origins,
        rnd=st.randoms(use_true_random=False),
    )
    def case(op: str, content_type: str | None, origin: str | None, rnd: Any) -> None:
        method, path, body = body_for(op, rnd)
        headers = {k: v for k, v in (("content-type", content_type), ("origin", origin)) if v is not None}
        want = _oracle(method, content_type, origin, own)
        before = (tree_digest(ckpt), http.get("/experts").json()) if want else None
        r = http.request(method, path, content=json.dumps(body).encode() if body is not None else None, headers=headers)
        counts["cases"] += 1
        key = (
            "5xx"
            if r.status_code >= 500
            else f"refused_{r.status_code}"
            if r.status_code in (403, 415)
            else "accepted_2xx"
            if r.status_code < 300
            else "other_4xx"
        )
        counts[key] += 1
        if r.status_code >= 500 or (want or 0) != (r.status_code if r.status_code in (403, 415) else 0):
            counts["wrong_status"] += r.status_code < 500
            failures.append(
                f"{method} {path} content-type={content_type!r} origin={origin!r}: "
                f"{r.status_code} (expected {want or 'not 403/415'}) {r.text[:200]}"
            )
        if before is not None and (tree_digest(ckpt), http.get("/experts").json()) != before:
            counts["changed_by_refused"] += 1
            failures.append(f"{method} {path} content-type={content_type!r} origin={origin!r} changed the checkpoint")

    try:
        case()
    finally:
        http.close()
    return {**counts, "failures": failures[:20]}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--ckpt", type=Path, help="checkpoint to serve (a copy); default: a synthetic one")
    p.add_argument(
        "--metric",
        choices=("ip", "l2"),
        default="ip",
        help="the synthetic checkpoint's metric "
        "(l2: unnormalised vectors, where float32 overflow can reach the index and the gate)",
    )
    p.add_argument("--max-examples", type=int, default=50, help="cases per operation and phase")
    p.add_argument("--phases", default="examples,coverage,fuzzing,stateful")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-time", type=int, default=None, help="seconds for each schemathesis run")
    p.add_argument("--browser-cases", type=int, default=300, help="content-type x origin cases (phase 3)")
    p.add_argument("--out", type=Path, help="write the JSON results (schemathesis's reports, phase 3 counts) here")
    args = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="moe_st_") as tmp:
        tmp = Path(tmp)
        ckpt = tmp / "ckpt"
        if args.ckpt:
            shutil.copytree(args.ckpt, ckpt)
        else:
            synthetic_checkpoint(ckpt, args.metric)
        server_log = tmp / "server.log"
        proc, url = start_server(ckpt, tmp / "run", server_log)
        try:
            result, st = schemathesis(url, tmp, args, "schema", [], args.phases)
            digest = tree_digest(ckpt)
            # No stateful phase: under a foreign Origin nothing can be created for it to follow.
            foreign_phases = ",".join(ph for ph in args.phases.split(",") if ph != "stateful")
            foreign, st_foreign = schemathesis(
                url, tmp, args, "foreign", ["-H", f"Origin: {FOREIGN_ORIGIN}"], foreign_phases
            )
            foreign["unchanged"] = tree_digest(ckpt) == digest
            browser = browser_phase(url, ckpt, args.browser_cases, args.seed)
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(30)
        logged_500s = server_log.read_text().count("unhandled error")
    ok = True
    for name, res, run in (("schema", result, st), ("foreign origin", foreign, st_foreign)):
        server_errors = sum(1 for _, code in res["exchanges"] if code >= 500)
        writes = [code for method, code in res["exchanges"] if method in ("POST", "DELETE")]
        res["summary"] = {
            "cases": res["test_cases"]["generated"],
            "requests": len(res["exchanges"]),
            "5xx": server_errors,
            "post_delete": len(writes),
            "post_delete_403": writes.count(403),
        }
        print(
            f"phase {name}: schemathesis {res['schemathesis_version']}: {res['test_cases']['generated']} cases, "
            f"{len(res['exchanges'])} requests over {res['operations']['tested']} operations; failures: "
            f"{ {f['code']: f['count'] for f in res['failures']} }; 5xx answers: {server_errors}"
        )
        ok &= run.returncode == 0 and server_errors == 0
    # Under a foreign Origin only a 403 (or 405: the method is not served at that path) may answer a write.
    strays = [(m, c) for m, c in foreign["exchanges"] if m in ("POST", "DELETE") and c not in (403, 405)]
    ok &= not strays and foreign["unchanged"]
    print(
        f"phase foreign origin: {foreign['summary']['post_delete']} POST/DELETE requests, "
        f"{foreign['summary']['post_delete_403']} answered 403 (the rest 405), {len(strays)} answered otherwise "
        f"{strays[:5]}; checkpoint unchanged: {foreign['unchanged']}"
    )
    print(f"phase browser: {json.dumps({k: v for k, v in browser.items() if k != 'failures'})}")
    for f in browser["failures"]:
        print("  ", f)
    ok &= not browser["failures"]
    print(f"server log: {logged_500s} unhandled errors")
    ok &= logged_500s == 0
    if args.out:
        args.out.write_text(
            json.dumps(
                {"schema": result, "foreign_origin": foreign, "browser": browser, "server_log_500s": logged_500s},
                indent=2,
            )
        )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
