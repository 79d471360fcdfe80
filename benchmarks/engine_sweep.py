"""One TRUST configuration on one concept of the built-in model: unlearn, evaluate, count the rows
changed and the patch size; optionally the soft-prompt attack and consolidation at several
thresholds. Prints one JSON line (what BENCHMARKS.md's "Engine" sweeps were made with).

    python benchmarks/engine_sweep.py circle --n 8 --set alpha=6 retain_batch_size=32
    python benchmarks/engine_sweep.py red+circle --n 24 --set lr=0.02
    python benchmarks/engine_sweep.py red --attack --set adv_prefix=5 adv_steps=10 adv_interval=5
    python benchmarks/engine_sweep.py circle --n 8 --min-row-updates 1 3 5 8
"""
from __future__ import annotations

import argparse
import json
import time

import torch


def parse_overrides(items: list[str]) -> dict:
    out = {}
    for kv in items:
        if "=" not in kv:
            raise SystemExit(f"--set expects NAME=VALUE, got {kv!r}")
        k, v = kv.split("=", 1)
        try:
            out[k] = json.loads(v)
        except ValueError:
            out[k] = v
    return out


def main() -> int:
    from trust_fast.cli.evaluated_run import evaluate_world
    from trust_fast.concepts import parse_concept
    from trust_fast.engine import TrustUnlearner
    from trust_fast.methods import config
    from trust_fast.patch import patch_summary
    from trust_fast.world import load_pipeline

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("concept")
    ap.add_argument("--set", nargs="*", default=[], metavar="NAME=VALUE", help="TrustConfig overrides")
    ap.add_argument("--n", type=int, default=4, help="images per prompt of the evaluation")
    ap.add_argument("--before", action="store_true", help="evaluate the original model too")
    ap.add_argument("--attack", action="store_true", help="run the soft-prompt attack on the result")
    ap.add_argument("--min-row-updates", type=int, nargs="*", default=None,
                    help="evaluate the same trained model consolidated at each of these thresholds")
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    overrides = parse_overrides(a.set)
    spec = parse_concept(a.concept)
    base, pipe = load_pipeline("shapes"), load_pipeline("shapes")
    res: dict = {"concept": a.concept, "set": overrides, "n_per_prompt": a.n}
    if a.before:
        b, _ = evaluate_world(pipe, spec, a.n, 0)
        res["before"] = {k: v for k, v in b.items() if isinstance(v, float) and k != "seconds"}
    thresholds = a.min_row_updates
    if thresholds:  # train without consolidation, then consolidate copies at each threshold
        overrides = dict(overrides, min_row_updates=1)
    u = TrustUnlearner(pipe, spec, config("trust", **overrides))
    t0 = time.perf_counter()
    u.run()
    res["train_seconds"] = time.perf_counter() - t0
    res["mean_selected_fraction"] = u.report()["mean_selected_fraction"]

    def measure() -> dict:
        after, _ = evaluate_world(pipe, spec, a.n, 0)
        patch = patch_summary(base, pipe)
        return {"after": {k: round(v, 4) for k, v in after.items() if isinstance(v, float) and k != "seconds"},
                "changed_rows": patch["changed_rows"], "patch_fraction": patch["fraction_of_unet"]}

    if thresholds:
        trained = [p.detach().clone() for p in u.params]
        res["consolidated"] = []
        for m in thresholds:
            with torch.no_grad():
                for p, w in zip(u.params, trained):
                    p.copy_(w)
            u.finalized, u.config.min_row_updates = None, m
            u.finalize()
            res["consolidated"].append({"min_row_updates": m, **measure()})
    else:
        res.update(measure())
    if a.attack:
        from trust_fast.evaluation.attacks import softprompt_attack
        from trust_fast.world import load_classifier

        r = softprompt_attack(pipe, base, spec, load_classifier(), n_per_prompt=a.n)
        res.update(asr_softprompt=r["asr_softprompt"], asr_softprompt_n=r["asr_softprompt_n"],
                   adversary_seconds=u.adv_seconds)
    print(json.dumps(res))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
