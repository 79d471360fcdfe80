"""Metrics on the shapes world, measured with the shipped attribute classifier."""
from __future__ import annotations

import time

import torch

from ..concepts import ConceptSpec, PromptSet
from ..defaults import DEFAULT_GUIDANCE, DEFAULT_STEPS  # noqa: F401  (re-exported)
from ..world import vocab
from ..world.concepts import shows, world_prompts


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score 95% interval of a rate: k successes in n trials ((nan, nan) for n = 0)."""
    import math

    if n == 0:
        return float("nan"), float("nan")
    p = k / n
    d = 1 + z * z / n
    c = (p + z * z / (2 * n)) / d
    h = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / d
    return max(0.0, c - h), min(1.0, c + h)


def initial_noise(pipe, n: int, seed: int) -> torch.Tensor:
    """The (n, C, H, W) float32 CPU starting noise that `sample_images` gives n images from `seed`."""
    from ..models import family_for

    return torch.randn(n, *family_for(pipe).sample_shape(), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def sample_from_noise(pipe, noise: torch.Tensor, seed: int, steps: int, guidance: float, **prompt_kw) -> torch.Tensor:
    """Sample from the given starting noise; `seed` also seeds the sampler's per-step noise (ancestral and
    DDPM schedulers), so two models called with the same noise and seed are compared image by image.
    `prompt_kw`: `prompt=[...]` or `prompt_embeds=...` (with `num_images_per_prompt`)."""
    from ..models import family_for

    fam = family_for(pipe)
    latents = fam.pack_pipeline_latents(noise.to(fam.denoiser.device, fam.denoiser.dtype))  # Flux: 2x2 patches
    out = pipe(**prompt_kw, num_inference_steps=steps, guidance_scale=guidance, latents=latents,
               generator=torch.Generator().manual_seed(seed), output_type="latent").images
    return fam.unpack_pipeline_latents(out).float().cpu()


@torch.no_grad()
def sample_images(pipe, prompts: list[str], n_per_prompt: int = 4, seed: int = 0, steps: int = DEFAULT_STEPS,
                  guidance: float = DEFAULT_GUIDANCE, batch_size: int = 256) -> torch.Tensor:
    """Images (len(prompts) * n_per_prompt, C, H, W) in [-1, 1] (or latents), prompt-major, float32 on the CPU.

    The initial noise is drawn once from `seed` for the whole list, and every batch's sampler noise
    from `seed` and the batch's index, so image i gets the same noise whatever the model: before/after
    comparisons differ only by the model."""
    all_prompts = [p for p in prompts for _ in range(n_per_prompt)]
    noise = initial_noise(pipe, len(all_prompts), seed)
    out = [sample_from_noise(pipe, noise[i:i + batch_size], seed + i, steps, guidance,
                             prompt=all_prompts[i:i + batch_size])
           for i in range(0, len(all_prompts), batch_size)]
    return torch.cat(out) if out else noise[:0]


@torch.no_grad()
def to_pixels(pipe, x: torch.Tensor, batch_size: int = 16) -> torch.Tensor:
    """What `sample_images` returned, as RGB images in [-1, 1] on the CPU: decoded by the pipeline's
    VAE when it has one (latent diffusion, e.g. Stable Diffusion), else already pixels (shapes world).
    Honours the VAE's `scaling_factor`, `shift_factor` (when set) and `force_upcast` (fp16 VAEs that
    overflow decode in float32, then go back to their dtype)."""
    vae = getattr(pipe, "vae", None)
    if vae is None:
        return x.float().cpu()
    p = next(vae.parameters())
    device, own_dtype = p.device, p.dtype  # (vae.to() changes p in place)
    cfg = vae.config
    shift = getattr(cfg, "shift_factor", None) or 0.0
    upcast = own_dtype == torch.float16 and getattr(cfg, "force_upcast", False)
    dtype = torch.float32 if upcast else own_dtype
    if upcast:
        vae.to(torch.float32)
    try:
        out = [vae.decode(x[i:i + batch_size].to(device, dtype) / cfg.scaling_factor + shift).sample.float().cpu()
               for i in range(0, x.shape[0], batch_size)]
    finally:
        if upcast:
            vae.to(own_dtype)
    return torch.cat(out).clamp(-1, 1) if out else x[:0].float().cpu()


def predict_attrs(classifier, images: torch.Tensor) -> list[dict[str, str]]:
    """Classifier predictions as attribute -> value name, one dict per image."""
    pred = classifier.predict(images.to(next(classifier.parameters()).device))
    names = {a: vocab.values(a) for a in pred}
    return [{a: names[a][int(pred[a][i])] for a in pred} for i in range(images.shape[0])]


def attribute_accuracy(preds: list[dict[str, str]], truth: list[dict[str, str]]) -> dict[str, float]:
    """Per-attribute accuracy and the fraction with every attribute right ("all")."""
    if not preds:
        return {}
    out = {f"{a}_acc": sum(p[a] == t[a] for p, t in zip(preds, truth)) / len(preds) for a in truth[0]}
    out["all_acc"] = sum(all(p[a] == t[a] for a in t) for p, t in zip(preds, truth)) / len(preds)
    return out


def evaluate(pipe, spec: ConceptSpec, classifier=None, n_per_prompt: int = 4, seed: int = 0,
             steps: int = DEFAULT_STEPS, guidance: float = DEFAULT_GUIDANCE, prompts: PromptSet | None = None,
             return_images: bool = False, retain_n_per_prompt: int | None = None) -> dict:
    """UA, retain accuracy and per-attribute accuracies of a world pipeline for a concept
    (`n_per_prompt` images per forget prompt; `retain_n_per_prompt`, default the same, per retain
    prompt: a pair's 2 forget prompts need many images each, its 22 retain prompts fewer).

    ua: fraction of forget-prompt images in which the classifier sees the concept (for "A+B" both
    together, for "A|B" A in the presence of B); retain_acc: fraction of retain-prompt images whose
    every attribute matches the prompt. forget_*_acc: accuracy on forget images of each attribute
    the concept does not name (they should survive unlearning)."""
    from ..world import load_classifier

    t0 = time.perf_counter()
    classifier = classifier or load_classifier()
    prompts = prompts or world_prompts(spec)
    forget_imgs = sample_images(pipe, prompts.forget, n_per_prompt, seed, steps, guidance)
    n_retain = retain_n_per_prompt or n_per_prompt
    retain_imgs = sample_images(pipe, prompts.retain, n_retain, seed + 1, steps, guidance)
    f_pred, r_pred = predict_attrs(classifier, forget_imgs), predict_attrs(classifier, retain_imgs)
    f_truth = [a for a in prompts.forget_attrs for _ in range(n_per_prompt)]
    r_truth = [a for a in prompts.retain_attrs for _ in range(n_retain)]
    named = {vocab.meaning(t).attribute for t in spec.terms()}
    report: dict = {"concept": str(spec), "kind": spec.kind,
                    "ua": sum(shows(spec, p) for p in f_pred) / max(1, len(f_pred)),
                    "retain_acc": attribute_accuracy(r_pred, r_truth).get("all_acc", float("nan"))}
    report.update({f"retain_{k}": v for k, v in attribute_accuracy(r_pred, r_truth).items() if k != "all_acc"})
    f_acc = attribute_accuracy(f_pred, f_truth)
    report.update({f"forget_{a}_acc": f_acc[f"{a}_acc"] for a in vocab.ATTRIBUTES if a not in named})
    if spec.kind == "conditional":
        b_attr = vocab.meaning(spec.b).attribute
        report["forget_condition_kept"] = f_acc[f"{b_attr}_acc"]
    report.update({"n_images": len(f_pred) + len(r_pred), "n_forget": len(f_pred), "n_retain": len(r_pred),
                   "n_per_prompt": n_per_prompt, "seed": seed, "sampling_steps": steps, "guidance": guidance,
                   "seconds": time.perf_counter() - t0})
    if return_images:
        return report, forget_imgs, retain_imgs
    return report


def rms_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-image root-mean-square difference of two equally shaped image batches (N,) in float64."""
    if a.shape != b.shape:
        raise ValueError(f"image batches differ in shape: {tuple(a.shape)} vs {tuple(b.shape)}")
    return (a.double() - b.double()).flatten(1).square().mean(1).sqrt()


def frechet_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """Frechet distance between Gaussians fitted to feature sets a (N, D) and b (M, D), in float64:
    |mu_a - mu_b|^2 + tr(S_a) + tr(S_b) - 2 tr((S_a^1/2 S_b S_a^1/2)^1/2)."""
    if a.shape[0] < 2 or b.shape[0] < 2:
        raise ValueError(f"Frechet distance needs at least 2 samples per set, got {a.shape[0]} and {b.shape[0]}")
    a, b = a.double().flatten(1), b.double().flatten(1)
    mu_a, mu_b = a.mean(0), b.mean(0)
    s_a, s_b = torch.cov(a.T).reshape(a.shape[1], -1), torch.cov(b.T).reshape(b.shape[1], -1)
    w, v = torch.linalg.eigh(s_a)
    root_a = (v * w.clamp_min(0).sqrt()) @ v.T
    cross = torch.linalg.eigvalsh(root_a @ s_b @ root_a).clamp_min(0).sqrt().sum()
    return float((mu_a - mu_b).square().sum() + s_a.trace() + s_b.trace() - 2 * cross)


@torch.no_grad()
def image_features(images: torch.Tensor, classifier=None) -> torch.Tensor:
    """Features for the Frechet distance: the classifier's penultimate layer when there is one
    (shapes world), else a CLIP-free stand-in: the images (or latents) average-pooled to 8x8."""
    if classifier is not None:
        return classifier.features(images.to(next(classifier.parameters()).device)).cpu()
    return torch.nn.functional.adaptive_avg_pool2d(images.float(), 8).flatten(1).cpu()


def quality_distance(pipe, reference, prompts: list[str], classifier=None, n_per_prompt: int = 4, seed: int = 0,
                     steps: int = DEFAULT_STEPS, guidance: float = DEFAULT_GUIDANCE) -> dict:
    """fd: Frechet distance between the model's and the reference's generations on `prompts`, with
    different noise; fd_self: the reference against itself with the same two noises (the sampling-
    noise floor; fd equals it for an unchanged model)."""
    return fd_from_images(sample_images(pipe, prompts, n_per_prompt, seed + 11, steps, guidance),
                          sample_images(reference, prompts, n_per_prompt, seed + 11, steps, guidance),
                          sample_images(reference, prompts, n_per_prompt, seed + 12, steps, guidance), classifier)


def fd_from_images(ours: torch.Tensor, ref_a: torch.Tensor, ref_b: torch.Tensor, classifier=None) -> dict:
    """fd = FD(ours, ref_b) and fd_self = FD(ref_a, ref_b), where ours and ref_a share their noise and
    ref_b has other noise (see quality_distance)."""
    ours, ref_a, ref_b = (image_features(x, classifier) for x in (ours, ref_a, ref_b))
    return {"fd": frechet_distance(ours, ref_b), "fd_self": frechet_distance(ref_a, ref_b), "fd_n": ours.shape[0],
            "fd_features": "classifier-penultimate" if classifier is not None else "pooled-8x8"}


def format_table(rows: list[tuple[str, dict]], keys: list[str]) -> str:
    """A plain-text table: one row per (name, report), one column per key (floats with 3 decimals;
    None, a value that is undefined for this report, as n/a)."""
    def fmt(v) -> str:
        return "n/a" if v is None else f"{v:.3f}" if isinstance(v, float) else str(v)

    cells = [["", *keys]] + [[name, *(fmt(r.get(k, "")) for k in keys)] for name, r in rows]
    widths = [max(len(c[i]) for c in cells) for i in range(len(keys) + 1)]
    return "\n".join("  ".join(c[i].ljust(widths[i]) for i in range(len(c))) for c in cells)
