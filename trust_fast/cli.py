"""The `trust-fast` command line.

Errors a user can cause (bad spec, missing model, bad paths) print one line and exit 2;
--debug shows the traceback instead.
"""
from __future__ import annotations

import argparse
import json
import os
import sys


class UserError(ValueError):
    """A problem with the user's input; the CLI prints it as one line."""


def _add_sampling(p: argparse.ArgumentParser) -> None:
    from .evaluation.metrics import DEFAULT_GUIDANCE, DEFAULT_STEPS

    p.add_argument("--steps", type=int, default=DEFAULT_STEPS, help="DDIM sampling steps (default %(default)s)")
    p.add_argument("--guidance", type=float, default=DEFAULT_GUIDANCE,
                   help="classifier-free guidance scale (default %(default)s; the shapes world wants low guidance)")


def _positive(name: str, value: float) -> None:
    if not value > 0:
        raise UserError(f"{name} must be positive, got {value}")


def cmd_generate(args) -> int:
    import torch

    from .world import load_pipeline, save_grid

    _positive("--n", args.n)
    _positive("--steps", args.steps)
    pipe = load_pipeline(args.model)
    pipe.set_progress_bar_config(disable=False, desc="sampling")
    g = torch.Generator().manual_seed(args.seed)
    images = pipe([args.prompt] * args.n, num_inference_steps=args.steps, guidance_scale=args.guidance,
                  generator=g, output_type="latent").images
    os.makedirs(args.out, exist_ok=True)
    from PIL import Image

    from .io import atomic_path

    for i, img in enumerate(images):
        arr = ((img.clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).cpu().numpy()
        with atomic_path(os.path.join(args.out, f"{i:03d}.png"), ".png") as tmp:
            Image.fromarray(arr).save(tmp, format="PNG")
    save_grid(images, os.path.join(args.out, "grid.png"), nrow=min(8, args.n), scale=6)
    print(f"wrote {args.n} images and grid.png to {args.out}")
    return 0


def cmd_evaluate(args) -> int:
    from .concepts import parse_concept
    from .evaluation import evaluate, format_table
    from .world import is_world_model, load_pipeline
    from .world.train import write_json_atomic

    _positive("--n-per-prompt", args.n_per_prompt)
    spec = parse_concept(args.concept)
    if not is_world_model(args.model):
        raise UserError(f"evaluate needs the shapes-world classifier; {args.model!r} is not a shapes-world model")
    report = evaluate(load_pipeline(args.model), spec, n_per_prompt=args.n_per_prompt, seed=args.seed,
                      steps=args.steps, guidance=args.guidance)
    report["model"] = args.model
    keys = [k for k in report if k.endswith("acc") or k == "ua"] + ["n_images", "seconds"]
    print(format_table([(args.model, report)], keys))
    if args.out:
        write_json_atomic(report, args.out)
        print(f"wrote {args.out}")
    return 0


def cmd_world_train(args) -> int:
    from .world.train import main_train

    rec = main_train(args.what, out=args.out, diffusion_steps=args.diffusion_steps, max_minutes=args.max_minutes,
                     classifier_steps=args.classifier_steps, seed=args.seed)
    print(json.dumps(rec, indent=1))
    return 0


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="trust-fast", description="TRUST concept unlearning for diffusion models")
    ap.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = ap.add_subparsers(dest="command", required=True)

    p = sub.add_parser("generate", help="sample images from a model")
    p.add_argument("--model", default="shapes", help="'shapes' (built-in) or a diffusers pipeline directory")
    p.add_argument("--prompt", required=True)
    p.add_argument("--n", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="output directory (000.png ... and grid.png)")
    _add_sampling(p)
    p.set_defaults(fn=cmd_generate)

    p = sub.add_parser("evaluate", help="measure a concept's presence (UA) and retain accuracy on the shapes world")
    p.add_argument("--model", default="shapes")
    p.add_argument("--concept", required=True, help="'A', 'A+B' (combination) or 'A|B' (conditional)")
    p.add_argument("--n-per-prompt", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="write the report as JSON here")
    _add_sampling(p)
    p.set_defaults(fn=cmd_evaluate)

    p = sub.add_parser("world", help="the built-in shapes world")
    wsub = p.add_subparsers(dest="world_command", required=True)
    w = wsub.add_parser("train", help="train the world's classifier and text-to-image model (not needed: they ship)")
    w.add_argument("--what", choices=["all", "classifier", "diffusion"], default="all")
    w.add_argument("--out", default=None, help="assets directory (default: the package's own)")
    w.add_argument("--diffusion-steps", type=int, default=None)
    w.add_argument("--classifier-steps", type=int, default=None)
    w.add_argument("--max-minutes", type=float, default=None)
    w.add_argument("--seed", type=int, default=0)
    w.set_defaults(fn=cmd_world_train)
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.fn(args)
    except (ValueError, OSError) as e:
        if args.debug:
            raise
        print(f"trust-fast: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("trust-fast: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
