"""`trust-fast demo`: unlearn a color from the built-in shapes model with TRUST and show the model
before and after."""
from __future__ import annotations

import argparse
import os

from .common import add_overwrite, claim
from .config_flags import add_config_flags, config_overrides
from .evaluated_run import unlearn_with_evaluation, warn_about_the_run, write_pictures

CONFIG_FLAGS = ("steps",)  # the TrustConfig fields the demo takes; TRUST's defaults for the others


def add_parser(sub) -> None:
    p = sub.add_parser("demo", help="unlearn a color from the built-in model and show before/after (a few minutes)")
    p.add_argument("--concept", default="red")
    add_config_flags(p, CONFIG_FLAGS)
    p.add_argument("--n-per-prompt", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eval-every", type=int, default=10,
                   help="evaluate (1 image per prompt) every N steps for history.png (default %(default)s; 0: off)")
    p.add_argument("--out", default="trust_fast_demo", help="output directory (default %(default)s)")
    add_overwrite(p)
    p.set_defaults(fn=run)


def run(args: argparse.Namespace) -> int:
    """Unlearn --concept, print the before/after table, write the pictures, the model and report.json."""
    from ..concepts import parse_concept
    from ..evaluation import format_table
    from ..io import write_json_atomic
    from ..methods import config
    from ..world import load_pipeline, model_path

    spec = parse_concept(args.concept)
    cfg = config("trust", seed=args.seed, **config_overrides(args, CONFIG_FLAGS))
    cfg.validate()
    with claim(args.out, "--out", args, inputs=[("built-in model directory", model_path("shapes"))]) as out:
        pipe = load_pipeline("shapes")
        print(f"unlearning {str(spec)!r} from the built-in shapes model with TRUST (CPU: a few minutes)")
        unlearner, report, images = unlearn_with_evaluation(pipe, spec, cfg, n_per_prompt=args.n_per_prompt,
                                                            eval_every=args.eval_every)
        rows = [("before", {"ua": report["ua_before"], "retain_acc": report["retain_before"],
                            "seconds": report["eval_before"]["seconds"]}),
                ("after", {"ua": report["ua_after"], "retain_acc": report["retain_after"],
                           "seconds": report["seconds"]})]
        print(format_table(rows, ["ua", "retain_acc", "seconds"]))
        print("ua: share of images of the concept's prompts that show it; retain_acc: other prompts drawn right;"
              " seconds: evaluation (before), unlearning (after)")
        report["pictures"] = write_pictures(out.path, spec, report, images)
        unlearner.write_pipeline(os.path.join(out.path, "model"))
        report["written_by"] = "trust_fast"
        write_json_atomic(report, os.path.join(out.path, "report.json"))
    warn_about_the_run(report)
    print(f"wrote {', '.join(report['pictures'])}, model/ and report.json to {args.out}")
    return 0
