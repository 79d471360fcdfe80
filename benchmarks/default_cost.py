"""Unlearning wall-clock of TRUST configurations against each other, measured in one process.

Issue #16 bounds the robust default's cost: unlearning wall-clock at most 1.5x the default it
replaced (`trust-lite`: no adversary, 2 cached images per prompt at 10 DDIM steps), both measured
on the same machine. This runs each named configuration (compare_methods' methods and
`--variant`s) on the built-in shapes model, interleaved round by round (the order rotates every
round, so drift in the machine's load falls on every contender alike); a round trains every
contender with the same seed. Wall-clock is the unlearner's own clock: the data-free image cache
plus the steps, evaluation excluded. Prints per contender the median seconds, image-cache and
adversary seconds, and the median over rounds of its time over the first contender's in the same
round; writes `results/default_cost.json`.

    python benchmarks/default_cost.py --methods trust-lite,trust --rounds 3
    python benchmarks/default_cost.py --methods trust-lite,trust,trust-tok --variant trust-tok:adv_mode=tokens
"""
from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import compare_methods  # noqa: E402  (its method names, variants and one-line refusals)


def measure(pipe, concept: str, method: str, seed: int) -> dict:
    """One unlearning run of `method` on a copy of `pipe`: its clock and the parts of it."""
    from trust_fast import TrustUnlearner

    u = TrustUnlearner(copy.deepcopy(pipe), concept, compare_methods.method_config(method, seed=seed))
    u.run(progress=False)
    return {"method": method, "seed": seed, "seconds": u.seconds, "cache_seconds": u.pool_seconds,
            "adversary_seconds": u.adv_seconds, "steps": u.step_count}


def summarize(runs: list[dict], methods: list[str]) -> list[dict]:
    """Per method: medians over rounds, and the median of its per-round ratio to methods[0]."""
    base = {r["seed"]: r["seconds"] for r in runs if r["method"] == methods[0]}
    out = []
    for m in methods:
        mine = [r for r in runs if r["method"] == m]
        out.append({"method": m, "rounds": len(mine),
                    "seconds": statistics.median(r["seconds"] for r in mine),
                    "cache_seconds": statistics.median(r["cache_seconds"] for r in mine),
                    "adversary_seconds": statistics.median(r["adversary_seconds"] for r in mine),
                    "ratio": statistics.median(r["seconds"] / base[r["seed"]] for r in mine),
                    "ratios": [r["seconds"] / base[r["seed"]] for r in mine]})
    return out


def markdown(rows: list[dict], reference: str) -> str:
    lines = [f"| configuration | rounds | unlearning s (median) | image cache s | adversary s | x {reference} "
             "(median of rounds; each round) |", "|---|---|---|---|---|---|"]
    for r in rows:
        each = ", ".join(f"{x:.2f}" for x in r["ratios"])
        lines.append(f"| {r['method']} | {r['rounds']} | {r['seconds']:.1f} | {r['cache_seconds']:.1f} | "
                     f"{r['adversary_seconds']:.1f} | {r['ratio']:.2f} ({each}) |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--methods", default="trust-lite,trust",
                    help="comma-separated; the first is the reference of the ratios")
    ap.add_argument("--variant", action="append", default=[], metavar="NAME:FIELD=VALUE,...",
                    help="a TRUST variant (TrustConfig fields over the defaults); name it in --methods")
    ap.add_argument("--concept", default="red")
    ap.add_argument("--rounds", type=int, default=3, help="rounds (seeds 0, 1, ...), every contender once each")
    ap.add_argument("--results", default=compare_methods.RESULTS)
    args = ap.parse_args(argv)
    for v in args.variant:
        compare_methods.add_variant(v)
    methods = args.methods.split(",")
    compare_methods.check_methods(methods)
    if len(methods) < 2 or len(set(methods)) != len(methods):
        compare_methods.refuse(f"--methods needs two or more different configurations, got {args.methods!r}")
    if args.rounds < 1:
        compare_methods.refuse(f"--rounds must be >= 1, got {args.rounds}")
    from trust_fast.concepts import parse_concept

    try:
        parse_concept(args.concept)
    except ValueError as e:
        compare_methods.refuse(f"--concept: {e}")

    import torch
    from tqdm.auto import tqdm

    from trust_fast.io import write_json_atomic
    from trust_fast.world import load_pipeline

    pipe = load_pipeline("shapes")
    runs = []
    with tqdm(total=args.rounds * len(methods), desc="unlearning runs") as bar:
        for seed in range(args.rounds):
            k = seed % len(methods)
            for m in methods[k:] + methods[:k]:
                runs.append(measure(pipe, args.concept, m, seed))
                bar.write(f"round {seed} {m}: {runs[-1]['seconds']:.1f} s")
                bar.update(1)
    rows = summarize(runs, methods)
    write_json_atomic({"concept": args.concept, "threads": torch.get_num_threads(), "rows": rows, "runs": runs,
                       "command": "python benchmarks/default_cost.py " + " ".join(sys.argv[1:] if argv is None
                                                                                  else argv)},
                      os.path.join(args.results, "default_cost.json"))
    print(markdown(rows, methods[0]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
