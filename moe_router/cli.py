"""`moe-router`: route and search with a trained checkpoint from the terminal.

moe-router route  --ckpt checkpoints/demo "How do I fix an auth bug?" "Flexbox centering"
moe-router search --ckpt checkpoints/demo -k 3 --top-experts 2 "How do I fix an auth bug?"
moe-router search --ckpt checkpoints/demo -k 3 --top-experts 2 --per-expert "How do I fix an auth bug?"
moe-router search --ckpt checkpoints/demo -k 3 --top-p 0.9 --max-experts 4 "How do I fix an auth bug?"
moe-router stats  --ckpt checkpoints/demo
moe-router search --ckpt checkpoints/demo --backend ray --ray-address auto "How do I fix an auth bug?"
"""

from __future__ import annotations

import argparse
import sys

from moe_router.errors import CheckpointError
from moe_router.logs import quiet_libraries
from moe_router.routing.router import Router
from moe_router.types import SearchParams


def search_params(args: argparse.Namespace) -> SearchParams:
    """The search options of the command line as the one checked record (ValueError naming the option)."""
    options = {"top_experts": args.top_experts, "top_p": args.top_p, "max_experts": args.max_experts}
    if args.command == "search":
        options.update(
            k=args.k, per_expert=args.per_expert, prior_weight=args.prior_weight, decide_weight=args.decide_weight
        )
    return SearchParams(**options)


def confidence(p: float) -> str:
    """A probability for people: three decimals, but never a rounded 1.000 or 0.000 that was not exact."""
    if 0.9995 <= p < 1.0:
        return "> 0.999"
    if 0.0 < p < 0.0005:
        return "< 0.001"
    return f"{p:.3f}"


def _print_routes(router: Router, queries: list[str], params: SearchParams) -> None:
    for query, routes in zip(queries, router.route(queries, params)):
        print(f'\nQuery: "{query}"')
        for r in routes:
            print(f"  {r.expert:<24} confidence {confidence(r.probability)}")


def _print_hits(router: Router, queries: list[str], params: SearchParams) -> None:
    for query, hits in zip(queries, router.search(queries, params)):
        print(f'\nQuery: "{query}"')
        if hits.missing_experts:  # a Ray expert actor that did not answer: the hits are the others'
            print(f"  (no answer from {', '.join(hits.missing_experts)}: hits from the other experts only)")
        by_expert: dict[str, list] = {}
        for h in hits:
            by_expert.setdefault(h.expert, []).append(h)
        for expert, group in by_expert.items():
            print(f"  {expert} (confidence {confidence(group[0].routing_score)}):")
            for i, h in enumerate(group, 1):
                text = (h.text or f"id {h.id}")[:70]
                print(f"    {i}. {text}\n       score {h.score:.4f}")


def _print_stats(router: Router) -> None:
    stats = router.stats()
    width = max(len(s.name) for s in stats)
    for s in stats:
        bar = "█" * int(round(s.load_share * 50))
        print(
            f"{s.name:<{width}} {bar} {100 * s.load_share:5.1f}%  queries {s.queries}, "
            f"mean confidence {s.mean_confidence:.3f}, vectors {s.vectors}"
        )


def main(argv: list[str] | None = None) -> int:
    quiet_libraries()
    parser = argparse.ArgumentParser(prog="moe-router", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name in ("route", "search", "stats"):
        p = sub.add_parser(name)
        p.add_argument("--ckpt", required=True, help="checkpoint directory written by scripts/train.py")
        p.add_argument(
            "--backend",
            choices=("local", "ray"),
            default="local",
            help="where the experts live: this process, or Ray actors (pip install -e '.[ray]')",
        )
        p.add_argument(
            "--ray-address", default=None, help="Ray cluster to join with --backend ray (default: start one)"
        )
        if name != "stats":
            p.add_argument("queries", nargs="+", help="query texts")
            p.add_argument("--top-experts", type=int, default=2, help="experts searched per query")
            p.add_argument(
                "--top-p",
                type=float,
                default=None,
                help="adaptive: the fewest experts whose calibrated probability reaches this mass (0 < p <= 1)",
            )
            p.add_argument("--max-experts", type=int, default=4, help="with --top-p: the most experts per query")
        if name == "search":
            p.add_argument("-k", type=int, default=3, help="hits per query (per expert with --per-expert)")
            p.add_argument("--per-expert", action="store_true", help="k hits from each searched expert, not k in all")
            p.add_argument(
                "--prior-weight",
                type=float,
                default=None,
                help="merge hits by score + w * log p(expert) (default: the checkpoint's; 0 = by score)",
            )
            p.add_argument(
                "--decide-weight",
                type=float,
                default=None,
                help="> 0: keep one searched expert's hits, re-decided from them (default: the checkpoint's)",
            )
    args = parser.parse_args(argv)
    try:
        params = search_params(args) if args.command != "stats" else None  # checked before anything is loaded
        router = Router.load(args.ckpt, backend=args.backend, ray_address=args.ray_address)
        if args.command == "route":
            _print_routes(router, args.queries, params)
        elif args.command == "search":
            _print_hits(router, args.queries, params)
        else:
            _print_stats(router)
    except (CheckpointError, ValueError, KeyError, ImportError) as exc:
        print(f"moe-router: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
