"""The `trust-fast` command line.

Errors a user can cause (bad spec, missing model, bad paths) print one line and exit 2;
--debug shows the traceback instead.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys

from .defaults import ADV_MODES, AMP_MODES


class UserError(ValueError):
    """A problem with the user's input; the CLI prints it as one line."""


class OneLineParser(argparse.ArgumentParser):
    """argparse whose usage errors are one line like every other error (the usage block is what
    --help is for); subparsers inherit the class (add_subparsers' default parser_class)."""

    def error(self, message: str):
        self.exit(2, f"trust-fast: error: {message} (see {self.prog} --help)\n")

    def parse_known_args(self, args=None, namespace=None):
        # a command refuses its own unknown arguments, so that the line points at its --help
        namespace, extras = super().parse_known_args(args, namespace)
        if extras and self._subparsers is None:
            self.error(f"unrecognized arguments: {' '.join(extras)}")
        return namespace, extras


def _add_sampling(p: argparse.ArgumentParser) -> None:
    from .defaults import DEFAULT_GUIDANCE, DEFAULT_STEPS

    p.add_argument("--steps", type=int, default=DEFAULT_STEPS,
                   help="sampling steps of the model's own scheduler (default %(default)s)")
    p.add_argument("--guidance", type=float, default=DEFAULT_GUIDANCE,
                   help="classifier-free guidance scale (default %(default)s; the shapes world wants low guidance)")


# (argument, rule) for every number a command takes: one checker runs them all before any work
_AT_LEAST_ONE = ("n", "n_per_prompt", "steps", "softprompt_steps", "embedding_steps", "inversion_steps", "diffusion_steps", "classifier_steps",
                 "batch_size", "x0_per_prompt", "x0_retain_per_prompt", "x0_steps", "loc_interval", "min_row_updates")
_AT_LEAST_ZERO = ("eval_every", "checkpoint_every", "adv_prefix")
_POSITIVE = ("lr", "max_minutes", "attack_lr")
_FINITE = ("guidance", "alpha", "lam")
# counts that size an allocation: beyond these a command would only exhaust memory (a traceback or an
# abort that leaves its staging behind), never finish
_AT_MOST = {"n": 10_000, "n_per_prompt": 10_000, "x0_per_prompt": 10_000, "x0_retain_per_prompt": 10_000,
            "batch_size": 65_536, "adv_prefix": 64, "hessian_micro_batch": 65_536}
SEED_LIMIT = 2**63  # torch generators take seeds in [0, 2**64); keep them in int64 for every backend


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def check_numbers(args: argparse.Namespace) -> None:
    """Refuse, in one line naming the flag, any number that would crash later or do nothing."""
    import math

    for name in dict.fromkeys(_AT_LEAST_ONE + _AT_LEAST_ZERO + _POSITIVE + _FINITE + ("seed",) + tuple(_AT_MOST)):
        value = getattr(args, name, None)
        if value is None:
            continue
        if not math.isfinite(value):
            raise UserError(f"{_flag(name)} must be a finite number, got {value}")
        if name in _AT_LEAST_ONE and value < 1:
            raise UserError(f"{_flag(name)} must be positive, got {value}")
        if name in _AT_LEAST_ZERO and value < 0:
            raise UserError(f"{_flag(name)} must be >= 0, got {value}")
        if name in _POSITIVE and not value > 0:
            raise UserError(f"{_flag(name)} must be positive, got {value}")
        if name == "seed" and not 0 <= value < SEED_LIMIT:
            raise UserError(f"--seed must be in [0, 2**63), got {value}")
        if name in _AT_MOST and value > _AT_MOST[name]:
            raise UserError(f"{_flag(name)} must be at most {_AT_MOST[name]:,}, got {value:,}")
    if getattr(args, "guidance", None) is not None and args.guidance < 0:
        raise UserError(f"--guidance must be >= 0, got {args.guidance}")


def check_device(text: str | None) -> None:
    """Refuse, in one line, a --device torch cannot parse or this machine does not have (torch says
    so only mid-load, in a traceback). Backends torch has a module for (cuda, mps, xpu, ...) are
    asked for their device count; any other device type must take a tensor."""
    if text is None:
        return
    import torch

    try:
        device = torch.device(text)
    except (RuntimeError, ValueError):
        raise UserError(f"--device {text!r} is not a torch device (e.g. cpu, cuda, cuda:1)") from None
    if device.type == "cpu":
        return
    if device.type == "meta":
        raise UserError(f"--device {text!r} holds shapes without data; sampling and unlearning need cpu or an "
                        "accelerator")
    backend = getattr(torch, device.type, None)
    if not hasattr(backend, "device_count"):
        try:
            torch.empty(0, device=device)
        except Exception as e:  # each backend fails its own way
            raise UserError(f"--device {text!r} is not usable here: {_one_line(e)}") from None
        return
    count, kind = backend.device_count(), device.type.upper()
    if count == 0:
        raise UserError(f"--device {text!r}: no {kind} device is available (torch {torch.__version__} sees none)")
    if device.index is not None and device.index >= count:
        raise UserError(f"--device {text!r}: this machine has {count} {kind} device(s), "
                        f"{device.type}:0 to {device.type}:{count - 1}")


def _claim(path: str, what: str, args, **kw):
    """The command's claim of an output (trust_fast.io.claim_output, honouring --overwrite)."""
    from .io import claim_output

    return claim_output(path, what, overwrite=getattr(args, "overwrite", False), **kw)


