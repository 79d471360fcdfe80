"""The partial prompts' trade-off (issue #34): red+circle unlearned with partial_prompts="on" at a
given partial_fraction, with tests/methods/test_behaviour.py's short-run settings (TRAIN: 30 steps,
no adversary), then measured with its functions: how often the held-out prompts naming one part
("a photo of a crimson") and the pair's own held-out prompts draw red circles, and what is kept.
One JSON line per (fraction, seed) on stdout.

    python benchmarks/partial_fraction.py --fractions 0.25 0.5 --seeds 0 1 2
"""
from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import os
import sys

import torch

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--fractions", type=float, nargs="+", default=[0.25, 0.5, 0.75])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    sys.path.insert(0, os.path.join(ROOT, "tests"))
    spec_ = importlib.util.spec_from_file_location("tb", os.path.join(ROOT, "tests", "methods", "test_behaviour.py"))
    tb = importlib.util.module_from_spec(spec_)
    spec_.loader.exec_module(tb)
    from trust_fast import TrustConfig, TrustUnlearner
    from trust_fast.concepts import parse_concept
    from trust_fast.world import load_classifier, load_pipeline

    original, clf, spec = load_pipeline("shapes"), load_classifier(), parse_concept("red+circle")
    for frac in a.fractions:
        for seed in a.seeds:
            pipe = copy.deepcopy(original)
            cfg = TrustConfig(seed=seed, partial_prompts="on", partial_fraction=frac, **tb.TRAIN)
            TrustUnlearner(pipe, spec, cfg).run()
            part, m = tb.measure_partial(pipe, clf, spec, seed), tb.measure(pipe, clf, spec, seed)
            print(json.dumps({"frac": frac, "seed": seed, "partial_rate": part["rate"], "pair_rate": m["rate"],
                              "retain": m["retain"], "a_kept": m["a_kept"], "b_kept": m["b_kept"]}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
