"""Spread over training seeds of every quantity tests/methods/test_behaviour.py asserts on, with the test's
own settings and functions (imported from the test file), so its limits can be set beyond the
worst seed. One JSON line per (seed, part) is appended to --out; parts already there are skipped,
so an interrupted run resumes. --summary prints the BENCHMARKS.md tables from that file.

    python benchmarks/behaviour_spread.py --seeds 0 1 2 3 4
    python benchmarks/behaviour_spread.py --summary

Seed s trains with TrustConfig(seed=s) and samples its evaluation images with seed s (the test:
s = 0). Parts: red, pair ("red+circle"; "red|circle" has the same prompt sets, so the same
figures), paraphrase (on the original model), attack (soft prompt on the unlearned, unprotected
ATTACK_CONCEPT model, optimized and with lr 0), adv (the same attack on the model trained with the
adversary, and that model's held-out retain accuracy against the original's).
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import time

import torch

from trust_fast.evaluation.metrics import wilson

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
PARTS = ("red", "pair", "paraphrase", "attack", "adv", "embedding", "default", "partial")


def load_test_module():
    import sys

    sys.path.insert(0, os.path.join(ROOT, "tests"))  # conftest's directory: helpers the test file may import
    spec = importlib.util.spec_from_file_location("test_behaviour", os.path.join(ROOT, "tests", "methods",
                                                                                 "test_behaviour.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def done_parts(path: str) -> set:
    if not os.path.exists(path):
        return set()
    with open(path) as f:
        return {(r["seed"], r["part"]) for r in map(json.loads, filter(str.strip, f))}


def run(seeds: list[int], parts: list[str], out: str) -> None:
    from trust_fast.concepts import parse_concept
    from trust_fast.world import load_classifier, load_pipeline

    tb = load_test_module()
    original, clf = load_pipeline("shapes", device="cpu"), load_classifier()
    have = done_parts(out)
    for s in seeds:
        models = {}

        def model(concept, adv=False, partial=False):
            if (concept, adv, partial) not in models:
                models[concept, adv, partial] = tb.unlearn(original, concept, s, adv, partial)
            return models[concept, adv, partial]

        for part in parts:
            if (s, part) in have:
                continue
            t0 = time.perf_counter()
            rec: dict = {"seed": s, "part": part}
            if part in ("red", "pair"):
                concept = "red" if part == "red" else "red+circle"
                spec = parse_concept(concept)
                rec["before"] = tb.measure(original, clf, spec, s)
                rec["after"] = tb.measure(model(concept), clf, spec, s)
            elif part == "paraphrase":
                r = tb.paraphrase(original, clf, parse_concept("red"), s)
                rec.update(asr=r["asr"], hits=r["hits"], n=r["n"])
            elif part == "attack":
                spec = parse_concept(tb.ATTACK_CONCEPT)
                rec["optimized"] = tb.attack(model(tb.ATTACK_CONCEPT), original, clf, spec, s)
                rec["lr0"] = tb.attack(model(tb.ATTACK_CONCEPT), original, clf, spec, s, lr=0.0)
            elif part == "default":  # TrustConfig() as shipped, this training seed; noise of the tests' seed
                spec = parse_concept("red")
                rec["before"] = tb.measure(original, clf, spec, tb.SEED)
                rec["after"] = tb.measure(tb.unlearn_default(original, "red", s), clf, spec, tb.SEED)
            elif part == "partial":  # held-out prompts naming one part of red+circle, without and with partial prompts
                spec = parse_concept("red+circle")
                rec["original"] = tb.measure_partial(original, clf, spec, s)
                rec["without"] = tb.measure_partial(model("red+circle"), clf, spec, s)
                rec["with"] = tb.measure_partial(model("red+circle", partial=True), clf, spec, s)
                rec["before"] = tb.measure(original, clf, spec, s)
                rec["after"] = tb.measure(model("red+circle", partial=True), clf, spec, s)
            elif part == "embedding":
                spec = parse_concept(tb.ATTACK_CONCEPT)
                rec["embedding"] = tb.embedding(model(tb.ATTACK_CONCEPT), original, clf, spec, s)
            elif part == "adv":
                spec = parse_concept(tb.ATTACK_CONCEPT)
                rec["optimized"] = tb.attack(model(tb.ATTACK_CONCEPT, adv=True), original, clf, spec, s)
                rec["retain_before"] = tb.measure(original, clf, spec, s, forget=False)
                rec["retain_after"] = tb.measure(model(tb.ATTACK_CONCEPT, adv=True), clf, spec, s, forget=False)
            rec["seconds"] = round(time.perf_counter() - t0, 1)
            print(json.dumps(rec), flush=True)
            with open(out, "a") as f:
                f.write(json.dumps(rec) + "\n")


def summary(path: str) -> str:
    with open(path) as f:
        recs = [json.loads(l) for l in f if l.strip()]
    rows = []  # (quantity, n, {seed: value})
    by: dict = {}

    def add(name, n, seed, value):
        by.setdefault(name, {"n": n, "vals": {}})["vals"][seed] = value

    for r in recs:
        s = r["seed"]
        if r["part"] in ("red", "pair"):
            c = "red" if r["part"] == "red" else "red+circle"
            b, a = r["before"], r["after"]
            add(f"{c}: forget rate, original", b["n_forget"], s, b["rate"])
            add(f"{c}: forget rate, unlearned", a["n_forget"], s, a["rate"])
            add(f"{c}: retain acc, original", b["n_retain"], s, b["retain"])
            add(f"{c}: retain acc, unlearned", a["n_retain"], s, a["retain"])
            add(f"{c}: retain ratio unlearned/original", None, s, a["retain"] / b["retain"])
            if "a_kept" in a:
                for k, what in (("a", "A without B shows A (red non-circles red)"),
                                ("b", "B without A shows B (non-red circles circles)")):
                    add(f"{c}: {what}, original", b[f"n_{k}"], s, b[f"{k}_kept"])
                    add(f"{c}: {what}, unlearned", a[f"n_{k}"], s, a[f"{k}_kept"])
                    add(f"{c}: {what}, ratio", None, s, a[f"{k}_kept"] / b[f"{k}_kept"])
                add(f"{c}: forget images that still show B (circle), unlearned", a["n_forget"], s, a["forget_b_kept"])
        elif r["part"] == "paraphrase":
            add("red: paraphrase ASR, original model", r["n"], s, r["asr"])
        elif r["part"] == "attack":
            add("striped: soft-prompt ASR, unprotected, optimized", r["optimized"]["n"], s, r["optimized"]["asr"])
            add("striped: soft-prompt ASR, unprotected, lr 0", r["lr0"]["n"], s, r["lr0"]["asr"])
            add("striped: optimized minus lr 0", None, s, r["optimized"]["asr"] - r["lr0"]["asr"])
        elif r["part"] == "adv":
            add("striped: soft-prompt ASR, adv_prefix=5, optimized", r["optimized"]["n"], s, r["optimized"]["asr"])
            b, a = r["retain_before"], r["retain_after"]
            add("striped: retain acc, original", b["n_retain"], s, b["retain"])
            add("striped: retain acc, adv_prefix=5", a["n_retain"], s, a["retain"])
            add("striped: retain ratio adv_prefix=5/original", None, s, a["retain"] / b["retain"])
        elif r["part"] == "default":
            b, a = r["before"], r["after"]
            add("red, TrustConfig() as shipped: forget rate, unlearned", a["n_forget"], s, a["rate"])
            add("red, TrustConfig() as shipped: retain ratio", None, s, a["retain"] / b["retain"])
        elif r["part"] == "embedding":
            add("striped: embedding ASR, unprotected", r["embedding"]["n"], s, r["embedding"]["asr"])
        elif r["part"] == "partial":
            for k, what in (("original", "original"), ("without", "unlearned without partial prompts"),
                            ("with", "unlearned with partial prompts")):
                add(f"red+circle under prompts naming one part: {what}", r[k]["n"], s, r[k]["rate"])
            add("red+circle under prompts naming one part: without minus with", None, s,
                r["without"]["rate"] - r["with"]["rate"])
            b, a = r["before"], r["after"]
            add("red+circle with partial prompts: forget rate, unlearned", a["n_forget"], s, a["rate"])
            for k in ("a", "b"):
                add(f"red+circle with partial prompts: {k}_kept ratio", None, s, a[f"{k}_kept"] / b[f"{k}_kept"])
    seeds = sorted({r["seed"] for r in recs})
    for r in recs:  # the embedding attack's gain over the prefix (same model, prompts and images)
        if r["part"] == "embedding":
            base = next((q for q in recs if q["part"] == "attack" and q["seed"] == r["seed"]), None)
            if base:
                add("striped: embedding minus soft-prompt ASR", None, r["seed"],
                    r["embedding"]["asr"] - base["optimized"]["asr"])
    for r in recs:  # the adversary's gain needs both runs of a seed
        if r["part"] == "adv":
            base = next((q for q in recs if q["part"] == "attack" and q["seed"] == r["seed"]), None)
            if base:
                add("striped: unprotected minus adv_prefix=5", None, r["seed"],
                    base["optimized"]["asr"] - r["optimized"]["asr"])
    head = "| quantity | images | " + " | ".join(f"seed {s}" for s in seeds) + " | mean | min / max |"
    lines = [head, "| --- " * (len(seeds) + 4) + "|"]
    for name, d in by.items():
        vals, n = d["vals"], d["n"]

        def cell(s):
            if s not in vals:
                return "-"
            v = vals[s]
            if n is None:
                return f"{v:+.3f}" if "minus" in name else f"{v:.3f}"
            k = round(v * n)
            lo, hi = wilson(k, n)
            return f"{v:.3f} ({k}/{n}; {lo:.2f}-{hi:.2f})"

        xs = list(vals.values())
        lines.append(f"| {name} | {n if n is not None else '-'} | " + " | ".join(cell(s) for s in seeds)
                     + f" | {sum(xs) / len(xs):.3f} | {min(xs):.3f} / {max(xs):.3f} |")
    secs = {}
    for r in recs:
        secs.setdefault(r["part"], []).append(r["seconds"])
    lines.append("")
    lines.append("Seconds per part (wall, this machine, shared): " + "; ".join(
        f"{p} {min(v):.0f}-{max(v):.0f}" for p, v in secs.items()))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", type=int, nargs="*", default=[0, 1, 2, 3, 4])
    ap.add_argument("--parts", nargs="*", default=list(PARTS), choices=PARTS)
    ap.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "behaviour_spread.jsonl"))
    ap.add_argument("--threads", type=int, default=2, help="torch threads (the tests' conftest uses 2)")
    ap.add_argument("--summary", action="store_true", help="print the tables of --out and exit")
    a = ap.parse_args(argv)
    if a.summary:
        print(summary(a.out))
        return 0
    torch.set_num_threads(a.threads)
    run(a.seeds, a.parts, a.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
