"""Load one checkpoint in this fresh process and print the time and resident memory as JSON.

    python benchmarks/load_probe.py CKPT [--no-verify]

Used by benchmarks/speed_1m.py: the process does nothing but import the library and load, so its
peak resident memory (VmHWM) is the cost of a load. Memory in kB from /proc/self/status.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


def memory_kb() -> dict[str, int]:
    """VmRSS, VmHWM (peak resident), RssAnon and RssFile of this process, in kB."""
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
            out[key] = int(value.split()[0])
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("ckpt", type=Path, help="checkpoint directory written by Router.save")
    parser.add_argument("--no-verify", dest="verify", action="store_false", help="skip the sha256 check of every file")
    args = parser.parse_args()

    from moe_router.routing.router import Router

    before = memory_kb()
    start = time.perf_counter()
    router = Router.load(args.ckpt, verify=args.verify)
    seconds = time.perf_counter() - start
    after = memory_kb()
    print(
        json.dumps(
            {
                "verify": args.verify,
                "seconds": seconds,
                "vectors": router.ntotal,
                "dim": router.dim,
                "before_kb": before,
                "after_kb": after,
            }
        )
    )


if __name__ == "__main__":
    main()
