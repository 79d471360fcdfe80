"""Evaluation without a classifier: for diffusers models outside the shapes world.

Nothing can tell whether an image of a Stable Diffusion model "shows" an arbitrary concept without
a judge model, and nothing may be downloaded. What can be measured offline is how the unlearned
model's generations moved away from the original model's, prompt by prompt:

- ``forget_change`` / ``retain_change``: both models sample every prompt from the same initial
  noise; the per-image RMS distance between the two images, divided by ``noise_floor`` (the RMS
  distance between two of the original model's images of the same prompt under different noise).
  0 means the image did not change; about 1 means it changed as much as a fresh sample would.
  Unlearning that works moves the forget prompts (high ``forget_change``) and leaves the retain
  prompts (``retain_change`` near 0); ``selectivity`` is their ratio.
- ``fd`` / ``fd_self``: Frechet distance of 8x8 average-pooled outputs (CLIP-free) on the retain
  prompts, against the original's own sampling-noise floor, as in the shapes-world report (from the
  same samples as the change: the model's and the original's images from one noise, the original's
  from another).
- optimized attacks (``softprompt``, ``embedding``, ``inversion``): the same optimization as on the
  world; ``<name>_change`` is the attacked images' distance to the original model's images (same
  noise, plain prompt) over ``noise_floor``. The attack itself changes an image (a prefix, moved
  word embeddings, a learned word), so the same attack is also run on the original model:
  ``<name>_change_original`` is where a fully restored concept would land. An attack that
  restores the concept pulls ``<name>_change`` down from ``forget_change`` toward it;
  ``<name>_recovery`` = (forget_change - <name>_change) / (forget_change - <name>_change_original)
  is that pull as a fraction (0: the attack restores nothing, 1: all); None (null), with a line
  under ``notes``, when the attack alone moved the original at least as far as unlearning moved the model.

Distances are measured where the pipeline samples: VAE latents for latent diffusion pipelines,
pixels for the shapes world. Every metric that needs a classifier is listed under ``skipped``.
"""
from __future__ import annotations

import time

import torch

from .attacks import OPTIMIZED, parse_attacks, run_optimized
from .metrics import DEFAULT_GUIDANCE, DEFAULT_STEPS, fd_from_images, rms_distance, sample_images, to_pixels

CLASSIFIER_METRICS = ("ua", "retain_acc", "per-attribute accuracies")


def check_comparable(pipe, reference) -> None:
    """Paired comparisons need the same starting-noise shape and the same sampler in both models."""
    from ..models import family_for

    mine = (*family_for(pipe).sample_shape(), type(pipe.scheduler).__name__)
    theirs = (*family_for(reference).sample_shape(), type(reference.scheduler).__name__)
    if mine != theirs:
        raise ValueError(f"the model and its reference sample differently (channels, height, width, scheduler): "
                         f"{mine} vs {theirs}; evaluate a model against the original it was unlearned from")


def _mean(x: torch.Tensor) -> float:
    return float(x.mean()) if x.numel() else float("nan")


def _recovery(report: dict, name: str, notes: list[str]) -> float | None:
    """``<name>_recovery``, or None (JSON null, printed n/a) with a line in `notes` saying why when it
    is undefined: the attack alone moved the original's images at least as far as unlearning moved
    the model's, so there is no span for a restored concept to cover."""
    span = report["forget_change"] - report[f"{name}_change_original"]
    if span > 0:
        return (report["forget_change"] - report[f"{name}_change"]) / span
    notes.append(f"{name}_recovery is n/a: the {name} attack moved the original model's images "
                 f"({name}_change_original {report[f'{name}_change_original']:.3f}) at least as far as unlearning "
                 f"moved this model's (forget_change {report['forget_change']:.3f}), so how much of the concept it "
                 "restores is undefined")
    return None


