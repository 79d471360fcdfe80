"""TRUST vs SalUn vs ESD on the built-in shapes model: same seeds, same evaluation, same attacks, one table.

Each (concept, method, seed) trains in its own subprocess so that its peak memory is its own;
concepts the world gives identical training sets ("red+circle" and "red|circle") share one
training run and are each evaluated on it. During a run, UA and retain accuracy are evaluated on
a schedule (small sample, evaluation time excluded from the clock); `secs_to_ua05` is the
method's own wall-clock (data-free image cache + steps) at the first evaluation with UA <= 0.05.
At the end: the full report (UA, retain, fd) on at least `--images` forget images per run, and
the attacks (paraphrase, softprompt, embedding, inversion) on at least `--attack-images` attacked
images per run and attack. Methods: trust (TrustConfig defaults), trust-lite (TRUST's default
before issue #16: no adversary, 2 cached images per prompt at 10 DDIM steps), salun, esd.

Every finished run is appended to benchmarks/results/compare_runs.jsonl; a run already there
(same concept, seed, settings and TrustConfig) is not repeated, so a long comparison can be
stopped and continued. Runs are recognised by the TrustConfig they trained with, not by the name
they were saved under: when a default changes, the method's older runs stop counting (stderr says
how many) and a variant's runs that match the new default count for it. The table pools each
(concept, method) over its seeds: rates are pooled counts with their Wilson 95% interval, "worst"
is the worst seed, retain is the lowest seed's ratio to the original.

    python benchmarks/compare_methods.py --seeds 0 1 2 --jobs 2          # 5 concepts x 4 methods x 3 seeds
    python benchmarks/compare_methods.py --concepts red --methods trust,esd --seeds 0
    python benchmarks/compare_methods.py --table                          # the table from the saved runs

Writes benchmarks/results/compare.csv, compare.json, compare.png, the history plots of the first
seed, and the Markdown table between the COMPARE markers of BENCHMARKS.md and README.md.
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "results")
CONCEPTS = ["red", "circle", "striped", "red+circle", "red|circle"]
METHODS = ["trust", "trust-lite", "salun", "esd"]
ATTACKS = ["paraphrase", "softprompt", "embedding", "inversion"]
# named configurations beside the registered methods: TRUST's previous, faster and less robust default
# (2 cached images per prompt at 10 DDIM steps, no adversary)
VARIANTS = {"trust-lite": ("trust", {"x0_per_prompt": 2, "x0_steps": 10, "adv_prefix": 0})}


def refuse(message: str):
    """Bad input: one line on stderr naming the problem, exit code 2, nothing written."""
    print(f"compare_methods.py: {message}", file=sys.stderr)
    raise SystemExit(2)


def add_variant(text: str) -> str:
    """'NAME:FIELD=VALUE,FIELD=VALUE' (TrustConfig fields on top of TRUST's defaults) -> a named variant."""
    name, _, fields = text.partition(":")
    if not name or not fields:
        refuse(f"--variant expects NAME:FIELD=VALUE[,FIELD=VALUE...], got {text!r}")
    extra = {}
    for kv in fields.split(","):
        k, _, v = kv.partition("=")
        try:
            extra[k.strip()] = json.loads(v)
        except ValueError:
            extra[k.strip()] = v
    VARIANTS[name] = ("trust", extra)
    method_config(name).validate()
    return name


def check_methods(methods: list[str]) -> None:
    """Refuse (one line, exit 2) a method name that is neither registered nor a variant."""
    from trust_fast.methods import METHODS as REGISTERED

    unknown = sorted(set(methods) - set(REGISTERED) - set(VARIANTS))
    if unknown:
        refuse(f"unknown method(s) {', '.join(unknown)}; choose from {', '.join(list(REGISTERED) + list(VARIANTS))}")


def method_config(name: str, **overrides):
    """The TrustConfig a compared method runs with: a registered method or a named variant."""
    from trust_fast.methods import config

    base, extra = VARIANTS.get(name, (name, {}))
    return config(base, **extra, **overrides)


COLUMNS = ["concept", "method", "seeds", "ua", "ua_k", "ua_n", "ua_lo", "ua_hi", "ua_worst", "retain_ratio_min",
           "fd_ratio", "fd_ratio_worst", *[f"asr_{a}{x}" for a in ATTACKS for x in ("", "_k", "_n", "_lo", "_hi")],
           "selected_fraction_max", "patch_fraction_max", "secs_to_ua05", "seconds", "peak_rss_mb", "train_mem_mb",
           "optimizer_state_bytes"]


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def per_prompt(concept: str, images: int) -> int:
    """Images per forget prompt so that a run evaluates at least `images` forget images."""
    from trust_fast.concepts import parse_concept
    from trust_fast.world.concepts import world_prompts

    return max(1, math.ceil(images / len(world_prompts(parse_concept(concept)).forget)))


RETAIN_IMAGES = 300  # retain images per run at most (single concepts stay under it at their forget sample)


def retain_per_prompt(concept: str, n: int) -> int:
    """Images per retain prompt: the forget prompts' `n`, capped so that a run samples about
    RETAIN_IMAGES retain images at most (the pairs' 2 forget prompts need 48 images each for 96 forget
    images; at 48 per retain prompt their 22 retain prompts, and fd's three samples of them, were
    3,168 images per concept)."""
    from trust_fast.concepts import parse_concept
    from trust_fast.world.concepts import world_prompts

    return min(n, math.ceil(RETAIN_IMAGES / len(world_prompts(parse_concept(concept)).retain)))


def training_groups(concepts: list[str]) -> list[list[str]]:
    """Concepts whose training is identical (same world prompt sets) share one run: the first trains."""
    from trust_fast.concepts import parse_concept
    from trust_fast.world.concepts import world_prompts

    groups: dict = {}
    for c in concepts:
        p = world_prompts(parse_concept(c))
        groups.setdefault((tuple(p.forget), tuple(p.anchors), tuple(p.retain)), []).append(c)
    return list(groups.values())


def run_key(row: dict) -> tuple:
    return (row["concept"], row["method"], row["seed"], row["steps_override"], row.get("sample_steps"), row["images"],
            row["attack_images"], row.get("leak_images", SETTING_DEFAULTS["leak_images"]),
            tuple(row["attacks"]), json.dumps(row["attack_settings"], sort_keys=True))


def run_group(concepts: list[str], method: str, seed: int, steps: int | None, eval_every: int, images: int,
              attack_images: int, attacks: list[str], settings: dict, plots: str | None,
              sample_steps: int | None = None, results: str | None = None, leak_images: int = 0) -> list[dict]:
    """Train `method` once on concepts[0] and report every concept of the group on the result
    (with `leak_images`, also its leak scan: that many images per prompt of the prompt space)."""
    import torch

    from trust_fast import TrustUnlearner
    from trust_fast.concepts import parse_concept
    from trust_fast.evaluation import evaluate, full_report
    from trust_fast.patch import patch_fraction
    from trust_fast.world import load_classifier, load_pipeline

    torch.manual_seed(seed)
    specs = [parse_concept(c) for c in concepts]
    classifier = load_classifier()
    reference = load_pipeline("shapes")
    pipe = load_pipeline("shapes")
    cfg = method_config(method, seed=seed, **({"steps": steps} if steps else {}))
    rss0 = _rss_mb()
    u = TrustUnlearner(pipe, concept=specs[0], config=cfg)

    def quick_eval(unl) -> dict:
        r = evaluate(unl.pipe, specs[0], classifier, n_per_prompt=1, seed=seed + 99)
        return {"ua": r["ua"], "retain_acc": r["retain_acc"], "train_seconds": unl.seconds}

    if eval_every > 0:  # 0: no schedule (faster sweeps; secs_to_ua05 is then not measured)
        u.history.evals.append({"step": 0, **quick_eval(u)})
    u.run(progress=True, eval_fn=quick_eval, eval_interval=eval_every)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    hits = [e for e in u.history.evals if e["ua"] <= 0.05 and e["step"] > 0]
    rep = u.report()
    patch = patch_fraction(reference, u.pipe)  # the sparse patch this run would export, of the UNet
    rows = []
    for concept, spec in zip(concepts, specs):
        n, n_attack = per_prompt(concept, images), per_prompt(concept, attack_images)
        n_retain = retain_per_prompt(concept, n)
        sampling = {"steps": sample_steps} if sample_steps else {}
        before = original_figures(reference, spec, classifier, n, seed, sampling, results, n_retain)
        final = full_report(u.pipe, spec, reference, attack=",".join(attacks) or "none", classifier=classifier,
                            n_per_prompt=n, seed=seed, settings=settings, attack_n_per_prompt=n_attack,
                            retain_n_per_prompt=n_retain, **sampling)
        row = {"concept": concept, "method": method, "seed": seed, "steps_override": steps, "images": images,
               "sample_steps": sample_steps,
               "attack_images": attack_images, "attacks": attacks, "attack_settings": settings,
               "trained_on": concepts[0], "ua": final["ua"], "n_forget": final["n_forget"],
               "retain_acc": final["retain_acc"], "n_retain": final["n_retain"], "ua_before": before["ua"],
               "retain_before": before["retain_acc"], "fd": final["fd"], "fd_self": final["fd_self"],
               "secs_to_ua05": (hits[0]["train_seconds"] if hits else None) if eval_every > 0 else "-",
               "eval_every": eval_every, "seconds": u.seconds,
               "steps": u.step_count, "peak_rss_mb": peak, "train_mem_mb": max(0.0, peak - rss0),
               "trainable_params": rep.get("trainable_params"), "mean_selected_rows": rep.get("mean_selected_rows"),
               "optimizer_state_bytes": u.state_bytes()["optimizer_state_bytes"], "evals": u.history.evals,
               "target_rows": rep["target_rows"], "selected_fraction": rep["mean_selected_fraction"],
               "patch_fraction": patch,
               "phases": {k: sum(s.get(k, 0.0) for s in rep["history"]) for k in rep["history"][0]
                          if k.startswith("time_")},
               "pool_seconds": u.pool_seconds, "config": rep.get("config"), "threads": torch.get_num_threads(),
               "eval_seconds": final["seconds"]}
        if leak_images:
            from trust_fast.evaluation.leak import leak_scan

            leak = leak_scan(u.pipe, spec, classifier, n_per_prompt=leak_images, seed=seed, **sampling)
            row.update({k: leak[k] for k in ("leak_max", "leak_max_description", "leak_worst", "leak_seconds")},
                       leak_images=leak_images,
                       leak_by_description={d: [v["k"], v["n"]] for d, v in leak["leak_by_description"].items()})
        for a in attacks:
            row.update({f"asr_{a}": final[f"asr_{a}"], f"asr_{a}_hits": final[f"asr_{a}_hits"],
                        f"asr_{a}_n": final[f"asr_{a}_n"]})
            if a != "paraphrase":
                row[f"{a}_seconds"] = final[a]["seconds"]
        rows.append(row)
        if plots and u.history.evals:  # a directory for the history plot (when UA was tracked)
            from trust_fast.evaluation.pictures import plot_history

            os.makedirs(plots, exist_ok=True)
            plot_history(u.history.evals, os.path.join(plots, f"history_{method}_{concept.replace('|', '_if_')}.png"),
                         title=f"{method}: {concept} (seed {seed})")
    return rows


def original_figures(reference, spec, classifier, n: int, seed: int, sampling: dict, results: str,
                     n_retain: int | None = None) -> dict:
    """The original model's UA and retain accuracy on a run's evaluation sample; the same for every
    method, so computed once per (concept, n, n_retain, seed, sampling) and kept in `results`/originals.jsonl."""
    from trust_fast.evaluation import evaluate

    n_retain = n_retain or n
    key = {"concept": str(spec), "n": n, "seed": seed, **sampling, **({"n_retain": n_retain} if n_retain != n else {})}
    path = os.path.join(results, "originals.jsonl") if results else None
    if path and os.path.exists(path):
        with open(path) as f:
            for line in f:
                rec = json.loads(line)
                if rec["key"] == key:
                    return rec["figures"]
    figures = {k: v for k, v in evaluate(reference, spec, classifier, n_per_prompt=n, seed=seed,
                                         retain_n_per_prompt=n_retain, **sampling).items()
               if k in ("ua", "retain_acc", "n_forget", "n_retain")}
    if path:
        os.makedirs(results, exist_ok=True)
        with open(path, "a") as f:
            f.write(json.dumps({"key": key, "figures": figures}) + "\n")
    return figures


def aggregate(runs: list[dict], concepts: list[str], methods: list[str]) -> list[dict]:
    """One row per (concept, method): rates pooled over seeds with Wilson intervals, worst seed, medians."""
    from trust_fast.evaluation.metrics import wilson

    out = []
    for c in concepts:
        for m in methods:
            rs = sorted((r for r in runs if r["concept"] == c and r["method"] == m), key=lambda r: r["seed"])
            if not rs:
                continue
            k = sum(round(r["ua"] * r["n_forget"]) for r in rs)
            n = sum(r["n_forget"] for r in rs)
            row = {"concept": c, "method": m, "seeds": " ".join(str(r["seed"]) for r in rs), "ua": k / n,
                   "ua_k": k, "ua_n": n, "ua_worst": max(r["ua"] for r in rs),
                   "retain_ratio_min": min(r["retain_acc"] / r["retain_before"] for r in rs),
                   "fd_ratio": statistics.mean(r["fd"] / r["fd_self"] for r in rs),
                   "fd_ratio_worst": max(r["fd"] / r["fd_self"] for r in rs),
                   "seconds": statistics.median(r["seconds"] for r in rs),
                   "secs_to_ua05": ("-" if any(r["secs_to_ua05"] == "-" for r in rs)  # not measured
                                    else statistics.median(r["secs_to_ua05"] for r in rs)
                                    if all(r["secs_to_ua05"] is not None for r in rs) else None),
                   "peak_rss_mb": statistics.median(r["peak_rss_mb"] for r in rs),
                   "train_mem_mb": statistics.median(r["train_mem_mb"] for r in rs),
                   "optimizer_state_bytes": statistics.median(r["optimizer_state_bytes"] for r in rs)}
            row["ua_lo"], row["ua_hi"] = wilson(k, n)
            # selectivity, worst seed: target rows selected per step (mean over a run's steps) and the
            # sparse patch as a fraction of the UNet, from the runs that measured them
            for key, name in (("selected_fraction", "selected_fraction_max"), ("patch_fraction", "patch_fraction_max")):
                have = [r[key] for r in rs if r.get(key) is not None]
                if have:
                    row[name] = max(have)
            row.update(pooled_leak(rs))
            for a in ATTACKS:
                have = [r for r in rs if f"asr_{a}_n" in r]
                if not have:
                    continue
                ka, na = sum(r[f"asr_{a}_hits"] for r in have), sum(r[f"asr_{a}_n"] for r in have)
                row.update({f"asr_{a}": ka / na, f"asr_{a}_k": ka, f"asr_{a}_n": na})
                row[f"asr_{a}_lo"], row[f"asr_{a}_hi"] = wilson(ka, na)
            out.append(row)
    return out


def pooled_leak(rs: list[dict]) -> dict:
    """The leak scans of runs pooled over seeds: per description (k, n) summed, leak_max the highest
    pooled rate with its Wilson interval, leak_max_worst the worst seed's own leak_max. Empty when no
    run was scanned."""
    from trust_fast.evaluation.metrics import wilson

    have = [r for r in rs if r.get("leak_by_description")]
    if not have:
        return {}
    pooled: dict = {}
    for r in have:
        for d, (k, n) in r["leak_by_description"].items():
            kn = pooled.setdefault(d, [0, 0])
            kn[0], kn[1] = kn[0] + k, kn[1] + n
    worst = max(pooled, key=lambda d: pooled[d][0] / pooled[d][1])
    k, n = pooled[worst]
    lo, hi = wilson(k, n)
    return {"leak_max": k / n, "leak_max_k": k, "leak_max_n": n, "leak_max_lo": lo, "leak_max_hi": hi,
            "leak_max_description": worst, "leak_max_worst": max(r["leak_max"] for r in have)}


def fmt(v) -> str:
    if v is None:
        return "never"
    if isinstance(v, float):
        return f"{v:.3f}" if abs(v) < 100 else f"{v:.0f}"
    return str(v)


def rate(row: dict, name: str) -> str:
    """'0.021 (2/96; 0.01-0.07)': a pooled rate, its counts and its Wilson 95% interval."""
    if f"{name}_n" not in row:
        return "-"
    return f"{row[name]:.3f} ({row[name + '_k']}/{row[name + '_n']}; {row[name + '_lo']:.2f}-{row[name + '_hi']:.2f})"


def markdown(rows: list[dict]) -> str:
    head = ["concept", "method", "seeds", "UA (pooled; 95% CI)", "UA worst seed", "retain ratio (worst seed)",
            "fd / fd_self (worst)", "leak_max (pooled; 95% CI; where)", *[f"asr_{a}" for a in ATTACKS],
            "rows per step / patch (worst)",
            "s to UA<=0.05", "s (median)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    pct = lambda r, k: f"{100 * r[k]:.1f}%" if k in r else "-"  # noqa: E731
    for r in rows:
        cells = [r["concept"], r["method"], r["seeds"], rate(r, "ua"), fmt(r["ua_worst"]), fmt(r["retain_ratio_min"]),
                 f"{r['fd_ratio']:.2f} ({r['fd_ratio_worst']:.2f})",
                 rate(r, "leak_max") + (f" {r['leak_max_description']}" if "leak_max_n" in r else ""),
                 *[rate(r, f"asr_{a}") for a in ATTACKS],
                 f"{pct(r, 'selected_fraction_max')} / {pct(r, 'patch_fraction_max')}", fmt(r["secs_to_ua05"]),
                 f"{r['seconds']:.1f}"]
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return "\n".join(lines) + "\n"


def read_runs(path: str, **wanted) -> list[dict]:
    """The saved runs whose settings equal `wanted` (all of them without)."""
    if not os.path.exists(path):
        return []
    with open(path) as f:
        runs = [json.loads(line) for line in f if line.strip()]
    return [r for r in runs if all(r.get(k, SETTING_DEFAULTS.get(k)) == v for k, v in wanted.items())]


def config_drift(row: dict, method: str) -> dict:
    """{field: (saved, now)} where the TrustConfig a saved run trained with differs from what
    `method` runs with today (same seed and step override), both with their automatic values
    resolved (engine.effective_fields). A field the run predates is compared with what the code did
    before it (engine.PREDATED_FIELDS) or else not at all; one the engine resolves from the model
    (None today: the targets) is not drift."""
    import dataclasses

    from trust_fast.engine import PREDATED_FIELDS, effective_fields

    saved = row.get("config")
    if saved is None:  # runs from before configs were saved: only the label says what they ran
        return {} if row["method"] == method else {"method": (row["method"], method)}
    saved = effective_fields({**PREDATED_FIELDS, **saved})
    steps = row.get("steps_override")
    now = effective_fields(json.loads(json.dumps(dataclasses.asdict(
        method_config(method, seed=row["seed"], **({"steps": steps} if steps else {}))))))
    return {k: (saved[k], v) for k, v in now.items() if k in saved and v is not None and saved[k] != v}


def runs_of(runs: list[dict], methods: list[str]) -> list[dict]:
    """The saved runs of each method in `methods`, recognised by the configuration they trained with
    rather than by the label they were saved under: a run saved as a variant counts for the method
    whose configuration it is today (a variant that became the default), and a method's own runs
    from before its configuration changed are left out (and counted on stderr)."""
    out, stale = [], {}
    for m in methods:
        for r in runs:
            drift = config_drift(r, m)
            if not drift:
                out.append({**r, "method": m})
            elif r["method"] == m:
                stale.setdefault(m, []).append(drift)
    for m, drifts in stale.items():
        fields = sorted({k for d in drifts for k in d})
        print(f"compare_methods.py: {len(drifts)} saved run(s) of {m} trained with another configuration "
              f"({', '.join(fields)}) are not counted", file=sys.stderr)
    return out


def write_outputs(rows: list[dict], command: str, results: str = RESULTS) -> None:
    """compare.csv/json/png under `results`; the Markdown block into BENCHMARKS.md and README.md only
    for the repository's own results directory."""
    from trust_fast.io import atomic_path, write_json_atomic

    os.makedirs(results, exist_ok=True)
    with atomic_path(os.path.join(results, "compare.csv"), ".csv") as tmp, open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    write_json_atomic(rows, os.path.join(results, "compare.json"))
    plot(rows, os.path.join(results, "compare.png"))
    if os.path.abspath(results) != os.path.abspath(RESULTS):
        return
    block = (f"{BEGIN}\nCommand: `{command}`\n\n{markdown(rows)}\n"
             f"![UA and seconds per method](benchmarks/results/compare.png)\n{END}")
    root = os.path.dirname(HERE)
    replace_block(os.path.join(root, "BENCHMARKS.md"), block, "## TRUST vs SalUn vs ESD")
    replace_block(os.path.join(root, "README.md"), block)  # its results section shows the same table


BEGIN, END = "<!-- COMPARE:BEGIN -->", "<!-- COMPARE:END -->"


def replace_block(path: str, block: str, heading: str | None = None, markers: tuple[str, str] = (BEGIN, END)) -> None:
    """Put ``block`` between the `markers` (COMPARE by default) of ``path`` (atomically).  A file
    without the markers gets it appended under ``heading``, or is left alone when no heading is given."""
    from trust_fast.io import atomic_path

    begin, end = markers
    text = "# Benchmarks\n" if heading else ""
    if os.path.exists(path):
        with open(path) as f:
            text = f.read()
    if begin in text and end in text:
        pre, rest = text.split(begin, 1)
        text = pre + block + rest.split(end, 1)[1]
    elif heading:
        text = text.rstrip() + f"\n\n{heading}\n\n" + block + "\n"
    else:
        return
    with atomic_path(path, ".md") as tmp, open(tmp, "w") as f:
        f.write(text)


def plot(rows: list[dict], path: str) -> None:
    """Pooled UA, worst retain ratio, and each attack's pooled ASR per concept and method (95% intervals)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from trust_fast.io import atomic_path

    concepts = list(dict.fromkeys(r["concept"] for r in rows))
    methods = list(dict.fromkeys(r["method"] for r in rows))
    panels = [("ua", "UA after, pooled over seeds"), ("retain_ratio_min", "retain / original (worst seed)")]
    panels += [(f"asr_{a}", f"asr_{a}") for a in ATTACKS if any(f"asr_{a}_n" in r for r in rows)]
    fig, axes = plt.subplots(1, len(panels), figsize=(3.6 * len(panels), 3.8), dpi=110, squeeze=False)
    width = 0.8 / len(methods)
    for ax, (key, title) in zip(axes[0], panels):
        for k, m in enumerate(methods):
            by = {r["concept"]: r for r in rows if r["method"] == m}
            xs = [i + k * width for i in range(len(concepts))]
            vals = [by[c].get(key, 0) if c in by else 0 for c in concepts]
            err = None
            if f"{key}_lo" in next(iter(by.values()), {}):
                err = [[max(0.0, v - by[c].get(f"{key}_lo", v)) if c in by else 0 for c, v in zip(concepts, vals)],
                       [max(0.0, by[c].get(f"{key}_hi", v) - v) if c in by else 0 for c, v in zip(concepts, vals)]]
            ax.bar(xs, vals, width, label=m, yerr=err, capsize=2)
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(concepts))], concepts, rotation=20)
        ax.set_title(title, fontsize=9)
        ax.grid(axis="y", alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    with atomic_path(path, ".png") as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)


# ------------------------------------------------------------------ the front over settings tried

# issue #16's bars on a (concept, setting) row: (column, bar, "max" when the column must stay at or under
# the bar, "min" when at or over it)
TARGETS = [("ua", 0.02, "max"), ("ua_worst", 0.05, "max"), ("asr_softprompt", 0.10, "max"),
           ("asr_paraphrase", 0.05, "max"), ("asr_embedding", 0.20, "max"), ("asr_inversion", 0.20, "max"),
           ("retain_ratio_min", 0.95, "min"), ("fd_ratio_worst", 1.10, "max"), ("selected_fraction_max", 0.10, "max"),
           ("patch_fraction_max", 0.08, "max")]
# what the front trades: lower UA, lower soft-prompt ASR, higher worst-seed retain, less time
FRONT_AXES = [("ua", -1), ("asr_softprompt", -1), ("retain_ratio_min", 1), ("seconds", -1)]


def missed_targets(row: dict) -> list[str]:
    """The #16 bars a pooled row misses ('asr_softprompt 0.641 > 0.10'), then 'not measured: ...'
    for the bars its runs did not measure (an attack they did not run)."""
    out, unmeasured = [], []
    for key, bar, kind in TARGETS:
        v = row.get(key)
        if not isinstance(v, (int, float)):
            unmeasured.append(key)
        elif (kind == "max" and v > bar) or (kind == "min" and v < bar):
            out.append(f"{key} {v:.3f} {'>' if kind == 'max' else '<'} {bar:.2f}")
    return out + ([f"not measured: {', '.join(unmeasured)}"] if unmeasured else [])


def on_front(rows: list[dict]) -> list[bool]:
    """For rows of one concept: True where no other row is as good on every FRONT_AXES column and
    better on one. A row can only be dominated by one that measured every axis it measured (a
    setting never attacked does not push an attacked one off the front)."""
    def better_or_equal(a, b, key, sign):
        return sign * (a[key] - b[key]) >= 0

    flags = []
    for r in rows:
        dominated = False
        for o in rows:
            axes = [(k, s) for k, s in FRONT_AXES if k in r]
            if o is r or any(k not in o for k, _ in axes):
                continue
            if all(better_or_equal(o, r, k, s) for k, s in axes) and any(s * (o[k] - r[k]) > 0 for k, s in axes):
                dominated = True
                break
        flags.append(not dominated)
    return flags


# what a run was measured with beside its method and seed (run_key without concept, method, seed)
SETTING_FIELDS = ("steps_override", "sample_steps", "images", "attack_images", "leak_images", "attacks",
                  "attack_settings")
SETTING_DEFAULTS = {"leak_images": 0}  # what a run saved before the setting existed was measured with


def front_rows(sources: list[str], concepts: list[str]) -> list[dict]:
    """Every (concept, setting) pooled over its seeds, from each runs file in `sources`. A setting
    is a method measured one way within one file: runs of other evaluation settings or from other
    files stay apart, labelled by the file's directory (with more than one file) and by what
    differs from the file's most common settings. `front` and `missed` are filled in per concept."""
    rows = []
    dirs = [os.path.dirname(os.path.abspath(p)) for p in sources]
    top = os.path.dirname(os.path.commonpath(dirs))
    for path, where in zip(sources, dirs):
        runs = read_runs(path)
        tag = os.path.relpath(where, top) if os.path.basename(path) == "compare_runs.jsonl" else os.path.relpath(path, top)
        how = lambda r: json.dumps({k: r.get(k, SETTING_DEFAULTS.get(k)) for k in SETTING_FIELDS},  # noqa: E731
                                   sort_keys=True)
        usual = statistics.mode(how(r) for r in runs) if runs else None
        for measured in dict.fromkeys(how(r) for r in runs):
            same = [r for r in runs if how(r) == measured]
            differs = {k: v for k, v in json.loads(measured).items() if v != json.loads(usual)[k]}
            for row in aggregate(same, concepts, list(dict.fromkeys(r["method"] for r in same))):
                label = row["method"] + (f" [{tag}]" if len(sources) > 1 else "")
                row["setting"] = label + ("".join(f" {k}={v}" for k, v in differs.items()) if differs else "")
                rows.append(row)
    out = []
    for c in concepts:
        group = [r for r in rows if r["concept"] == c]
        for r, flag in zip(group, on_front(group)):
            r["front"], r["missed"] = flag, missed_targets(r)
        out += sorted(group, key=lambda r: (not r["front"], r.get("asr_softprompt", 1.0)))
    return out


def front_markdown(rows: list[dict]) -> str:
    head = ["concept", "setting", "seeds", "UA (pooled; 95% CI)", "asr_softprompt", "asr_embedding",
            "retain ratio (worst seed)", "s (median)", "on the front", "#16 bars missed"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["concept"], r["setting"], r["seeds"], rate(r, "ua"), rate(r, "asr_softprompt"),
                 rate(r, "asr_embedding"), fmt(r["retain_ratio_min"]), f"{r['seconds']:.0f}",
                 "yes" if r["front"] else "", "; ".join(r["missed"]) or "none"]
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return "\n".join(lines) + "\n"


def plot_front(rows: list[dict], path: str) -> None:
    """One panel per concept: soft-prompt ASR (pooled, 95% interval) against worst-seed retain ratio,
    one point per setting, the front filled, the #16 bars dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from trust_fast.io import atomic_path

    concepts = list(dict.fromkeys(r["concept"] for r in rows))
    fig, axes = plt.subplots(1, len(concepts), figsize=(4.2 * len(concepts), 4.0), dpi=110, squeeze=False)
    for ax, c in zip(axes[0], concepts):
        for r in (r for r in rows if r["concept"] == c and "asr_softprompt_n" in r):
            y = r["asr_softprompt"]
            err = [[y - r["asr_softprompt_lo"]], [r["asr_softprompt_hi"] - y]]
            ax.errorbar(r["retain_ratio_min"], y, yerr=err, fmt="o" if r["front"] else "x", capsize=2,
                        mfc=None if r["front"] else "none")
            ax.annotate(r["setting"], (r["retain_ratio_min"], y), fontsize=6, xytext=(3, 3), textcoords="offset points")
        ax.axhline(0.10, ls="--", lw=0.8, color="grey")
        ax.set_ylim(bottom=-0.02)
        ax.axvline(0.95, ls="--", lw=0.8, color="grey")
        ax.set_title(c, fontsize=9)
        ax.set_xlabel("retain / original (worst seed)", fontsize=8)
        ax.set_ylabel("asr_softprompt (pooled)", fontsize=8)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    with atomic_path(path, ".png") as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)


FRONT_BEGIN, FRONT_END = "<!-- FRONT:BEGIN -->", "<!-- FRONT:END -->"


def write_front(rows: list[dict], command: str, results: str = RESULTS) -> str:
    """front.json and front.png under `results`; the Markdown block between the FRONT markers of
    BENCHMARKS.md for the repository's own results directory. Returns the Markdown."""
    from trust_fast.io import write_json_atomic

    os.makedirs(results, exist_ok=True)
    write_json_atomic(rows, os.path.join(results, "front.json"))
    plot_front(rows, os.path.join(results, "front.png"))
    text = front_markdown(rows)
    if os.path.abspath(results) == os.path.abspath(RESULTS):
        block = f"{FRONT_BEGIN}\nCommand: `{command}`\n\n{text}\n![the front](benchmarks/results/front.png)\n{FRONT_END}"
        replace_block(os.path.join(os.path.dirname(HERE), "BENCHMARKS.md"), block,
                      "## The front over the settings tried (issue #16)", (FRONT_BEGIN, FRONT_END))
    return text


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--concepts", default=",".join(CONCEPTS))
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="training seeds")
    ap.add_argument("--steps", type=int, default=None, help="override every method's step count")
    ap.add_argument("--eval-every", type=int, default=5, help="quick UA evaluations every N steps for "
                    "secs_to_ua05 (0: none)")
    ap.add_argument("--sample-steps", type=int, default=None,
                    help="sampling steps of every evaluation and attack image (default: the evaluation's own)")
    ap.add_argument("--images", type=int, default=96, help="forget images per run for UA (at least)")
    ap.add_argument("--attack-images", type=int, default=32, help="attacked images per run and attack (at least)")
    ap.add_argument("--attacks", default=",".join(ATTACKS), help="comma-separated, or 'none'")
    ap.add_argument("--leak-images", type=int, default=2, help="images per prompt of the leak scan over every prompt "
                    "that could show the concept (about 250-300 prompts); 0: no scan")
    ap.add_argument("--softprompt-steps", type=int, default=40)
    ap.add_argument("--embedding-steps", type=int, default=None)
    ap.add_argument("--inversion-steps", type=int, default=None)
    ap.add_argument("--jobs", type=int, default=1, help="runs side by side (each then uses one thread)")
    ap.add_argument("--variant", action="append", default=[], metavar="NAME:FIELD=VALUE,...",
                    help="a TRUST variant to compare (TrustConfig fields over the defaults); name it in --methods")
    ap.add_argument("--table", action="store_true", help="only write the table from the saved runs")
    ap.add_argument("--print", action="store_true", dest="print_only",
                    help="with --table: print the table and write nothing (a side table of variants "
                         "that should not replace the comparison's outputs)")
    ap.add_argument("--front", nargs="*", metavar="RUNS.jsonl", default=None,
                    help="only write the front over every setting in these runs files (default: the results "
                         "directory's and its robust/ subdirectory's): pooled UA, soft-prompt ASR, worst retain, "
                         "time, and the #16 bars each misses")
    ap.add_argument("--results", default=RESULTS, help="directory of the runs and outputs (default "
                    "benchmarks/results; BENCHMARKS.md and README.md are updated only for that one)")
    ap.add_argument("--group", help=argparse.SUPPRESS)
    ap.add_argument("--method", help=argparse.SUPPRESS)
    ap.add_argument("--seed", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--json-out", help=argparse.SUPPRESS)
    args = ap.parse_args()
    from trust_fast.evaluation.attacks import parse_attacks

    for v in args.variant:
        add_variant(v)
    attacks = parse_attacks(args.attacks)
    settings = {"softprompt": {"attack_steps": args.softprompt_steps}}
    for name in ("embedding", "inversion"):
        if getattr(args, f"{name}_steps"):
            settings[name] = {"attack_steps": getattr(args, f"{name}_steps")}
    runs_path = os.path.join(args.results, "compare_runs.jsonl")
    if args.group:
        rows = run_group(args.group.split(","), args.method, args.seed, args.steps, args.eval_every, args.images,
                         args.attack_images, attacks, settings,
                         plots=args.results if args.seed == args.seeds[0] else None, sample_steps=args.sample_steps,
                         results=args.results, leak_images=args.leak_images)
        with open(args.json_out, "w") as f:
            json.dump(rows, f)
        return 0
    concepts, methods = args.concepts.split(","), args.methods.split(",")
    check_methods(methods)
    command = "python benchmarks/compare_methods.py " + " ".join(a for a in sys.argv[1:]
                                                                 if a != "--table" or args.front is not None)
    wanted = {"steps_override": args.steps, "sample_steps": args.sample_steps, "images": args.images,
              "attack_images": args.attack_images, "leak_images": args.leak_images, "attacks": attacks,
              "attack_settings": settings}
    if args.print_only and not args.table:
        refuse("--print goes with --table")
    if args.leak_images < 0:
        refuse(f"--leak-images must be >= 0, got {args.leak_images}")
    if args.front is not None:
        missing = [p for p in args.front if not os.path.isfile(p)]
        if missing:
            refuse(f"--front: no runs file {missing[0]!r}")
        sources = args.front or [p for p in (runs_path, os.path.join(args.results, "robust", "compare_runs.jsonl"))
                                 if os.path.exists(p)]
        rows = front_rows(sources, concepts)
        if not rows:
            refuse(f"no saved runs of {', '.join(concepts)} in {', '.join(sources) or args.results}")
        print(write_front(rows, command, args.results))
        return 0
    if args.table:
        rows = aggregate(runs_of([r for r in read_runs(runs_path, **wanted) if r["seed"] in args.seeds], methods),
                         concepts, methods)
        if not rows:
            refuse(f"no saved runs of {', '.join(methods)} on {', '.join(concepts)} with these settings in {runs_path}")
        if not args.print_only:
            write_outputs(rows, command, args.results)
        print(markdown(rows))
        return 0
    have = {run_key(r) for r in runs_of(read_runs(runs_path), methods)}
    todo = [(g, m, s) for s in args.seeds for g in training_groups(concepts) for m in methods
            if any(run_key({"concept": c, "method": m, "seed": s, **wanted}) not in have for c in g)]
    os.makedirs(args.results, exist_ok=True)
    env = dict(os.environ)
    if args.jobs > 1:  # runs side by side: one thread each, so they do not fight over the cores
        env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    pending, running = list(todo), []
    from tqdm.auto import tqdm

    bar = tqdm(total=len(todo), desc="compare (training runs)")
    while pending or running:
        while pending and len(running) < args.jobs:
            group, method, seed = pending.pop(0)
            out = os.path.join(args.results, f".run_{method}_{group[0].replace('|', '_if_')}_{seed}.json")
            cmd = [sys.executable, __file__, "--group", ",".join(group), "--method", method, "--seed", str(seed),
                   "--json-out", out, "--seeds", *map(str, args.seeds), "--eval-every", str(args.eval_every),
                   "--images", str(args.images), "--attack-images", str(args.attack_images),
                   "--leak-images", str(args.leak_images),
                   "--attacks", ",".join(attacks) or "none", "--softprompt-steps", str(args.softprompt_steps),
                   "--results", args.results, *[x for v in args.variant for x in ("--variant", v)]]
            for name in ("steps", "sample_steps", "embedding_steps", "inversion_steps"):
                if getattr(args, name):
                    cmd += [f"--{name.replace('_', '-')}", str(getattr(args, name))]
            running.append((group, method, seed, out, time.perf_counter(),
                            subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL)))
        time.sleep(1.0)
        for item in list(running):
            group, method, seed, out, t0, proc = item
            if proc.poll() is None:
                continue
            running.remove(item)
            if proc.returncode != 0:
                raise SystemExit(f"run {'/'.join(group)} / {method} / seed {seed} failed with exit code "
                                 f"{proc.returncode}")
            with open(out) as f:
                rows = json.load(f)
            os.unlink(out)
            with open(runs_path, "a") as f:  # one line per finished run: the comparison can be continued
                for r in rows:
                    f.write(json.dumps(r) + "\n")
            bar.update(1)
            for r in rows:
                asr = " ".join(f"{a} {r[f'asr_{a}']:.3f}" for a in attacks)
                bar.write(f"{r['concept']:12s} {method:9s} seed {seed} ua {r['ua']:.3f} retain {r['retain_acc']:.3f} "
                          f"{asr} train {r['seconds']:.1f} s (run {time.perf_counter() - t0:.0f} s)")
    bar.close()
    rows = aggregate(runs_of([r for r in read_runs(runs_path, **wanted) if r["seed"] in args.seeds], methods),
                     concepts, methods)
    write_outputs(rows, command, args.results)
    print(markdown(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
