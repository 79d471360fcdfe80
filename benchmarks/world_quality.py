"""Measure the shipped shapes model against its quality bar (default sampling settings, every
description x template, several seeds) and print the figures as JSON.

    python benchmarks/world_quality.py --n-per-prompt 4 --seeds 0,1,2
"""
from __future__ import annotations

import argparse
import json
import time


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="shapes")
    ap.add_argument("--n-per-prompt", type=int, default=4)
    ap.add_argument("--seeds", default="0,1,2")
    args = ap.parse_args()
    from trust_fast.world import load_classifier, load_pipeline
    from trust_fast.world.quality import measure_quality

    pipe, clf = load_pipeline(args.model), load_classifier()
    rows = []
    for seed in map(int, args.seeds.split(",")):
        t0 = time.perf_counter()
        q = measure_quality(pipe, clf, args.n_per_prompt, seed)
        q["seconds"] = time.perf_counter() - t0
        rows.append(q)
        print(json.dumps(q), flush=True)
    keys = ["color_acc", "shape_acc", "texture_acc", "all_acc", "synonym_agreement"]
    n = sum(r["n_images"] for r in rows)
    print(json.dumps({"mean_over_seeds": {k: sum(r[k] for r in rows) / len(rows) for k in keys},
                      "images": n, "synonym_images": sum(r["n_synonym_images"] for r in rows)}))


if __name__ == "__main__":
    main()
