"""How strong each optimized attack is: TRUST (defaults, or --set overrides) unlearns a concept of
the built-in model, then each attack runs on the unlearned model (and with --original, on the
original model too, where a working attack should bring the concept back nearly always).
Prints one JSON line per (model, attack, settings).

    python benchmarks/attack_strength.py striped --attacks softprompt,embedding,inversion
    python benchmarks/attack_strength.py striped --attacks inversion --settings '{"lr": 0.05}' '{"lr": 0.05, "attack_steps": 500}'
    python benchmarks/attack_strength.py striped --attacks inversion --original --settings '{"lr": 0.05}' '{"lr": 0.05, "attack_steps": 1}'
"""
from __future__ import annotations

import argparse
import json
import time

import torch


def main() -> int:
    from engine_sweep import parse_overrides

    from trust_fast.concepts import parse_concept
    from trust_fast.engine import TrustUnlearner
    from trust_fast.evaluation.attacks import parse_attacks, run_optimized
    from trust_fast.methods import config
    from trust_fast.world import load_classifier, load_pipeline

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("concept")
    ap.add_argument("--attacks", default="softprompt,embedding,inversion")
    ap.add_argument("--settings", nargs="*", default=[None], type=lambda t: json.loads(t),
                    help="JSON keyword settings of the attack, one run per item (default: its defaults)")
    ap.add_argument("--set", nargs="*", default=[], metavar="NAME=VALUE", help="TrustConfig overrides")
    ap.add_argument("--seed", type=int, default=0, help="training and attack seed")
    ap.add_argument("--n", type=int, default=4, help="attacked images per forget prompt")
    ap.add_argument("--original", action="store_true", help="attack the original model instead of an unlearned one")
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    names = parse_attacks(a.attacks)
    if "paraphrase" in names:
        ap.error("the paraphrase attack optimizes nothing: choose among softprompt, embedding, inversion")
    spec, clf = parse_concept(a.concept), load_classifier()
    base = load_pipeline("shapes")
    pipe = base
    if not a.original:
        pipe = load_pipeline("shapes")
        TrustUnlearner(pipe, spec, config("trust", seed=a.seed, **parse_overrides(a.set))).run()
    for name in names:
        for settings in a.settings:
            t0 = time.perf_counter()
            r = run_optimized(name, pipe, base, spec, clf, settings, n_per_prompt=a.n, seed=a.seed)
            print(json.dumps({"concept": a.concept, "model": "original" if a.original else "trust", "set": a.set,
                              "seed": a.seed, "attack": name, "settings": settings, "asr": r[f"asr_{name}"],
                              "hits": r[f"asr_{name}_hits"], "n": r[f"asr_{name}_n"],
                              "seconds": round(time.perf_counter() - t0, 1)}), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
