"""`trust-fast unlearn`: erase a concept from a model with TRUST or the SalUn / ESD baselines, on
one process or several (torchrun / accelerate launch; --fsdp shards the denoiser), and write the
unlearned pipeline with its report."""
from __future__ import annotations

import argparse
import contextlib
import os
import sys
from typing import TYPE_CHECKING, NamedTuple

from .common import UserError, add_concept, add_forget_prompts, add_model, add_model_options, add_overwrite, claim, \
    load_model
from .config_flags import add_config_flags, config_overrides
from .evaluated_run import NEIGHBOR_KEYS, showing_progress, unlearn_with_evaluation, warn_about_the_run, \
    write_pictures

if TYPE_CHECKING:
    from ..concepts import ConceptSpec, PromptSet
    from ..config import TrustConfig


def add_parser(sub) -> None:
    p = sub.add_parser("unlearn", help="erase a concept from a model (TRUST, or the SalUn / ESD baselines)")
    add_model(p)
    add_concept(p)
    from ..methods import METHODS  # the registry loads no torch

    p.add_argument("--method", choices=list(METHODS), default="trust")
    p.add_argument("--seed", type=int, default=0)
    add_config_flags(p)
    p.add_argument("--fsdp", action="store_true",
                   help="under torchrun: shard the denoiser over the processes with FSDP2 (each trains its "
                        "rows; for models that do not fit one device)")
    add_forget_prompts(p)
    p.add_argument("--retain-prompts", help="file of prompts to keep intact")
    p.add_argument("--anchor",
                   help="prompt the concept's prompts are mapped to (default: the prompt minus the concept)")
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
    add_overwrite(p)
    add_model_options(p)
    p.set_defaults(fn=run)


def unlearning_config(args: argparse.Namespace) -> TrustConfig:
    """The TrustConfig of --method with --seed and the TrustConfig flags that were given, validated."""
    from ..methods import config

    overrides = {"seed": args.seed, **config_overrides(args)}
    if "compile_unet" in overrides:
        check_compile_backend(overrides["compile_unet"])
    cfg = config(args.method, **overrides)
    cfg.validate()
    return cfg


def check_compile_backend(name: str) -> None:
    """--compile-unet takes a backend the engine checked against eager; inductor is left to the
    config's own refusal, which says why."""
    from ..config import COMPILE_BACKENDS

    if name not in COMPILE_BACKENDS and name != "inductor":
        raise UserError(f"--compile-unet {name!r} is not a backend trust_fast compiles with; choose "
                        f"{', '.join(COMPILE_BACKENDS)}")


def check_log_dir(log_dir: str, inputs: list) -> None:
    """--log-dir: TensorBoard must be installed, and the directory may be new or hold other runs'
    event files, but may not be a file, nor inside a model or the output (whose contents a run replaces)."""
    from ..tblog import tensorboard_missing

    problem = tensorboard_missing()
    if problem:
        raise UserError(problem)
    if os.path.exists(log_dir) and not os.path.isdir(log_dir):
        raise UserError(f"--log-dir {log_dir!r} is a file, not a directory")
    real = os.path.realpath(log_dir)
    for what, path in inputs:
        if path and (real == os.path.realpath(path) or real.startswith(os.path.realpath(path) + os.sep)):
            raise UserError(f"--log-dir {log_dir!r} is inside the {what}; give a directory of its own")


def fsdp_sharder():
    """--fsdp: `shard(pipe, cfg) -> cfg` shards the denoiser with FSDP2 (trust_fast.fsdp.shard_denoiser)
    and returns the config to run with. On a CUDA device that supports bf16 and with --amp auto/bf16,
    FSDP2 computes in bf16 (its MixedPrecisionPolicy), so the returned config turns the engine's
    own autocast off (the engine refuses it on a sharded denoiser); the caller's config is not changed."""
    def shard(pipe, cfg):
        import torch

        from ..models import family_for
        from ..fsdp import shard_denoiser

        denoiser = family_for(pipe).denoiser
        policy = None
        if (cfg.amp in ("auto", "bf16") and denoiser.device.type == "cuda" and torch.cuda.is_bf16_supported()):
            from torch.distributed.fsdp import MixedPrecisionPolicy

            policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        shard_denoiser(denoiser, policy)
        return cfg.replace(amp="off") if policy is not None and cfg.amp == "bf16" else cfg

    return shard


def evaluate_against_original(pipe, model: str, prompts, args: argparse.Namespace, grids: str) -> dict:
    """The classifier-free report of an unlearned pipeline against its original (reloaded from `model`),
    with labelled original | evaluated grids written into the output directory."""
    from ..evaluation.generic import generic_report

    reference = load_model(args, model)
    with showing_progress("comparing with the original", pipe, reference):
        return generic_report(pipe, reference, prompts.forget, prompts.retain, n_per_prompt=max(2, args.n_per_prompt),
                              seed=args.seed, grids=grids)


class _Plan(NamedTuple):
    """What a checked `unlearn` command line asks for, before any model is loaded."""
    src: str  # the model's directory
    checkpoint_dir: str
    world: bool  # a shapes-world model
    spec: ConceptSpec
    prompts: PromptSet | None  # the user's prompt files; None: the world's prompts
    cfg: TrustConfig


