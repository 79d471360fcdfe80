"""Does the classifier-free report (what models outside the shapes world get) agree with the classifier?

For each concept: unlearn the built-in model with TRUST's defaults, then measure it both ways on
the same prompts: the classifier's UA / retain accuracy, and generic_report's forget_change /
retain_change / selectivity / fd against the original model. Prints a Markdown table (and JSON lines).

    python benchmarks/classifier_free.py                       # red, circle, striped
    python benchmarks/classifier_free.py --concepts red --steps 30
    python benchmarks/classifier_free.py --attack       # + the soft-prompt attack both ways (ASR vs recovery)
"""
from __future__ import annotations

import argparse
import copy
import json


def main() -> int:
    from trust_fast import TrustUnlearner
    from trust_fast.concepts import parse_concept
    from trust_fast.world.concepts import world_prompts
    from trust_fast.evaluation import evaluate, generic_report
    from trust_fast.methods import config
    from trust_fast.world import load_classifier, load_pipeline

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--concepts", default="red,circle,striped")
    ap.add_argument("--steps", type=int, default=None, help="unlearning steps (default: TRUST's)")
    ap.add_argument("--n", type=int, default=4, help="images per prompt")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--attack", action="store_true",
                    help="also run the soft-prompt attack: the classifier's ASR and the classifier-free recovery "
                         "(the same seeds, so the same optimized prefixes and attacked images)")
    args = ap.parse_args()
    reference, classifier = load_pipeline("shapes", device="cpu"), load_classifier()
    rows = []
    for concept in args.concepts.split(","):
        spec = parse_concept(concept)
        prompts = world_prompts(spec)
        before = evaluate(reference, spec, classifier, n_per_prompt=args.n, seed=args.seed)
        pipe = copy.deepcopy(reference)
        overrides = {"seed": args.seed, **({"steps": args.steps} if args.steps else {})}
        TrustUnlearner(pipe, spec, config("trust", **overrides)).run(progress=True)
        after = evaluate(pipe, spec, classifier, n_per_prompt=args.n, seed=args.seed)
        free = generic_report(pipe, reference, prompts.forget, prompts.retain, n_per_prompt=args.n, seed=args.seed,
                              attack="softprompt" if args.attack else "none")
        row = {"concept": concept, "ua_before": before["ua"], "ua": after["ua"], "retain_before": before["retain_acc"],
               "retain_acc": after["retain_acc"], **{k: free[k] for k in ("forget_change", "retain_change",
                                                                          "selectivity", "fd", "fd_self")},
               "n_forget": len(prompts.forget) * args.n, "n_retain": len(prompts.retain) * args.n}
        if args.attack:
            from trust_fast.evaluation import softprompt_attack

            asr = softprompt_attack(pipe, reference, spec, classifier, n_per_prompt=args.n, seed=args.seed)
            row.update(asr_softprompt=asr["asr_softprompt"], **{k: free[k] for k in (
                "softprompt_change", "softprompt_change_original", "softprompt_recovery")})
        print(json.dumps(row), flush=True)
        rows.append(row)
    keys = list(rows[0])
    print("| " + " | ".join(keys) + " |\n|" + "---|" * len(keys))
    for r in rows:
        print("| " + " | ".join(f"{r[k]:.3f}" if isinstance(r[k], float) else str(r[k]) for k in keys) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
