"""`trust-fast generate`: sample images of a prompt from a model."""
from __future__ import annotations

import argparse
import os

from .common import UserError, add_model, add_model_options, add_overwrite, add_sampling, claim, load_model


def add_parser(sub) -> None:
    p = sub.add_parser("generate", help="sample images from a model")
    add_model(p)
    p.add_argument("--prompt", required=True)
    p.add_argument("--n", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="output directory (000.png ... and grid.png)")
    add_overwrite(p)
    add_sampling(p)
    add_model_options(p)
    p.set_defaults(fn=run)


def run(args: argparse.Namespace) -> int:
    """Write --n images of --prompt (000.png ...) and their grid.png to --out."""
    import torch

    from PIL import Image

    from ..concepts import MAX_PROMPT
    from ..evaluation.metrics import to_pixels
    from ..models import family_for
    from ..world import model_path, save_grid

    if len(args.prompt) > MAX_PROMPT:
        raise UserError(f"--prompt has {len(args.prompt)} characters; at most {MAX_PROMPT}")
    with claim(args.out, "--out", args, inputs=[("model directory", model_path(args.model))]) as out:
        pipe = load_model(args, args.model)
        pipe.set_progress_bar_config(disable=False, desc="sampling")
        g = torch.Generator().manual_seed(args.seed)
        images = pipe([args.prompt] * args.n, num_inference_steps=args.steps, guidance_scale=args.guidance,
                      generator=g, output_type="latent").images
        # latent diffusion pipelines sample VAE latents (Flux: packed ones); decode them
        images = to_pixels(pipe, family_for(pipe).unpack_pipeline_latents(images))
        if not bool(torch.isfinite(images).all()):
            raise ValueError(f"model {args.model!r} produced non-finite images; nothing was written")
        for i, img in enumerate(images):
            arr = ((img.clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).cpu().numpy()
            Image.fromarray(arr).save(os.path.join(out.path, f"{i:03d}.png"), format="PNG")
        save_grid(images, os.path.join(out.path, "grid.png"), nrow=min(8, args.n),
                  scale=max(1, 96 // images.shape[-1]))
    print(f"wrote {args.n} images and grid.png to {args.out}")
    return 0