def generic_report(pipe, reference, forget_prompts: list[str], retain_prompts: list[str], attack: str = "none",
                   n_per_prompt: int = 4, seed: int = 0, steps: int = DEFAULT_STEPS, guidance: float = DEFAULT_GUIDANCE,
                   softprompt_steps: int = 40, softprompt_k: int = 5, grids: str | None = None,
                   settings: dict | None = None, concept_word: str | None = None) -> dict:
    """Classifier-free report of `pipe` against `reference` (the original model); see the module doc.
    `settings`: per-attack keywords (:func:`trust_fast.evaluation.report.attack_settings`);
    `concept_word`: the word the inversion attack replaces by its learned token.

    `grids`: a directory to write ``forget.png`` and ``retain.png`` into (one row per prompt: the
    original's images | the model's, same noise)."""
    from .report import attack_settings

    attacks = parse_attacks(attack)
    settings = attack_settings(softprompt_steps, softprompt_k, settings)
    if concept_word is not None:
        settings["inversion"].setdefault("word", concept_word)
    if reference is None:
        raise ValueError("a model without a classifier is evaluated against its original: give the reference model")
    if not forget_prompts:
        raise ValueError("forget prompts are empty: give at least one prompt that shows the concept")
    if n_per_prompt < 2:
        raise ValueError(f"n_per_prompt must be >= 2 (the Frechet distance needs 2 samples), got {n_per_prompt}")
    if steps < 1 or softprompt_steps < 1 or softprompt_k < 1:
        raise ValueError(f"steps, softprompt_steps and softprompt_k must be >= 1, got {steps}, {softprompt_steps}, "
                         f"{softprompt_k}")
    check_comparable(pipe, reference)
    t0 = time.perf_counter()
    report: dict = {"space": "latent" if getattr(pipe, "vae", None) is not None else "pixel",
                    "n_per_prompt": n_per_prompt, "seed": seed, "sampling_steps": steps, "guidance": guidance,
                    "n_forget_prompts": len(forget_prompts), "n_retain_prompts": len(retain_prompts)}
    sets = {"forget": forget_prompts, "retain": retain_prompts}
    images, floors = {}, []
    for name, prompts in sets.items():
        if not prompts:
            continue
        ours = sample_images(pipe, prompts, n_per_prompt, seed, steps, guidance)
        ref = sample_images(reference, prompts, n_per_prompt, seed, steps, guidance)
        ref_other = sample_images(reference, prompts, n_per_prompt, seed + 1, steps, guidance)
        images[name] = (ref, ours, ref_other)
        report[f"{name}_distance"] = _mean(rms_distance(ours, ref))
        floors.append(rms_distance(ref, ref_other))
    report["noise_floor"] = _mean(torch.cat(floors))
    floor = report["noise_floor"] if report["noise_floor"] > 0 else float("nan")
    for name in images:
        report[f"{name}_change"] = report[f"{name}_distance"] / floor
    if "retain" in images:
        report["selectivity"] = report["forget_change"] / max(report["retain_change"], 1e-12)
        report.update(fd_from_images(images["retain"][1], images["retain"][0], images["retain"][2]))
    skipped = [f"{m} (needs a classifier; none judges these prompts)" for m in CLASSIFIER_METRICS]
    notes: list[str] = []
    if not retain_prompts:
        skipped.append("retain_change, selectivity and fd (no retain prompts given)")
    if "paraphrase" in attacks:
        skipped.append("asr_paraphrase (paraphrases come from the shapes world's vocabulary)")
    for name in (a for a in attacks if a in OPTIMIZED):
        common = dict(n_per_prompt=n_per_prompt, seed=seed, steps=steps, guidance=guidance, prompts=forget_prompts)
        found = run_optimized(name, pipe, reference, None, None, settings[name], **common)
        # the same attack on the original: how far the attack alone moves an image whose concept is intact
        base = run_optimized(name, reference, reference, None, None, settings[name], **common)[f"{name}_distance"]
        report.update(found, **{f"{name}_change": found[f"{name}_distance"] / floor,
                                f"{name}_change_original": base / floor})
        report[f"{name}_recovery"] = _recovery(report, name, notes)
        skipped.append(f"asr_{name} (no classifier: {name}_change measures the attack instead)")
    if grids:
        from .pictures import write_grids

        pixels = {name: (sets[name], to_pixels(reference, ref), to_pixels(pipe, ours))
                  for name, (ref, ours, _) in images.items()}
        report["grids"] = write_grids(grids, pixels, labels=("original", "evaluated"))
    report["skipped"] = skipped
    if notes:
        report["notes"] = notes
    report["seconds"] = time.perf_counter() - t0
    return report