def _plan(args: argparse.Namespace) -> _Plan:
    """Check the command line (paths, concept, prompt files, config, --fsdp) into a _Plan."""
    from .. import distributed
    from ..checkpoint import has_checkpoint
    from ..concepts import parse_concept, read_prompt_file, user_prompts
    from ..world import is_world_model, model_path

    src = model_path(args.model)
    checkpoint_dir = args.resume or args.checkpoint_dir or (args.out.rstrip("/\\") + ".checkpoint")
    if args.resume is not None and not has_checkpoint(args.resume):
        raise UserError(f"--resume {args.resume!r} holds no checkpoint")
    if args.log_dir is not None:
        check_log_dir(args.log_dir, [("model directory", src), ("--out directory", args.out)])
    world = is_world_model(args.model)
    spec = parse_concept(args.concept, world=world)
    prompts = None
    if args.forget_prompts or not world:
        if not args.forget_prompts:
            raise UserError(f"{args.model!r} is not a shapes-world model: give --forget-prompts (and --retain-prompts)")
        retain = read_prompt_file(args.retain_prompts, "retain prompts") if args.retain_prompts else None
        prompts = user_prompts(spec, read_prompt_file(args.forget_prompts, "forget prompts"), retain, args.anchor)
    cfg = unlearning_config(args)
    if args.fsdp:
        if distributed.launched_world_size() <= 1:
            raise UserError("--fsdp shards the denoiser over several processes: launch with "
                            "torchrun --nproc-per-node N (N > 1) or accelerate launch")
        if args.eval_every:
            raise UserError("--eval-every evaluates on rank 0 alone, which a sharded denoiser cannot do: "
                            "drop it with --fsdp (the run is still evaluated before and after)")
    return _Plan(src, checkpoint_dir, world, spec, prompts, cfg)


def run(args: argparse.Namespace) -> int:
    """Unlearn, write the pipeline and report.json to --out (rank 0) and print the summary."""
    from .. import distributed

    plan = _plan(args)
    # under torchrun / accelerate launch: every rank trains (gradients averaged before localization),
    # rank 0 alone evaluates, saves and reports
    launched = distributed.init_from_env()
    try:
        lead = distributed.rank() == 0
        report = _train_and_save(args, plan, lead)
        distributed.barrier()
    finally:
        if launched:
            distributed.shutdown()
    if lead:
        _print_summary(report, args.out)
    return 0


def _train_and_save(args: argparse.Namespace, plan: _Plan, lead: bool) -> dict:
    """Claim --out (and the checkpoint directory), unlearn, check that the ranks agree and, on rank 0,
    write the pipeline, its pictures or classifier-free evaluation and report.json. Returns the report."""
    from .. import distributed
    from ..checkpoint import claim_checkpoint_dir

    inputs = [("model directory", plan.src), ("--resume checkpoint directory", args.resume)]
    with contextlib.ExitStack() as claims:
        # rank 0 claims --out; the other ranks learn of a refusal instead of waiting in a collective
        out = claims.enter_context(distributed.lead_then_follow(lambda: claim(args.out, "--out", args,
                                                                              inputs=inputs)))
        if args.checkpoint_every:
            claims.enter_context(claim_checkpoint_dir(
                plan.checkpoint_dir, overwrite=args.overwrite or args.resume is not None,
                inputs=[("model directory", plan.src), ("--out directory", args.out)]))
        pipe = load_model(args, args.model)
        unlearner, report, images = unlearn_with_evaluation(
            pipe, plan.spec, plan.cfg, plan.prompts,
            world=plan.world and plan.prompts is None and not args.no_eval and lead, n_per_prompt=args.n_per_prompt,
            eval_seed=args.seed, eval_every=args.eval_every, progress=lead, resume=args.resume,
            checkpoint_dir=plan.checkpoint_dir if args.checkpoint_every else None,
            checkpoint_every=args.checkpoint_every, log_dir=args.log_dir if lead else None,
            shard=fsdp_sharder() if args.fsdp else None)
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
            _add_results(report, args, plan, pipe, images, out.path)
    return report


def _add_results(report: dict, args: argparse.Namespace, plan: _Plan, pipe, images, out: str) -> None:
    """Into the output directory: the world's pictures, or the classifier-free evaluation against the
    original and its grids; then report.json. Pictures and evaluation are extras: a failure there is
    noted in the report (pictures_error) and a warning, and must not cost the run its report."""
    from ..io import write_json_atomic

    try:
        if images is not None:
            report["pictures"] = write_pictures(out, plan.spec, report, images)
        elif plan.prompts is not None and not args.no_eval:
            report["eval_vs_original"] = evaluate_against_original(pipe, args.model, plan.prompts, args, out)
            report["pictures"] = report["eval_vs_original"].get("grids", [])
    except (OSError, ValueError, RuntimeError) as e:
        report["pictures_error"] = f"{type(e).__name__}: {e}"
        print(f"warning: could not evaluate or draw the result: {report['pictures_error']}", file=sys.stderr)
    write_json_atomic(report, os.path.join(out, "report.json"))


def _print_summary(report: dict, out: str) -> None:
    """The run's tables (before/after, vs original, the run itself), its warnings and what was written."""
    from ..evaluation import format_table

    if "ua_before" in report:
        rows = [(name, {"ua": report[f"eval_{name}"]["ua"], "retain_acc": report[f"eval_{name}"]["retain_acc"],
                        **{k: report[f"eval_{name}"][k] for k in NEIGHBOR_KEYS if k in report[f"eval_{name}"]}})
                for name in ("before", "after")]
        print(format_table(rows, list(rows[0][1])))
    if "eval_vs_original" in report:
        free = report["eval_vs_original"]
        print(format_table([("vs original", free)], [k for k in ("forget_change", "retain_change", "selectivity",
                                                                "fd", "fd_self") if k in free]))
    keys = ["steps", "seconds", "mean_selected_rows", "mean_selected_fraction", "trainable_params",
            "optimizer_state_bytes"]
    print(format_table([(f"{report['method']} {report['concept']}", report)], keys))
    warn_about_the_run(report)
    pictures = "".join(f", {name}" for name in report.get("pictures", []))
    print(f"wrote the unlearned pipeline, report.json{pictures} to {out}")
