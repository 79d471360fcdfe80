"""`trust-fast evaluate`: how present a concept still is in a model. In the shapes world a
classifier judges its images (UA, retain accuracy, attacks); elsewhere its images are compared with
an original model's, prompt by prompt."""
from __future__ import annotations

import argparse
import contextlib

from .common import UserError, add_concept, add_forget_prompts, add_model, add_model_options, add_overwrite, \
    add_sampling, claim, load_model


def add_parser(sub) -> None:
    from ..defaults import EMBEDDING_STEPS, INVERSION_STEPS

    p = sub.add_parser("evaluate", help="measure a concept's presence (UA), retain accuracy, quality and attacks; "
                                        "outside the shapes world, how far generations moved from the original")
    add_model(p)
    add_concept(p)
    p.add_argument("--n-per-prompt", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="write the report as JSON here")
    add_overwrite(p)
    p.add_argument("--reference", default=None,
                   help="original model for fd, the soft-prompt attack and (outside the shapes world) every "
                        "comparison (default: shapes for shapes-world models; 'none' skips them there)")
    add_forget_prompts(p)
    p.add_argument("--retain-prompts", help="file of prompts whose images must not change")
    p.add_argument("--attack", type=attack_choice, default="none", metavar="none|all|NAME[,NAME...]",
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
    p.add_argument("--leak-scan", action="store_true",
                   help="sample every prompt that could show the concept (each subset of its attributes, every "
                        "template and synonym, the empty prompt) and report per prompt P(concept) with Wilson "
                        "intervals, leak_max and the five worst prompts (shapes world)")
    p.add_argument("--leak-prompts", metavar="FILE",
                   help="scan these prompts instead (outside the shapes world, against --reference): each prompt's "
                        "change from the original; the least changed still draw what the original drew")
    p.add_argument("--grids", metavar="DIR", help="write labelled original | evaluated image grids here "
                                                  "(forget.png, retain.png)")
    add_sampling(p)
    add_model_options(p)
    p.set_defaults(fn=run)


def attack_choice(text: str) -> str:
    """argparse type of --attack: 'none', 'all' or a comma-separated list of attack names."""
    from ..evaluation.attacks import parse_attacks

    try:
        parse_attacks(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return text


def attack_settings(args: argparse.Namespace) -> dict:
    """Per-attack settings from the evaluate flags (each attack keeps its own defaults otherwise)."""
    out: dict = {name: {"attack_steps": steps} for name, steps in (("embedding", args.embedding_steps),
                                                                   ("inversion", args.inversion_steps)) if steps}
    if args.attack_lr is not None:
        for name in ("softprompt", "embedding", "inversion"):
            out.setdefault(name, {})["lr"] = args.attack_lr
    return out


def run(args: argparse.Namespace) -> int:
    """Print the report's table (and notes), writing it to --out and the grids to --grids if asked."""
    from ..concepts import parse_concept, read_prompt_file
    from ..evaluation import format_table
    from ..io import is_json_report, write_json_atomic
    from ..world import is_world_model, model_path

    if args.grids and args.reference == "none":
        raise UserError("--grids shows the reference's images beside the model's: it needs a --reference")
    world = is_world_model(args.model)
    spec = parse_concept(args.concept, world=world)
    generic = not world or bool(args.forget_prompts)
    if world and not args.forget_prompts and args.retain_prompts:
        raise UserError("--retain-prompts goes with --forget-prompts (the shapes world has its own prompts)")
    reference_name = args.reference or ("shapes" if world else None)
    if generic:
        from ..concepts import user_prompts

        if not args.forget_prompts:
            raise UserError(f"{args.model!r} is not a shapes-world model: give --forget-prompts (and --retain-prompts)")
        if reference_name in (None, "none"):
            raise UserError(f"{args.model!r} has no classifier to judge it: give --reference, the original model "
                            "it was unlearned from")
        if args.n_per_prompt < 2:
            raise UserError(f"--n-per-prompt must be >= 2 for the classifier-free report, got {args.n_per_prompt}")
        retain = read_prompt_file(args.retain_prompts, "retain prompts") if args.retain_prompts else []
        prompts = user_prompts(spec, read_prompt_file(args.forget_prompts, "forget prompts"), retain)
    if args.leak_scan and generic and not args.leak_prompts:
        raise UserError("--leak-scan enumerates the shapes world's prompts; outside it, give your own with "
                        "--leak-prompts FILE")
    if args.leak_prompts and reference_name in (None, "none"):
        raise UserError("--leak-prompts compares each prompt's images with the original model's: it needs a --reference")
    leak_prompts = read_prompt_file(args.leak_prompts, "leak prompts") if args.leak_prompts else None
    inputs = [("model directory", model_path(args.model))]
    if reference_name not in (None, "none"):
        inputs.append(("reference model directory", model_path(reference_name)))
    with contextlib.ExitStack() as stack:
        grids = stack.enter_context(claim(args.grids, "--grids", args, inputs=inputs)).path if args.grids else None
        report_out = (stack.enter_context(claim(args.out, "--out", args, kind="file", recognize=is_json_report,
                                                inputs=inputs + [("--grids directory", args.grids)]))
                      if args.out else None)
        report, keys = evaluation_report(args, spec, world, generic, reference_name, prompts if generic else None,
                                         grids, leak_prompts)
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


def evaluation_report(args: argparse.Namespace, spec, world: bool, generic: bool, reference_name, prompts, grids,
                      leak_prompts=None):
    """The report of `trust-fast evaluate` and the keys its table shows."""
    from ..evaluation import full_report

    if not generic:
        pipe = load_model(args, args.model)
        reference = None if reference_name == "none" else load_model(args, reference_name)
        report = full_report(pipe, spec, reference, args.attack, n_per_prompt=args.n_per_prompt, seed=args.seed,
                             steps=args.steps, guidance=args.guidance, softprompt_steps=args.softprompt_steps,
                             grids=grids, settings=attack_settings(args), leak=args.leak_scan and not leak_prompts)
        keys = [k for k in report if k.endswith("acc") or k in ("ua", "fd", "fd_self", "leak_max")
                or (k.startswith("asr_") and not k.endswith(("_hits", "_n")))] + ["n_images", "seconds"]
    else:
        # no classifier judges these images (another model, or the user's own prompts): compare with the
        # original model, prompt by prompt
        from ..evaluation.generic import generic_report

        pipe = load_model(args, args.model)
        reference = load_model(args, reference_name)
        report = generic_report(pipe, reference, prompts.forget, prompts.retain, args.attack,
                                n_per_prompt=args.n_per_prompt, seed=args.seed, steps=args.steps,
                                guidance=args.guidance, softprompt_steps=args.softprompt_steps, grids=grids,
                                settings=attack_settings(args), concept_word=spec.a)
        report["concept"] = str(spec)
        keys = [k for k in ("forget_change", "retain_change", "selectivity", "fd", "fd_self") if k in report]
        keys += [k for k in report if k.endswith(("_change", "_change_original", "_recovery")) and k not in keys]
        keys += ["seconds"]
    if leak_prompts:
        from ..evaluation.leak import generic_leak_scan

        report.update(generic_leak_scan(pipe, reference, leak_prompts, n_per_prompt=max(2, args.n_per_prompt),
                                        seed=args.seed, steps=args.steps, guidance=args.guidance))
        keys.insert(len(keys) - 1, "leak_min_change")
    report.update(model=args.model, reference=reference_name, written_by="trust_fast")
    return report, keys
