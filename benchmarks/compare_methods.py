"""TRUST vs SalUn vs ESD on the built-in shapes model: same seeds, same evaluation, one table.

Each (concept, method) runs in its own subprocess so that its peak memory is its own. During a
run, UA and retain accuracy are evaluated on a schedule (small sample, evaluation time excluded
from the clock); `secs_to_ua05` is the method's own wall-clock (data-free image cache + steps) at
the first evaluation with UA <= 0.05. At the end: the full report (UA, retain, fd, paraphrase and
soft-prompt attacks) on the default evaluation sample. Methods: trust (TrustConfig defaults),
trust-adv (the same with its opt-in adversarial prefix, adv_prefix=5), salun, esd.

    python benchmarks/compare_methods.py                       # all 5 concepts x 4 methods
    python benchmarks/compare_methods.py --concepts red --methods trust,esd

Writes benchmarks/results/compare.csv, compare.json, compare.png, the per-run history plots, and the
Markdown table between the COMPARE markers of BENCHMARKS.md.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import resource
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "results")
CONCEPTS = ["red", "circle", "striped", "red+circle", "red|circle"]
METHODS = ["trust", "trust-adv", "salun", "esd"]
# named configurations beside the registered methods: TRUST with its opt-in adversarial prefix
VARIANTS = {"trust-adv": ("trust", {"adv_prefix": 5})}


def method_config(name: str, **overrides):
    """The TrustConfig a compared method runs with: a registered method or a named variant."""
    from trust_fast.methods import config

    base, extra = VARIANTS.get(name, (name, {}))
    return config(base, **extra, **overrides)
COLUMNS = ["concept", "method", "ua", "retain_acc", "retain_before", "fd", "fd_self", "asr_paraphrase",
           "asr_softprompt", "secs_to_ua05", "seconds", "steps", "peak_rss_mb", "train_mem_mb", "trainable_params",
           "mean_selected_rows", "optimizer_state_bytes"]


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def run_one(concept: str, method: str, steps: int | None, seed: int, eval_every: int, n_per_prompt: int,
            softprompt_steps: int) -> dict:
    import torch

    from trust_fast import TrustUnlearner
    from trust_fast.concepts import parse_concept
    from trust_fast.evaluation import evaluate, full_report
    from trust_fast.world import load_classifier, load_pipeline

    torch.manual_seed(seed)
    spec = parse_concept(concept)
    classifier = load_classifier()
    reference = load_pipeline("shapes")
    before = evaluate(reference, spec, classifier, n_per_prompt=n_per_prompt, seed=seed)
    pipe = load_pipeline("shapes")
    cfg = method_config(method, seed=seed, **({"steps": steps} if steps else {}))
    rss0 = _rss_mb()
    u = TrustUnlearner(pipe, concept=spec, config=cfg)

    def quick_eval(unl) -> dict:
        r = evaluate(unl.pipe, spec, classifier, n_per_prompt=1, seed=seed + 99)
        return {"ua": r["ua"], "retain_acc": r["retain_acc"], "train_seconds": unl.seconds}

    u.history.evals.append({"step": 0, **quick_eval(u)})
    u.run(progress=True, eval_fn=quick_eval, eval_interval=eval_every)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    hits = [e for e in u.history.evals if e["ua"] <= 0.05 and e["step"] > 0]
    rep = u.report()
    final = full_report(u.pipe, spec, reference, attack="all", classifier=classifier, n_per_prompt=n_per_prompt,
                        seed=seed, softprompt_steps=softprompt_steps)
    from trust_fast.evaluation.pictures import plot_history

    os.makedirs(RESULTS, exist_ok=True)
    plot_history(u.history.evals, os.path.join(RESULTS, f"history_{method}_{concept.replace('|', '_if_')}.png"),
                 title=f"{method}: {concept}")
    return {"concept": concept, "method": method, "ua": final["ua"], "retain_acc": final["retain_acc"],
            "ua_before": before["ua"], "retain_before": before["retain_acc"],
            "fd": final["fd"], "fd_self": final["fd_self"], "asr_paraphrase": final["asr_paraphrase"],
            "asr_softprompt": final["asr_softprompt"],
            "secs_to_ua05": hits[0]["train_seconds"] if hits else None,
            "seconds": u.seconds, "steps": u.step_count, "peak_rss_mb": peak, "train_mem_mb": max(0.0, peak - rss0),
            "trainable_params": rep.get("trainable_params"), "mean_selected_rows": rep.get("mean_selected_rows"),
            "optimizer_state_bytes": u.state_bytes()["optimizer_state_bytes"],
            "evals": u.history.evals, "final": {k: v for k, v in final.items() if k != "softprompt"},
            "phases": {k: sum(s.get(k, 0.0) for s in rep["history"]) for k in rep["history"][0] if k.startswith("time_")},
            "pool_seconds": u.pool_seconds, "config": rep.get("config"), "threads": torch.get_num_threads()}


def fmt(v) -> str:
    if v is None:
        return "never"
    if isinstance(v, float):
        return f"{v:.3f}" if abs(v) < 100 else f"{v:.0f}"
    return str(v)


def markdown(rows: list[dict]) -> str:
    cols = ["concept", "method", "ua", "retain_acc", "fd", "asr_paraphrase", "asr_softprompt", "secs_to_ua05",
            "seconds", "train_mem_mb"]
    head = "| " + " | ".join(cols) + " |\n|" + "---|" * len(cols) + "\n"
    cell = lambda v: fmt(v).replace("|", "\\|")  # noqa: E731  ("red|circle" inside a table)
    return head + "".join("| " + " | ".join(cell(r.get(c)) for c in cols) + " |\n" for r in rows)


def write_outputs(rows: list[dict], command: str) -> None:
    from trust_fast.io import atomic_path, write_json_atomic

    os.makedirs(RESULTS, exist_ok=True)
    with atomic_path(os.path.join(RESULTS, "compare.csv"), ".csv") as tmp, open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    write_json_atomic(rows, os.path.join(RESULTS, "compare.json"))
    plot(rows, os.path.join(RESULTS, "compare.png"))
    block = (f"{BEGIN}\nCommand: `{command}`\n\n{markdown(rows)}\n"
             f"![UA and seconds per method](benchmarks/results/compare.png)\n{END}")
    root = os.path.dirname(HERE)
    replace_block(os.path.join(root, "BENCHMARKS.md"), block, "## TRUST vs SalUn vs ESD")
    replace_block(os.path.join(root, "README.md"), block)  # its results section shows the same table


BEGIN, END = "<!-- COMPARE:BEGIN -->", "<!-- COMPARE:END -->"


def replace_block(path: str, block: str, heading: str | None = None) -> None:
    """Put ``block`` between the COMPARE markers of ``path`` (atomically).  A file without the
    markers gets it appended under ``heading``, or is left alone when no heading is given."""
    from trust_fast.io import atomic_path

    text = "# Benchmarks\n" if heading else ""
    if os.path.exists(path):
        with open(path) as f:
            text = f.read()
    if BEGIN in text and END in text:
        pre, rest = text.split(BEGIN, 1)
        text = pre + block + rest.split(END, 1)[1]
    elif heading:
        text = text.rstrip() + f"\n\n{heading}\n\n" + block + "\n"
    else:
        return
    with atomic_path(path, ".md") as tmp, open(tmp, "w") as f:
        f.write(text)


def plot(rows: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from trust_fast.io import atomic_path

    concepts = list(dict.fromkeys(r["concept"] for r in rows))
    methods = list(dict.fromkeys(r["method"] for r in rows))
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8), dpi=110)
    width = 0.8 / len(methods)
    for k, m in enumerate(methods):
        by = {r["concept"]: r for r in rows if r["method"] == m}
        xs = [i + k * width for i in range(len(concepts))]
        axes[0].bar(xs, [by[c]["ua"] if c in by else 0 for c in concepts], width, label=m)
        axes[1].bar(xs, [by[c]["retain_acc"] if c in by else 0 for c in concepts], width, label=m)
        axes[2].bar(xs, [by[c]["secs_to_ua05"] or 0 for c in concepts], width, label=m)
    for ax, title in zip(axes, ["UA after (lower is better)", "retain accuracy after", "seconds to UA <= 0.05 (0 = never)"]):
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(concepts))], concepts, rotation=20)
        ax.set_title(title)
        ax.grid(axis="y", alpha=0.3)
    axes[0].legend()
    fig.tight_layout()
    with atomic_path(path, ".png") as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--concepts", default=",".join(CONCEPTS))
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--steps", type=int, default=None, help="override every method's step count")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--eval-every", type=int, default=5)
    ap.add_argument("--n-per-prompt", type=int, default=4)
    ap.add_argument("--softprompt-steps", type=int, default=40)
    ap.add_argument("--jobs", type=int, default=1, help="runs side by side (each then uses one thread)")
    ap.add_argument("--one", nargs=2, metavar=("CONCEPT", "METHOD"), help=argparse.SUPPRESS)
    ap.add_argument("--json-out", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        row = run_one(args.one[0], args.one[1], args.steps, args.seed, args.eval_every, args.n_per_prompt,
                      args.softprompt_steps)
        with open(args.json_out, "w") as f:
            json.dump(row, f)
        return 0
    runs = [(c, m) for c in args.concepts.split(",") for m in args.methods.split(",")]
    from trust_fast.methods import METHODS as REGISTERED

    unknown = sorted({m for _, m in runs} - set(REGISTERED) - set(VARIANTS))
    if unknown:
        raise SystemExit(f"unknown method(s) {', '.join(unknown)}; choose from {', '.join(list(REGISTERED) + list(VARIANTS))}")
    os.makedirs(RESULTS, exist_ok=True)
    env = dict(os.environ)
    if args.jobs > 1:  # runs side by side: one thread each, so they do not fight over the cores
        env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    pending, running, done = list(runs), [], {}
    from tqdm.auto import tqdm

    bar = tqdm(total=len(runs), desc="compare")
    while pending or running:
        while pending and len(running) < args.jobs:
            concept, method = pending.pop(0)
            out = os.path.join(RESULTS, f".run_{method}_{concept.replace('|', '_if_')}.json")
            cmd = [sys.executable, __file__, "--one", concept, method, "--json-out", out, "--seed", str(args.seed),
                   "--eval-every", str(args.eval_every), "--n-per-prompt", str(args.n_per_prompt),
                   "--softprompt-steps", str(args.softprompt_steps)] + (["--steps", str(args.steps)] if args.steps else [])
            running.append((concept, method, out, time.perf_counter(),
                            subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL)))
        time.sleep(1.0)
        for item in list(running):
            concept, method, out, t0, proc = item
            if proc.poll() is None:
                continue
            running.remove(item)
            if proc.returncode != 0:
                raise SystemExit(f"run {concept} / {method} failed with exit code {proc.returncode}")
            with open(out) as f:
                r = done[(concept, method)] = json.load(f)
            os.unlink(out)
            bar.update(1)
            bar.write(f"{concept:12s} {method:6s} ua {r['ua']:.3f} retain {r['retain_acc']:.3f} "
                      f"to-0.05 {fmt(r['secs_to_ua05'])} s, total {r['seconds']:.1f} s "
                      f"(run {time.perf_counter() - t0:.0f} s)")
    bar.close()
    rows = [done[k] for k in runs]
    write_outputs(rows, "python benchmarks/compare_methods.py " + " ".join(sys.argv[1:]))
    print(markdown(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
