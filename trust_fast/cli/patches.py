"""`trust-fast export-patch` and `trust-fast apply-patch`: an unlearning run's changed rows as a
patch file, and the unlearned pipeline rebuilt from its base and that patch (trust_fast.patch)."""
from __future__ import annotations

import argparse
import sys

from .common import add_overwrite, add_variant, claim


def add_parser(sub) -> None:
    p = sub.add_parser("export-patch", help="store only the rows an unlearning run changed (+ base fingerprint)")
    p.add_argument("--base", required=True, help="the model that was unlearned: 'shapes' or its directory")
    p.add_argument("--unlearned", required=True, help="the unlearned pipeline directory")
    p.add_argument("--out", required=True, help="patch file (.safetensors)")
    add_variant(p, "of both pipelines (models load in the dtypes they were saved in: patches are bit-exact)")
    add_overwrite(p)
    p.set_defaults(fn=run_export)
    p = sub.add_parser("apply-patch", help="rebuild an unlearned pipeline from its base and a patch, bit for bit")
    p.add_argument("--base", required=True, help="the model the patch was exported against: 'shapes' or its directory")
    p.add_argument("--patch", required=True)
    p.add_argument("--out", required=True, help="output pipeline directory")
    add_variant(p, "of the base (the output is saved the same way)")
    add_overwrite(p)
    p.set_defaults(fn=run_apply)


def run_export(args: argparse.Namespace) -> int:
    """Write the patch of --unlearned against --base to --out."""
    from ..patch import export_patch, is_patch_file
    from ..world import load_pipeline, model_path

    base, unlearned = model_path(args.base), model_path(args.unlearned)
    with claim(args.out, "--out", args, kind="file", recognize=is_patch_file,
               inputs=[("base model directory", base), ("unlearned model directory", unlearned)]) as out:
        stats = export_patch(load_pipeline(args.base, "cpu", variant=args.variant),
                             load_pipeline(args.unlearned, "cpu", variant=args.variant), out.path)
    print(f"wrote {args.out}: {stats['changed_rows']} changed rows in {stats['changed_tensors']} tensors, "
          f"{stats['patch_bytes']} bytes = {100 * stats['fraction_of_unet']:.3f}% of the UNet "
          f"({stats['unet_bytes']} bytes)")
    if stats["changed_rows"] == 0:
        print("warning: the unlearned model's denoiser equals the base's: the patch changes nothing", file=sys.stderr)
    return 0


def run_apply(args: argparse.Namespace) -> int:
    """Write --base with --patch applied to --out."""
    from ..io import write_pretrained
    from ..patch import apply_patch, read_patch
    from ..world import load_pipeline, model_path

    base = model_path(args.base)
    _, meta = read_patch(args.patch)  # a bad patch is refused before the output is claimed
    with claim(args.out, "--out", args, inputs=[("base model directory", base), ("patch", args.patch)]) as out:
        write_pretrained(apply_patch(load_pipeline(args.base, "cpu", variant=args.variant), args.patch), out.path)
    print(f"wrote the patched pipeline to {args.out}")
    if int(meta["changed_rows"]) == 0:
        print("warning: the patch changes no row: the written pipeline equals the base model", file=sys.stderr)
    return 0
