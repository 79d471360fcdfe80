"""`trust-fast world train`: train the built-in shapes world's classifier and text-to-image model."""
from __future__ import annotations

import argparse
import json

from .common import add_overwrite


def add_parser(sub) -> None:
    p = sub.add_parser("world", help="the built-in shapes world")
    wsub = p.add_subparsers(dest="world_command", required=True)
    w = wsub.add_parser("train", help="train the world's classifier and text-to-image model (not needed: they ship)")
    w.add_argument("--what", choices=["all", "classifier", "diffusion"], default="all")
    w.add_argument("--out", required=True, help="output directory (the shipped weights are never overwritten)")
    add_overwrite(w)
    w.add_argument("--diffusion-steps", type=int, default=None)
    w.add_argument("--classifier-steps", type=int, default=None)
    w.add_argument("--max-minutes", type=float, default=None)
    w.add_argument("--seed", type=int, default=0)
    w.set_defaults(fn=run)


def run(args: argparse.Namespace) -> int:
    """Train (trust_fast.world.train.main_train) and print its record."""
    from ..world.train import main_train

    rec = main_train(args.what, out=args.out, diffusion_steps=args.diffusion_steps, max_minutes=args.max_minutes,
                     classifier_steps=args.classifier_steps, seed=args.seed, overwrite=args.overwrite)
    print(json.dumps(rec, indent=1))
    return 0
