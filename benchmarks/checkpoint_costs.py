"""What the checkpoint format costs: save, load and the server's feedback-through-save, on one machine in one run.

    python benchmarks/checkpoint_costs.py --n 200000 --experts 16 --dim 384 --out /tmp/ckpt_costs.json

Builds a seeded router (no texts: the vectors dominate), then times, best of --repeats:
save (all files written), save again after adding one small expert (unchanged experts linked,
sha256-rechecked; and stat-checked), Router.load with verification, and a served feedback write
(RouterState.record_feedback: the row plus a save of the new version), alone and from 8 clients
at once (rows that arrive during a save share the next one). Run it with PYTHONPATH at
another checkout to time that checkout's code on the same machine (feedback is then the format-1
SQLite commit, and the stat-checked save does not exist).
"""

from __future__ import annotations

import argparse
import inspect
import json
import shutil
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

import moe_router
from moe_router import Router
from moe_router.checkpoint.io import save_router
from moe_router.gate import initial_gate
from moe_router.serving import RouterState


def best(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n", type=int, default=200_000, help="vectors in all")
    p.add_argument("--experts", type=int, default=16)
    p.add_argument("--dim", type=int, default=384)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--feedback", type=int, default=20, help="served feedback writes timed (median reported)")
    p.add_argument("--out", type=Path)
    p.add_argument("--smoke", action="store_true", help="toy sizes, in seconds (the tests run it)")
    args = p.parse_args()
    if args.smoke:
        args.n, args.experts, args.dim, args.repeats, args.feedback = 2000, 4, 16, 1, 2
    rng = np.random.default_rng(0)
    router = Router(args.dim, "ip")
    for e in range(args.experts):
        router.add_expert(
            f"shard{e:02d}", vectors=rng.standard_normal((args.n // args.experts, args.dim)).astype(np.float32)
        )
    router.set_gate(initial_gate(router.experts, hidden_dims=[64], dropout=0.0))
    stat_save = "recheck" in inspect.signature(Router.save).parameters
    out: dict = {
        "code": str(Path(moe_router.__file__).parent),
        "n": router.ntotal,
        "experts": args.experts,
        "dim": args.dim,
    }
    with tempfile.TemporaryDirectory(dir="/tmp") as tmp:
        ckpt = Path(tmp) / "ckpt"

        def save_all() -> None:
            shutil.rmtree(ckpt, ignore_errors=True)
            save_router(router, ckpt, link=False)

        out["save_all_s"] = best(save_all, args.repeats)
        small = rng.standard_normal((100, args.dim)).astype(np.float32)

        def save_after_add() -> None:
            router.add_expert("extra", vectors=small, fit_row=False)
            router.save(ckpt)
            router.remove_expert("extra")

        out["save_after_add_rehashed_s"] = best(save_after_add, args.repeats)
        if stat_save:

            def save_after_add_stat() -> None:
                router.add_expert("extra", vectors=small, fit_row=False)
                router.save(ckpt, recheck=False)
                router.remove_expert("extra")

            out["save_after_add_stat_checked_s"] = best(save_after_add_stat, args.repeats)
        router.save(ckpt)
        out["load_verified_s"] = best(lambda: Router.load(ckpt), args.repeats)
        state = RouterState(ckpt)
        xq = rng.standard_normal((args.feedback, args.dim)).astype(np.float32)
        times = []
        for q in xq:
            t = time.perf_counter()
            state.record_feedback(q, "shard00", True)
            times.append(time.perf_counter() - t)
        t = time.perf_counter()  # 8 clients at once: rows arriving during a save share the next one
        clients = [
            threading.Thread(target=lambda c=c: [state.record_feedback(q, "shard01", c % 2 == 0) for q in xq])
            for c in range(8)
        ]
        for c in clients:
            c.start()
        for c in clients:
            c.join()
        out["served_feedback_8_clients_per_s"] = 8 * len(xq) / (time.perf_counter() - t)
        state.close()
        out["served_feedback_median_s"] = float(np.median(times))
        out["served_feedback_max_s"] = float(np.max(times))
        out["feedback_rows_after_reload"] = len(Router.load(ckpt).feedback())
    print(json.dumps(out, indent=2))
    if args.out:
        args.out.write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
