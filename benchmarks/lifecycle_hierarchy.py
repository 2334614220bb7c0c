"""Hierarchy (issue 4, measurement 5): 150 CLINC150 intent experts under their 10 domain parents.

    python benchmarks/lifecycle_hierarchy.py [--cache-dir reports/tmp/lifecycle_hybrid]

One gate over the 150 intent experts (parent = domain), trained like any router (cached in
--cache-dir). On the test split:
  flat        leaf = the gate's top expert; parent = that expert's parent
  two-level   parent = the group with the largest summed child probability (route_two_level);
              leaf = its most probable child
  two-level, domain gate   (a comparison, not a library mode) parent from the separately trained
              10-domain router (the add benchmark's full retrain), leaf = that parent's most
              probable child in the 150-expert gate
Leaf and parent acc@1, and recall@10 of searching 2 leaf experts (flat: the top 2; two-level:
the top 2 children of the top parent) against an exhaustive search.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from lifecycle_common import CLINC, add_smoke_flag, apply_smoke, clinc, embedder, exact_top10, trained

from moe_router import lifecycle
from moe_router.metrics import overlap_at_k, top_experts


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", default=str(CLINC))
    p.add_argument("--cache-dir", default="reports/tmp/lifecycle_hybrid")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None)
    add_smoke_flag(p)
    args = p.parse_args()
    apply_smoke(args)

    emb = embedder()
    ds = clinc(args.data, expert_key="label", parent_key="domain")
    dd = clinc(args.data)
    test = ds.split("test")
    cache = Path(args.cache_dir)
    leaves, t_leaf, _ = trained(cache / "clinc150-intents", ds, emb, args.seed)
    domains, _, _ = trained(cache / "clinc150-10", dd, emb, args.seed)

    xq = emb.encode([r.text for r in test])
    leaf_gold = np.array([leaves.expert_indices([r.label])[0] for r in test])
    parent_of = np.array([e.parent for e in leaves.experts])
    parent_gold = np.array([r.domain for r in test])
    exact = exact_top10(leaves, xq)

    probs = leaves.gate_probs(xq)  # (n, 150)
    rows = {}
    flat_top = top_experts(probs, 2)
    rows["flat"] = (flat_top[:, 0], parent_of[flat_top[:, 0]], flat_top)

    two = lifecycle.route_two_level(leaves, xq, top_parents=1, top_children=2, record=False)
    rows["two-level (summed children)"] = (two.top[:, 0], np.array(two.parents)[two.top_parents[:, 0]], two.top)

    dprobs = domains.gate_probs(xq)  # (n, 10)
    dparent = np.array(domains.expert_names)[dprobs.argmax(1)]
    inside = np.where(parent_of[None, :] == dparent[:, None], probs, -1.0)
    dtop = top_experts(inside, 2)
    rows["two-level (10-domain gate)"] = (dtop[:, 0], dparent, dtop)

    print(
        f"\nCLINC150 test ({len(test)} queries): {leaves.num_experts} intent experts under "
        f"{len(set(parent_of))} domain parents; recall@10 searching 2 leaf experts vs exhaustive"
    )
    print(f"{'routing':<30}{'leaf acc@1':>11}{'parent acc@1':>13}{'recall@10@2':>12}")
    out = {}
    for name, (leaf, parent, top2) in rows.items():
        res = leaves.search_experts(xq, 10, top2)
        out[name] = {
            "leaf acc@1": float((leaf == leaf_gold).mean()),
            "parent acc@1": float((parent == parent_gold).mean()),
            "recall@10@2": overlap_at_k(res.I, exact),
        }
        print(
            f"{name:<30}{out[name]['leaf acc@1']:>11.4f}{out[name]['parent acc@1']:>13.4f}"
            f"{out[name]['recall@10@2']:>12.4f}"
        )
    print(f"(150-expert gate: full training {t_leaf.seconds:.0f} s wall / {t_leaf.cpu_seconds:.0f} s CPU)")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