def cmd_generate(args) -> int:
    import torch

    from PIL import Image

    from .concepts import MAX_PROMPT
    from .evaluation.metrics import to_pixels
    from .world import model_path, save_grid

    if len(args.prompt) > MAX_PROMPT:
        raise UserError(f"--prompt has {len(args.prompt)} characters; at most {MAX_PROMPT}")
    with _claim(args.out, "--out", args, inputs=[("model directory", model_path(args.model))]) as out:
        pipe = _load(args, args.model)
        pipe.set_progress_bar_config(disable=False, desc="sampling")
        g = torch.Generator().manual_seed(args.seed)
        images = pipe([args.prompt] * args.n, num_inference_steps=args.steps, guidance_scale=args.guidance,
                      generator=g, output_type="latent").images
        images = to_pixels(pipe, images)  # latent diffusion pipelines sample VAE latents; decode them
        if not bool(torch.isfinite(images).all()):
            raise ValueError(f"model {args.model!r} produced non-finite images; nothing was written")
        for i, img in enumerate(images):
            arr = ((img.clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).cpu().numpy()
            Image.fromarray(arr).save(os.path.join(out.path, f"{i:03d}.png"), format="PNG")
        save_grid(images, os.path.join(out.path, "grid.png"), nrow=min(8, args.n),
                  scale=max(1, 96 // images.shape[-1]))
    print(f"wrote {args.n} images and grid.png to {args.out}")
    return 0


def cmd_evaluate(args) -> int:
    from .concepts import parse_concept, read_prompt_file
    from .evaluation import format_table
    from .io import is_json_report, write_json_atomic
    from .world import is_world_model, model_path

    if args.grids and args.reference == "none":
        raise UserError("--grids shows the reference's images beside the model's: it needs a --reference")
    world = is_world_model(args.model)
    spec = parse_concept(args.concept, world=world)
    generic = not world or bool(args.forget_prompts)
    if world and not args.forget_prompts and args.retain_prompts:
        raise UserError("--retain-prompts goes with --forget-prompts (the shapes world has its own prompts)")
    reference_name = args.reference or ("shapes" if world else None)
    if generic:
        from .concepts import user_prompts

        if not args.forget_prompts:
            raise UserError(f"{args.model!r} is not a shapes-world model: give --forget-prompts (and --retain-prompts)")
        if reference_name in (None, "none"):
            raise UserError(f"{args.model!r} has no classifier to judge it: give --reference, the original model "
                            "it was unlearned from")
        if args.n_per_prompt < 2:
            raise UserError(f"--n-per-prompt must be >= 2 for the classifier-free report, got {args.n_per_prompt}")
        retain = read_prompt_file(args.retain_prompts, "retain prompts") if args.retain_prompts else []
        prompts = user_prompts(spec, read_prompt_file(args.forget_prompts, "forget prompts"), retain)
    inputs = [("model directory", model_path(args.model))]
    if reference_name not in (None, "none"):
        inputs.append(("reference model directory", model_path(reference_name)))
    with contextlib.ExitStack() as stack:
        grids = stack.enter_context(_claim(args.grids, "--grids", args, inputs=inputs)).path if args.grids else None
        report_out = (stack.enter_context(_claim(args.out, "--out", args, kind="file", recognize=is_json_report,
                                                 inputs=inputs + [("--grids directory", args.grids)]))
                      if args.out else None)
        report, keys = _evaluate(args, spec, world, generic, reference_name, prompts if generic else None, grids)
        if report_out is not None:
            write_json_atomic(report, report_out.path)
    print(format_table([(args.model, report)], keys))
    for item in report.get("skipped", []):
        print(f"skipped: {item}")
    for item in report.get("notes", []):
        print(f"note: {item}")
    if report.get("grids"):
        print(f"wrote {', '.join(report['grids'])} to {args.grids}")
    if args.out:
        print(f"wrote {args.out}")
    return 0


def _attack_settings(args) -> dict:
    """Per-attack settings from the evaluate flags (each attack keeps its own defaults otherwise)."""
    out: dict = {name: {"attack_steps": steps} for name, steps in (("embedding", args.embedding_steps),
                                                                   ("inversion", args.inversion_steps)) if steps}
    if args.attack_lr is not None:
        for name in ("softprompt", "embedding", "inversion"):
            out.setdefault(name, {})["lr"] = args.attack_lr
    return out


def _attack_choice(text: str) -> str:
    """argparse type of --attack: 'none', 'all' or a comma-separated list of attack names."""
    from .evaluation.attacks import parse_attacks

    try:
        parse_attacks(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return text


def _evaluate(args, spec, world: bool, generic: bool, reference_name, prompts, grids):
    """The report of `trust-fast evaluate` and the keys its table shows."""
    from .evaluation import full_report

    if not generic:
        pipe = _load(args, args.model)
        reference = None if reference_name == "none" else _load(args, reference_name)
        report = full_report(pipe, spec, reference, args.attack, n_per_prompt=args.n_per_prompt, seed=args.seed,
                             steps=args.steps, guidance=args.guidance, softprompt_steps=args.softprompt_steps,
                             grids=grids, settings=_attack_settings(args))
        keys = [k for k in report if k.endswith("acc") or k in ("ua", "fd", "fd_self")
                or (k.startswith("asr_") and not k.endswith(("_hits", "_n")))] + ["n_images", "seconds"]
    else:
        # no classifier judges these images (another model, or the user's own prompts): compare with the
        # original model, prompt by prompt
        from .evaluation.generic import generic_report

        pipe = _load(args, args.model)
        reference = _load(args, reference_name)
        report = generic_report(pipe, reference, prompts.forget, prompts.retain, args.attack,
                                n_per_prompt=args.n_per_prompt, seed=args.seed, steps=args.steps,
                                guidance=args.guidance, softprompt_steps=args.softprompt_steps, grids=grids,
                                settings=_attack_settings(args), concept_word=spec.a)
        report["concept"] = str(spec)
        keys = [k for k in ("forget_change", "retain_change", "selectivity", "fd", "fd_self") if k in report]
        keys += [k for k in report if k.endswith(("_change", "_change_original", "_recovery")) and k not in keys]
        keys += ["seconds"]
    report.update(model=args.model, reference=reference_name, written_by="trust_fast")
    return report, keys


def cmd_world_train(args) -> int:
    from .world.train import main_train

    rec = main_train(args.what, out=args.out, diffusion_steps=args.diffusion_steps, max_minutes=args.max_minutes,
                     classifier_steps=args.classifier_steps, seed=args.seed, overwrite=args.overwrite)
    print(json.dumps(rec, indent=1))
    return 0


def _unlearning_config(args):
    from .methods import config

    overrides = {"seed": args.seed}
    for name in ("steps", "hessian", "lr", "xi", "max_fraction", "alpha", "lam", "loc_interval", "batch_size",
                 "x0_per_prompt", "x0_retain_per_prompt", "x0_steps", "retain_neighbors", "adv_prefix", "adv_mode",
                 "min_row_updates", "amp", "compile_unet", "channels_last", "grad_checkpointing", "hessian_micro_batch"):
        value = getattr(args, name, None)
        if value is not None:
            overrides[name] = value
    if getattr(args, "targets", None):
        overrides["targets"] = tuple(t.strip() for t in args.targets.split(",") if t.strip())
        if not overrides["targets"]:
            raise UserError(f"--targets {args.targets!r} names no module pattern")
    if getattr(args, "compile_unet", None) is not None:
        _check_compile_backend(args.compile_unet)
    cfg = config(args.method, **overrides)
    cfg.validate()
    return cfg


def _check_compile_backend(name: str) -> None:
    """--compile-unet takes a backend the engine checked against eager; inductor is left to the
    config's own refusal, which says why."""
    from .config import COMPILE_BACKENDS

    if name not in COMPILE_BACKENDS and name != "inductor":
        raise UserError(f"--compile-unet {name!r} is not a backend trust_fast compiles with; choose "
                        f"{', '.join(COMPILE_BACKENDS)}")


def _neighbor_accuracy(spec, retain_images, n_per_prompt: int) -> dict:
    """For "A+B" and "A|B": accuracy (every attribute right) on retain prompts with A but not B and
    with B but not A, the neighbours an erasure must keep intact."""
    from .world.concepts import world_prompts
    from .evaluation.metrics import attribute_accuracy, predict_attrs
    from .world import load_classifier, vocab

    truth = [a for a in world_prompts(spec).retain_attrs for _ in range(n_per_prompt)]
    preds = predict_attrs(load_classifier(), retain_images)
    out = {}
    for name, has, lacks in (("a_without_b", spec.a, spec.b), ("b_without_a", spec.b, spec.a)):
        idx = [i for i, t in enumerate(truth) if t[vocab.meaning(has).attribute] == has
               and t[vocab.meaning(lacks).attribute] != lacks]
        out[f"retain_{name}_acc"] = attribute_accuracy([preds[i] for i in idx], [truth[i] for i in idx])["all_acc"]
    return out


_NEIGHBOR_KEYS = ("retain_a_without_b_acc", "retain_b_without_a_acc", "forget_condition_kept")


@contextlib.contextmanager
def _showing_progress(desc: str, *pipes):
    """Show the pipelines' own denoising bars (stderr) for a phase that samples images, so that
    evaluation is not minutes of silence; hidden again afterwards."""
    for p in pipes:
        p.set_progress_bar_config(disable=False, desc=desc, leave=False)
    try:
        yield
    finally:
        for p in pipes:
            p.set_progress_bar_config(disable=True)


def _evaluate_world(pipe, spec, n_per_prompt: int, seed: int, what: str = "evaluating"):
    from .evaluation import evaluate

    with _showing_progress(what, pipe):
        report, forget_imgs, retain_imgs = evaluate(pipe, spec, n_per_prompt=n_per_prompt, seed=seed,
                                                    return_images=True)
    if spec.b is not None:
        report.update(_neighbor_accuracy(spec, retain_imgs, n_per_prompt))
    return report, (forget_imgs, retain_imgs)


def _unlearn(pipe, spec, cfg, prompts=None, world: bool = True, n_per_prompt: int = 4, eval_seed: int = 0,
             eval_every: int = 0, progress: bool = True, resume: str | None = None,
             checkpoint_dir: str | None = None, checkpoint_every: int = 0, log_dir: str | None = None,
             shard=None):
    """Evaluate (world only), unlearn, evaluate again. Returns (unlearner, report, images), images
    being ((forget, retain) before, (forget, retain) after) for the world, else None. With
    `resume`, the run continues from the checkpoint in that directory; with `log_dir`, step stats
    and evaluations also go to TensorBoard there; `shard(pipe, cfg) -> cfg` (--fsdp) shards the
    denoiser before the unlearner is built and gives the config to run with, and the run ends by
    gathering it (rank 0 then evaluates and saves a plain one)."""
    from .checkpoint import load_checkpoint
    from .engine import TrustUnlearner

    # "before" is the original model, so a resumed run evaluates before loading its checkpoint (and, with
    # --fsdp, before the denoiser is sharded: rank 0 evaluates alone)
    before, imgs_before = (_evaluate_world(pipe, spec, n_per_prompt, eval_seed, "evaluating before")
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

            from .tblog import TensorBoardLog

            run["log_fn"] = stack.enter_context(TensorBoardLog(log_dir, {"concept": str(spec), **asdict(cfg)}))
        return _unlearn_and_report(unlearner, pipe, spec, world, n_per_prompt, eval_seed, eval_every, before,
                                   imgs_before, run)


def _unlearn_and_report(unlearner, pipe, spec, world, n_per_prompt, eval_seed, eval_every, before, imgs_before,
                        run):
    from .evaluation import evaluate

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
    after, imgs_after = _evaluate_world(pipe, spec, n_per_prompt, eval_seed, "evaluating after")
    report.update({"ua_before": before["ua"], "ua_after": after["ua"], "retain_before": before["retain_acc"],
                   "retain_after": after["retain_acc"], "eval_before": before, "eval_after": after})
    return unlearner, report, (imgs_before, imgs_after)


def _write_pictures(out: str, spec, report: dict, images) -> list[str]:
    """The world run's pictures in `out`: forget.png and retain.png (one labelled row per prompt, before |
    after, same noise) and, when the run evaluated on a schedule, history.png (UA and retain accuracy
    against the step, the original model at step 0). Returns the file names written."""
    from .world.concepts import world_prompts
    from .evaluation.pictures import plot_history, write_grids

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


def _evaluate_against_original(pipe, model: str, prompts, args, grids: str) -> dict:
    """The classifier-free report of an unlearned pipeline against its original (reloaded from `model`),
    with labelled original | evaluated grids written into the output directory."""
    from .evaluation.generic import generic_report

    reference = _load(args, model)
    with _showing_progress("comparing with the original", pipe, reference):
        return generic_report(pipe, reference, prompts.forget, prompts.retain, n_per_prompt=max(2, args.n_per_prompt),
                              seed=args.seed, grids=grids)


def _check_log_dir(log_dir: str, inputs: list) -> None:
    """--log-dir: TensorBoard must be installed, and the directory may be new or hold other runs'
    event files, but may not be a file, nor inside a model or the output (whose contents a run replaces)."""
    from .tblog import tensorboard_missing

    problem = tensorboard_missing()
    if problem:
        raise UserError(problem)
    if os.path.exists(log_dir) and not os.path.isdir(log_dir):
        raise UserError(f"--log-dir {log_dir!r} is a file, not a directory")
    real = os.path.realpath(log_dir)
    for what, path in inputs:
        if path and (real == os.path.realpath(path) or real.startswith(os.path.realpath(path) + os.sep)):
            raise UserError(f"--log-dir {log_dir!r} is inside the {what}; give a directory of its own")


def cmd_unlearn(args) -> int:
    from .checkpoint import claim_checkpoint_dir, has_checkpoint
    from .concepts import parse_concept, read_prompt_file, user_prompts
    from .io import write_json_atomic
    from .world import is_world_model, model_path

    src = model_path(args.model)
    checkpoint_dir = args.resume or args.checkpoint_dir or (args.out.rstrip("/\\") + ".checkpoint")
    if args.resume is not None and not has_checkpoint(args.resume):
        raise UserError(f"--resume {args.resume!r} holds no checkpoint")
    if args.log_dir is not None:
        _check_log_dir(args.log_dir, [("model directory", src), ("--out directory", args.out)])
    world = is_world_model(args.model)
    spec = parse_concept(args.concept, world=world)
    prompts = None
    if args.forget_prompts or not world:
        if not args.forget_prompts:
            raise UserError(f"{args.model!r} is not a shapes-world model: give --forget-prompts (and --retain-prompts)")
        retain = read_prompt_file(args.retain_prompts, "retain prompts") if args.retain_prompts else None
        prompts = user_prompts(spec, read_prompt_file(args.forget_prompts, "forget prompts"), retain, args.anchor)
    cfg = _unlearning_config(args)
    from . import distributed

    if args.fsdp:
        if distributed.launched_world_size() <= 1:
            raise UserError("--fsdp shards the denoiser over several processes: launch with "
                            "torchrun --nproc-per-node N (N > 1) or accelerate launch")
        if args.eval_every:
            raise UserError("--eval-every evaluates on rank 0 alone, which a sharded denoiser cannot do: "
                            "drop it with --fsdp (the run is still evaluated before and after)")
    inputs = [("model directory", src), ("--resume checkpoint directory", args.resume)]
    # under torchrun / accelerate launch: every rank trains (gradients averaged before localization),
    # rank 0 alone evaluates, saves and reports
    launched = distributed.init_from_env()
    try:
        lead = distributed.rank() == 0
        with contextlib.ExitStack() as claims:
            # rank 0 claims --out; the other ranks learn of a refusal instead of waiting in a collective
            out = claims.enter_context(distributed.lead_then_follow(lambda: _claim(args.out, "--out", args,
                                                                                   inputs=inputs)))
            if args.checkpoint_every:
                claims.enter_context(claim_checkpoint_dir(
                    checkpoint_dir, overwrite=args.overwrite or args.resume is not None,
                    inputs=[("model directory", src), ("--out directory", args.out)]))
            pipe = _load(args, args.model)
            unlearner, report, images = _unlearn(pipe, spec, cfg, prompts,
                                                 world=world and prompts is None and not args.no_eval and lead,
                                                 n_per_prompt=args.n_per_prompt, eval_seed=args.seed,
                                                 eval_every=args.eval_every, progress=lead, resume=args.resume,
                                                 checkpoint_dir=checkpoint_dir if args.checkpoint_every else None,
                                                 checkpoint_every=args.checkpoint_every,
                                                 log_dir=args.log_dir if lead else None,
                                                 shard=_fsdp_sharder() if args.fsdp else None)
            if unlearner.sharding is None:
                digests = distributed.gather_digests(unlearner.params)
                if len(set(digests)) > 1:
                    raise distributed.RankMismatchError(f"ranks ended with different weights: {digests}")
            else:  # each rank trained its own rows: the digest is of the gathered weights
                digests = [distributed.weights_digest(unlearner.full_params())]
            if lead:
                unlearner.write_pipeline(out.path)
                report.update(model=args.model, world_size=distributed.world_size(), weights_sha256=digests[0],
                              written_by="trust_fast")
                # pictures and the classifier-free evaluation are extras: a failure there must not cost the
                # run its report
                try:
                    if images is not None:
                        report["pictures"] = _write_pictures(out.path, spec, report, images)
                    elif prompts is not None and not args.no_eval:
                        report["eval_vs_original"] = _evaluate_against_original(pipe, args.model, prompts, args,
                                                                                out.path)
                        report["pictures"] = report["eval_vs_original"].get("grids", [])
                except (OSError, ValueError, RuntimeError) as e:
                    report["pictures_error"] = f"{type(e).__name__}: {e}"
                    print(f"warning: could not evaluate or draw the result: {report['pictures_error']}",
                          file=sys.stderr)
                write_json_atomic(report, os.path.join(out.path, "report.json"))
        distributed.barrier()
    finally:
        if launched:
            distributed.shutdown()
    if not lead:
        return 0
    from .evaluation import format_table

    if "ua_before" in report:
        rows = [(name, {"ua": report[f"eval_{name}"]["ua"], "retain_acc": report[f"eval_{name}"]["retain_acc"],
                        **{k: report[f"eval_{name}"][k] for k in _NEIGHBOR_KEYS if k in report[f"eval_{name}"]}})
                for name in ("before", "after")]
        print(format_table(rows, list(rows[0][1])))
    if "eval_vs_original" in report:
        free = report["eval_vs_original"]
        print(format_table([("vs original", free)], [k for k in ("forget_change", "retain_change", "selectivity",
                                                                "fd", "fd_self") if k in free]))
    keys = ["steps", "seconds", "mean_selected_rows", "mean_selected_fraction", "trainable_params",
            "optimizer_state_bytes"]
    print(format_table([(f"{report['method']} {report['concept']}", report)], keys))
    _warn_about_the_run(report)
    pictures = "".join(f", {name}" for name in report.get("pictures", []))
    print(f"wrote the unlearned pipeline, report.json{pictures} to {args.out}")
    return 0


def _warn_about_the_run(report: dict) -> None:
    """One warning line each when steps were skipped or the saved model is unchanged (the report
    says it too: skipped_by_reason, unchanged)."""
    if report.get("skipped_steps"):
        why = ", ".join(f"{n} for {r}" for r, n in report["skipped_by_reason"].items())
        print(f"warning: {report['skipped_steps']} of {report['steps']} steps were skipped ({why})", file=sys.stderr)
    if report.get("unchanged"):
        print(f"warning: the saved model is unchanged: {report['unchanged']}", file=sys.stderr)


def cmd_demo(args) -> int:
    from .concepts import parse_concept
    from .evaluation import format_table
    from .io import write_json_atomic
    from .methods import config
    from .world import load_pipeline, model_path

    spec = parse_concept(args.concept)
    overrides = {"seed": args.seed, **({"steps": args.steps} if args.steps is not None else {})}
    cfg = config("trust", **overrides)
    cfg.validate()
    with _claim(args.out, "--out", args, inputs=[("built-in model directory", model_path("shapes"))]) as out:
        pipe = load_pipeline("shapes")
        print(f"unlearning {str(spec)!r} from the built-in shapes model with TRUST (CPU: a few minutes)")
        unlearner, report, images = _unlearn(pipe, spec, cfg, n_per_prompt=args.n_per_prompt,
                                             eval_every=args.eval_every)
        rows = [("before", {"ua": report["ua_before"], "retain_acc": report["retain_before"],
                            "seconds": report["eval_before"]["seconds"]}),
                ("after", {"ua": report["ua_after"], "retain_acc": report["retain_after"],
                           "seconds": report["seconds"]})]
        print(format_table(rows, ["ua", "retain_acc", "seconds"]))
        print("ua: share of images of the concept's prompts that show it; retain_acc: other prompts drawn right;"
              " seconds: evaluation (before), unlearning (after)")
        report["pictures"] = _write_pictures(out.path, spec, report, images)
        unlearner.write_pipeline(os.path.join(out.path, "model"))
        report["written_by"] = "trust_fast"
        write_json_atomic(report, os.path.join(out.path, "report.json"))
    _warn_about_the_run(report)
    print(f"wrote {', '.join(report['pictures'])}, model/ and report.json to {args.out}")
    return 0


def cmd_export_patch(args) -> int:
    from .patch import export_patch, is_patch_file
    from .world import load_pipeline, model_path

    base, unlearned = model_path(args.base), model_path(args.unlearned)
    with _claim(args.out, "--out", args, kind="file", recognize=is_patch_file,
                inputs=[("base model directory", base), ("unlearned model directory", unlearned)]) as out:
        stats = export_patch(load_pipeline(args.base, "cpu", variant=args.variant),
                             load_pipeline(args.unlearned, "cpu", variant=args.variant), out.path)
    print(f"wrote {args.out}: {stats['changed_rows']} changed rows in {stats['changed_tensors']} tensors, "
          f"{stats['patch_bytes']} bytes = {100 * stats['fraction_of_unet']:.3f}% of the UNet ({stats['unet_bytes']} bytes)")
    if stats["changed_rows"] == 0:
        print("warning: the unlearned model's denoiser equals the base's: the patch changes nothing", file=sys.stderr)
    return 0


def cmd_apply_patch(args) -> int:
    from .io import write_pretrained
    from .patch import apply_patch, read_patch
    from .world import load_pipeline, model_path

    base = model_path(args.base)
    _, meta = read_patch(args.patch)  # a bad patch is refused before the output is claimed
    with _claim(args.out, "--out", args, inputs=[("base model directory", base), ("patch", args.patch)]) as out:
        write_pretrained(apply_patch(load_pipeline(args.base, "cpu", variant=args.variant), args.patch), out.path)
    print(f"wrote the patched pipeline to {args.out}")
    if int(meta["changed_rows"]) == 0:
        print("warning: the patch changes no row: the written pipeline equals the base model", file=sys.stderr)
    return 0


def _add_model_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"], default="auto",
                   help="load the model in this dtype (default auto: the dtype its weights were saved in)")
    _add_variant(p, "(outputs are saved the same way)")
    p.add_argument("--device", default=None, help="torch device, e.g. cuda:1 or cpu (default: cuda if available)")


def _add_variant(p: argparse.ArgumentParser, which: str) -> None:
    p.add_argument("--variant", default=None, help=f"weights variant to load, e.g. fp16 for *.fp16.safetensors, {which}")


def _fsdp_sharder():
    """--fsdp: `shard(pipe, cfg) -> cfg` shards the denoiser with FSDP2 (trust_fast.fsdp.shard_denoiser)
    and returns the config to run with. On a CUDA device that supports bf16 and with --amp auto/bf16,
    FSDP2 computes in bf16 (its MixedPrecisionPolicy), so the returned config turns the engine's
    own autocast off (the engine refuses it on a sharded denoiser); the caller's config is not changed."""
    def shard(pipe, cfg):
        import torch

        from .families import family_for
        from .fsdp import shard_denoiser

        denoiser = family_for(pipe).denoiser
        policy = None
        if (cfg.amp in ("auto", "bf16") and denoiser.device.type == "cuda" and torch.cuda.is_bf16_supported()):
            from torch.distributed.fsdp import MixedPrecisionPolicy

            policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        shard_denoiser(denoiser, policy)
        return cfg.replace(amp="off") if policy is not None and cfg.amp == "bf16" else cfg

    return shard


def _load(args, model: str):
    """A pipeline with the command's --dtype/--variant/--device (trust_fast.families.load_pipeline)."""
    from .families import load_pipeline

    return load_pipeline(model, device=getattr(args, "device", None), dtype=getattr(args, "dtype", "auto"),
                         variant=getattr(args, "variant", None))


def _add_overwrite(p: argparse.ArgumentParser) -> None:
    p.add_argument("--overwrite", action="store_true",
                   help="replace an earlier trust-fast output at --out (never anything else)")


def build_parser() -> argparse.ArgumentParser:
    from .defaults import EMBEDDING_STEPS, INVERSION_STEPS

    ap = OneLineParser(prog="trust-fast", description="TRUST concept unlearning for diffusion models")
    ap.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = ap.add_subparsers(dest="command", required=True)

    p = sub.add_parser("generate", help="sample images from a model")
    p.add_argument("--model", default="shapes", help="'shapes' (built-in) or a diffusers pipeline directory")
    p.add_argument("--prompt", required=True)
    p.add_argument("--n", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="output directory (000.png ... and grid.png)")
    _add_overwrite(p)
    _add_sampling(p)
    _add_model_options(p)
    p.set_defaults(fn=cmd_generate)

    p = sub.add_parser("evaluate", help="measure a concept's presence (UA), retain accuracy, quality and attacks; "
                                        "outside the shapes world, how far generations moved from the original")
    p.add_argument("--model", default="shapes", help="'shapes' (built-in) or a diffusers pipeline directory")
    p.add_argument("--concept", required=True, help="'A', 'A+B' (combination) or 'A|B' (conditional)")
    p.add_argument("--n-per-prompt", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="write the report as JSON here")
    _add_overwrite(p)
    p.add_argument("--reference", default=None,
                   help="original model for fd, the soft-prompt attack and (outside the shapes world) every "
                        "comparison (default: shapes for shapes-world models; 'none' skips them there)")
    p.add_argument("--forget-prompts", help="file of prompts showing the concept (one a line; required outside the world)")
    p.add_argument("--retain-prompts", help="file of prompts whose images must not change")
    p.add_argument("--attack", type=_attack_choice, default="none", metavar="none|all|NAME[,NAME...]",
                   help="attacks to run: paraphrase (synonyms, held-out templates), softprompt (5-token optimized "
                        "prefix), embedding (every token embedding of the prompt optimized), inversion (a learned "
                        "word for the concept, textual-inversion style); 'all' runs the four")
    p.add_argument("--softprompt-steps", type=int, default=40, help="Adam steps of the soft-prompt attack")
    p.add_argument("--embedding-steps", type=int, default=None,
                   help=f"Adam steps of the embedding attack (default {EMBEDDING_STEPS})")
    p.add_argument("--inversion-steps", type=int, default=None,
                   help=f"Adam steps of the inversion attack (default {INVERSION_STEPS})")
    p.add_argument("--attack-lr", type=float, default=None,
                   help="learning rate of the optimized attacks (default: each attack's own: 0.01, inversion 0.05)")
    p.add_argument("--grids", metavar="DIR", help="write labelled original | evaluated image grids here "
                                                  "(forget.png, retain.png)")
    _add_sampling(p)
    _add_model_options(p)
    p.set_defaults(fn=cmd_evaluate)

    p = sub.add_parser("world", help="the built-in shapes world")
    wsub = p.add_subparsers(dest="world_command", required=True)
    w = wsub.add_parser("train", help="train the world's classifier and text-to-image model (not needed: they ship)")
    w.add_argument("--what", choices=["all", "classifier", "diffusion"], default="all")
    w.add_argument("--out", required=True, help="output directory (the shipped weights are never overwritten)")
    _add_overwrite(w)
    w.add_argument("--diffusion-steps", type=int, default=None)
    w.add_argument("--classifier-steps", type=int, default=None)
    w.add_argument("--max-minutes", type=float, default=None)
    w.add_argument("--seed", type=int, default=0)
    w.set_defaults(fn=cmd_world_train)

    p = sub.add_parser("unlearn", help="erase a concept from a model (TRUST, or the SalUn / ESD baselines)")
    p.add_argument("--model", default="shapes", help="'shapes' (built-in) or a diffusers pipeline directory")
    p.add_argument("--concept", required=True, help="'A', 'A+B' (combination) or 'A|B' (conditional)")
    p.add_argument("--method", choices=["trust", "salun", "esd"], default="trust")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps (default: the method's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--hessian", choices=["hvp", "diag", "none"], default=None,
                   help="Hessian regularizer (default: the method's; TRUST uses diag)")
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--xi", type=float, default=None, help="z-score threshold of the localization (default 2.0)")
    p.add_argument("--max-fraction", type=float, default=None,
                   help="cap on the fraction of a layer's rows selected per step, in (0, 1] (default: none)")
    p.add_argument("--targets", default=None,
                   help="comma-separated glob patterns of the modules to edit, or the family's sets @default and "
                        "@cross_attention (default: @default; on UNets "
                        "*attn2.to_q,*attn2.to_k,*attn2.to_v,*ff.net.0.proj,*ff.net.2)")
    p.add_argument("--alpha", type=float, default=None, help="weight of the retain loss")
    p.add_argument("--lam", type=float, default=None, help="weight of the Hessian penalty")
    p.add_argument("--loc-interval", type=int, default=None, help="re-localize every N steps (default 1)")
    p.add_argument("--retain-neighbors", type=float, default=None,
                   help="A+B, A|B: fraction of retain batches drawn from A-without-B and B-without-A (default 0.5)")
    p.add_argument("--min-row-updates", type=int, default=None, metavar="N",
                   help="at the end, rows updated fewer than N times return to their original weights (default 3)")
    p.add_argument("--adv-prefix", type=int, default=None, metavar="K",
                   help="train against an adversarial soft prefix of K tokens, in every text encoder "
                        "(default 5; 0: off)")
    p.add_argument("--adv-mode", choices=ADV_MODES, default=None,
                   help="the adversary's search space: prefix (a soft prefix shared by the forget prompts, the "
                        "default) or tokens (an offset on every token embedding of each forget prompt, what the "
                        "embedding attack moves)")
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--x0-per-prompt", type=int, default=None,
                   help="data-free images cached per forget and anchor prompt (default 8)")
    p.add_argument("--x0-retain-per-prompt", type=int, default=None, metavar="N",
                   help="data-free images cached per retain prompt (default: as --x0-per-prompt)")
    p.add_argument("--x0-steps", type=int, default=None, help="DDIM steps that sample them (default 5)")
    p.add_argument("--compile-unet", nargs="?", const="aot_eager", default=None, metavar="BACKEND",
                   help="torch.compile the denoiser (aot_eager, the default, or eager; inductor is refused: its "
                        "weight gradients were wrong through the engine's passes)")
    p.add_argument("--channels-last", action="store_true", default=None,
                   help="channels-last convolutions (off by default: slower on the CPUs measured)")
    p.add_argument("--grad-checkpointing", action="store_true", default=None,
                   help="recompute activations in backward: less memory, more time (diffusers models)")
    p.add_argument("--hessian-micro-batch", type=int, default=None, metavar="N",
                   help="steps that differentiate twice run the retain batch N images at a time: the same "
                        "step with less memory, more time (default 0: the whole batch in one pass)")
    p.add_argument("--amp", choices=AMP_MODES, default=None,
                   help="autocast the denoiser passes of a float32 model (default auto: bf16 on a CUDA device "
                        "that supports it, off elsewhere; bf16 also pays on CPUs with AVX512-BF16 or AMX)")
    p.add_argument("--fsdp", action="store_true",
                   help="under torchrun: shard the denoiser over the processes with FSDP2 (each trains its "
                        "rows; for models that do not fit one device)")
    p.add_argument("--forget-prompts", help="file of prompts showing the concept (one a line; required outside the world)")
    p.add_argument("--retain-prompts", help="file of prompts to keep intact")
    p.add_argument("--anchor", help="prompt the concept's prompts are mapped to (default: the prompt minus the concept)")
    p.add_argument("--n-per-prompt", type=int, default=4, help="images per prompt of the before/after evaluation")
    p.add_argument("--eval-every", type=int, default=0,
                   help="also evaluate (1 image per prompt) every N steps into report.json's evals")
    p.add_argument("--no-eval", action="store_true",
                   help="skip the evaluation (shapes world: before/after UA and retain; prompt files: the "
                        "classifier-free report against the original and its grids)")
    p.add_argument("--checkpoint-every", type=int, default=0,
                   help="write a checkpoint every N steps (atomic; default 0: none)")
    p.add_argument("--checkpoint-dir", default=None, help="where checkpoints go (default: OUT.checkpoint)")
    p.add_argument("--log-dir", default=None, metavar="DIR",
                   help="also log step stats and evaluations to TensorBoard here (needs: pip install tensorboard)")
    p.add_argument("--resume", default=None, metavar="DIR",
                   help="continue the run whose checkpoint is in DIR (same model, concept and options)")
    p.add_argument("--out", required=True, help="output directory: the unlearned pipeline and report.json")
    _add_overwrite(p)
    _add_model_options(p)
    p.set_defaults(fn=cmd_unlearn)

    p = sub.add_parser("demo", help="unlearn a color from the built-in model and show before/after (a few minutes)")
    p.add_argument("--concept", default="red")
    p.add_argument("--steps", type=int, default=None, help="unlearning steps (default: TRUST's)")
    p.add_argument("--n-per-prompt", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eval-every", type=int, default=10,
                   help="evaluate (1 image per prompt) every N steps for history.png (default %(default)s; 0: off)")
    p.add_argument("--out", default="trust_fast_demo", help="output directory (default %(default)s)")
    _add_overwrite(p)
    p.set_defaults(fn=cmd_demo)
    _add_patch_commands(sub)
    # --debug is accepted after the subcommand too (trust-fast unlearn ... --debug)
    parsers = list(sub.choices.values()) + list(wsub.choices.values())
    for p in parsers:
        p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks")
    return ap


def _add_patch_commands(sub) -> None:
    p = sub.add_parser("export-patch", help="store only the rows an unlearning run changed (+ base fingerprint)")
    p.add_argument("--base", required=True, help="the model that was unlearned: 'shapes' or its directory")
    p.add_argument("--unlearned", required=True, help="the unlearned pipeline directory")
    p.add_argument("--out", required=True, help="patch file (.safetensors)")
    _add_variant(p, "of both pipelines (models load in the dtypes they were saved in: patches are bit-exact)")
    _add_overwrite(p)
    p.set_defaults(fn=cmd_export_patch)
    p = sub.add_parser("apply-patch", help="rebuild an unlearned pipeline from its base and a patch, bit for bit")
    p.add_argument("--base", required=True, help="the model the patch was exported against: 'shapes' or its directory")
    p.add_argument("--patch", required=True)
    p.add_argument("--out", required=True, help="output pipeline directory")
    _add_variant(p, "of the base (the output is saved the same way)")
    _add_overwrite(p)
    p.set_defaults(fn=cmd_apply_patch)


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised like SIGINT's KeyboardInterrupt so that every claim cleans up on the way out."""


def _on_sigterm(signum, frame):
    raise Terminated()


def _notes_to_stderr() -> None:
    """trust_fast.io's notes (cleaned leftovers, restored outputs) as 'trust-fast: note: ...' lines."""
    import logging

    class ToStderr(logging.StreamHandler):
        def emit(self, record):
            self.stream = sys.stderr  # whatever stderr is now (redirected, captured)
            super().emit(record)

    log = logging.getLogger("trust_fast.io")
    if not log.handlers:
        handler = ToStderr()
        handler.setFormatter(logging.Formatter("trust-fast: note: %(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)


def main(argv: list[str] | None = None) -> int:
    import signal
    import threading

    args = build_parser().parse_args(argv)  # --help and usage errors exit here, before torch is imported
    from .distributed import RankMismatchError

    _notes_to_stderr()
    main_thread = threading.current_thread() is threading.main_thread()  # signal handlers live there only
    previous = signal.signal(signal.SIGTERM, _on_sigterm) if main_thread else None
    try:
        check_numbers(args)
        check_device(getattr(args, "device", None))
        return args.fn(args)
    except (ValueError, OSError, RankMismatchError) as e:
        if args.debug:
            raise
        print(f"trust-fast: error: {_one_line(e)}", file=sys.stderr)
        return 2
    except Terminated:
        print("trust-fast: terminated; unfinished outputs were removed", file=sys.stderr)
        return 143
    except KeyboardInterrupt:
        print("trust-fast: interrupted; unfinished outputs were removed", file=sys.stderr)
        return 130
    finally:
        if main_thread:
            signal.signal(signal.SIGTERM, previous)


def _one_line(e: BaseException) -> str:
    """An error as one line: OSErrors as 'what: file', anything else its first line."""
    if isinstance(e, OSError) and e.strerror:
        return f"{e.strerror}: {e.filename!r}" if e.filename else e.strerror
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


if __name__ == "__main__":
    sys.exit(main())
