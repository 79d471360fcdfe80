"""An unlearning run as `trust-fast unlearn` and `trust-fast demo` make it: the shapes world's
model evaluated before and after (and on a schedule during) the run, its before | after pictures,
and the warnings about what the run did. Benchmarks import these too (benchmarks/engine_sweep.py)."""
from __future__ import annotations

import contextlib
import os
import sys

# the keys of a world evaluation that measure the neighbours of "A+B" and "A|B" (neighbor_accuracy)
NEIGHBOR_KEYS = ("retain_a_without_b_acc", "retain_b_without_a_acc", "forget_condition_kept")


@contextlib.contextmanager
def showing_progress(desc: str, *pipes):
    """Show the pipelines' own denoising bars (stderr) for a phase that samples images, so that
    evaluation is not minutes of silence; hidden again afterwards."""
    for p in pipes:
        p.set_progress_bar_config(disable=False, desc=desc, leave=False)
    try:
        yield
    finally:
        for p in pipes:
            p.set_progress_bar_config(disable=True)


def neighbor_accuracy(spec, retain_images, n_per_prompt: int) -> dict:
    """For "A+B" and "A|B": accuracy (every attribute right) on retain prompts with A but not B and
    with B but not A, the neighbours an erasure must keep intact."""
    from ..evaluation.metrics import attribute_accuracy, predict_attrs
    from ..world import load_classifier, vocab
    from ..world.concepts import world_prompts

    truth = [a for a in world_prompts(spec).retain_attrs for _ in range(n_per_prompt)]
    preds = predict_attrs(load_classifier(), retain_images)
    out = {}
    for name, has, lacks in (("a_without_b", spec.a, spec.b), ("b_without_a", spec.b, spec.a)):
        idx = [i for i, t in enumerate(truth) if t[vocab.meaning(has).attribute] == has
               and t[vocab.meaning(lacks).attribute] != lacks]
        out[f"retain_{name}_acc"] = attribute_accuracy([preds[i] for i in idx], [truth[i] for i in idx])["all_acc"]
    return out


def evaluate_world(pipe, spec, n_per_prompt: int, seed: int, what: str = "evaluating"):
    """The shapes world's evaluation of `pipe` on `spec` (trust_fast.evaluation.evaluate, with the
    neighbours' accuracy for two-term concepts) and its images: (report, (forget, retain))."""
    from ..evaluation import evaluate

    with showing_progress(what, pipe):
        report, forget_imgs, retain_imgs = evaluate(pipe, spec, n_per_prompt=n_per_prompt, seed=seed,
                                                    return_images=True)
    if spec.b is not None:
        report.update(neighbor_accuracy(spec, retain_imgs, n_per_prompt))
    return report, (forget_imgs, retain_imgs)


def unlearn_with_evaluation(pipe, spec, cfg, prompts=None, world: bool = True, n_per_prompt: int = 4,
                            eval_seed: int = 0, eval_every: int = 0, progress: bool = True, resume: str | None = None,
                            checkpoint_dir: str | None = None, checkpoint_every: int = 0, log_dir: str | None = None,
                            shard=None):
    """Evaluate (world only), unlearn, evaluate again. Returns (unlearner, report, images), images
    being ((forget, retain) before, (forget, retain) after) for the world, else None. With
    `resume`, the run continues from the checkpoint in that directory; with `log_dir`, step stats
    and evaluations also go to TensorBoard there; `shard(pipe, cfg) -> cfg` (--fsdp) shards the
    denoiser before the unlearner is built and gives the config to run with, and the run ends by
    gathering it (rank 0 then evaluates and saves a plain one)."""
    from ..checkpoint import load_checkpoint
    from ..engine import TrustUnlearner

    # "before" is the original model, so a resumed run evaluates before loading its checkpoint (and, with
    # --fsdp, before the denoiser is sharded: rank 0 evaluates alone)
    before, imgs_before = (evaluate_world(pipe, spec, n_per_prompt, eval_seed, "evaluating before")
                           if world else (None, None))
    if shard is not None:
        cfg = shard(pipe, cfg)
    unlearner = TrustUnlearner(pipe, spec, cfg, prompts=prompts)
    if resume is not None:
        done = load_checkpoint(unlearner, resume)
        print(f"resuming from step {done} of {cfg.steps} ({resume})")
    run = dict(steps=max(0, cfg.steps - unlearner.step_count), progress=progress, checkpoint_dir=checkpoint_dir,
               checkpoint_every=checkpoint_every)
    with contextlib.ExitStack() as stack:
        if log_dir is not None:
            from dataclasses import asdict

            from ..tblog import TensorBoardLog

            run["log_fn"] = stack.enter_context(TensorBoardLog(log_dir, {"concept": str(spec), **asdict(cfg)}))
        return _run_and_report(unlearner, pipe, spec, world, n_per_prompt, eval_seed, eval_every, before,
                               imgs_before, run)


def _run_and_report(unlearner, pipe, spec, world, n_per_prompt, eval_seed, eval_every, before, imgs_before, run):
    """unlearn_with_evaluation once the unlearner is built: the run (`run`: TrustUnlearner.run's
    options), then, in the world, the evaluation after it beside `before`."""
    from ..evaluation import evaluate

    if not world:
        unlearner.run(**run)
        unlearner.unshard()
        return unlearner, unlearner.report(), None

    def eval_fn(u):
        r = evaluate(pipe, spec, n_per_prompt=1, seed=eval_seed)
        return {k: r[k] for k in ("ua", "retain_acc")}

    unlearner.run(eval_fn=eval_fn if eval_every > 0 else None, eval_interval=eval_every, **run)
    unlearner.unshard()
    report = unlearner.report()
    after, imgs_after = evaluate_world(pipe, spec, n_per_prompt, eval_seed, "evaluating after")
    report.update({"ua_before": before["ua"], "ua_after": after["ua"], "retain_before": before["retain_acc"],
                   "retain_after": after["retain_acc"], "eval_before": before, "eval_after": after})
    return unlearner, report, (imgs_before, imgs_after)


def write_pictures(out: str, spec, report: dict, images) -> list[str]:
    """The world run's pictures in `out`: forget.png and retain.png (one labelled row per prompt, before |
    after, same noise) and, when the run evaluated on a schedule, history.png (UA and retain accuracy
    against the step, the original model at step 0). Returns the file names written."""
    from ..evaluation.pictures import plot_history, write_grids
    from ..world.concepts import world_prompts

    (forget_before, retain_before), (forget_after, retain_after) = images
    prompts = world_prompts(spec)
    names = write_grids(out, {"forget": (prompts.forget, forget_before, forget_after),
                              "retain": (prompts.retain, retain_before, retain_after)})
    evals = report.get("evals") or []
    if evals:
        start = {"step": 0, "ua": report["ua_before"], "retain_acc": report["retain_before"]}
        plot_history([start, *evals], os.path.join(out, "history.png"),
                     title=f"{report.get('method', 'trust')}: {spec} (1 image per prompt during the run)")
        names.append("history.png")
    return names


def warn_about_the_run(report: dict) -> None:
    """One warning line each when steps were skipped or the saved model is unchanged (the report
    says it too: skipped_by_reason, unchanged)."""
    if report.get("skipped_steps"):
        why = ", ".join(f"{n} for {r}" for r, n in report["skipped_by_reason"].items())
        print(f"warning: {report['skipped_steps']} of {report['steps']} steps were skipped ({why})", file=sys.stderr)
    if report.get("unchanged"):
        print(f"warning: the saved model is unchanged: {report['unchanged']}", file=sys.stderr)
