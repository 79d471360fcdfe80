"""A pair none of the partial-prompt work was tuned on (blue+square, training seed 3), unlearned with
TrustConfig defaults and partial_prompts MODE (off | auto), then UA (16 images per forget prompt),
retain accuracy and the leak scan (2 images per prompt). One JSON line on stdout.

    python benchmarks/unseen_pair_check.py off
    python benchmarks/unseen_pair_check.py auto
"""
import sys, json, time, torch
torch.set_num_threads(1)
from trust_fast import TrustUnlearner, TrustConfig
from trust_fast.world import load_pipeline, load_classifier
from trust_fast.concepts import parse_concept
from trust_fast.evaluation import evaluate
from trust_fast.evaluation.leak import leak_scan
mode = sys.argv[1]
p = load_pipeline("shapes"); clf = load_classifier(); spec = parse_concept("blue+square")
t = time.time(); TrustUnlearner(p, spec, TrustConfig(seed=3, partial_prompts=mode)).run(); tr = time.time() - t
r = evaluate(p, spec, clf, n_per_prompt=16, seed=3)
l = leak_scan(p, spec, clf, n_per_prompt=2, seed=3)
top = sorted(((d, v["k"], v["n"]) for d, v in l["leak_by_description"].items()), key=lambda x: -x[1] / x[2])[:5]
print(json.dumps({"concept": "blue+square", "seed": 3, "partial_prompts": mode, "ua": r["ua"], "n_forget": r["n_forget"],
                  "retain": r["retain_acc"], "n_retain": r["n_retain"], "leak_max": l["leak_max"],
                  "leak_max_ci": l["leak_max_ci"], "where": l["leak_max_description"], "top": top, "train_s": round(tr, 1)}))
