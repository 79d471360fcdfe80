"""One evaluation report: concept metrics, quality distance and attacks, as `trust-fast evaluate` prints it."""
from __future__ import annotations

import time

from ..concepts import ConceptSpec
from ..world.concepts import world_prompts
from .attacks import paraphrase_attack, softprompt_attack
from .metrics import DEFAULT_GUIDANCE, DEFAULT_STEPS, evaluate, quality_distance, sample_images

ATTACKS = ("none", "paraphrase", "softprompt", "all")


def full_report(pipe, spec: ConceptSpec, reference=None, attack: str = "none", classifier=None,
                n_per_prompt: int = 4, seed: int = 0, steps: int = DEFAULT_STEPS,
                guidance: float = DEFAULT_GUIDANCE, softprompt_steps: int = 40, softprompt_k: int = 5,
                grids: str | None = None) -> dict:
    """evaluate() plus, with a reference (the original model), fd on the retain prompts, plus attacks.
    The soft-prompt attack needs the reference: it attacks with the original model's images.
    `grids`: a directory for ``forget.png`` and ``retain.png``, labelled original | evaluated
    images from the same noise (needs the reference)."""
    from ..world import load_classifier

    if attack not in ATTACKS:
        raise ValueError(f"attack must be one of {', '.join(ATTACKS)}, not {attack!r}")
    t0 = time.perf_counter()
    classifier = classifier or load_classifier()
    report, forget_imgs, retain_imgs = evaluate(pipe, spec, classifier, n_per_prompt, seed, steps, guidance,
                                                return_images=True)
    skipped = []
    if grids and reference is None:
        skipped.append("grids (no reference model)")
    elif grids:
        from .pictures import write_grids

        prompts = world_prompts(spec)
        # evaluate() samples the forget prompts from `seed` and the retain prompts from `seed + 1`
        sets = {name: (plist, sample_images(reference, plist, n_per_prompt, s, steps, guidance), ours)
                for name, plist, ours, s in (("forget", prompts.forget, forget_imgs, seed),
                                             ("retain", prompts.retain, retain_imgs, seed + 1))}
        report["grids"] = write_grids(grids, sets, n_per_prompt, labels=("original", "evaluated"))
    if reference is not None:
        report.update(quality_distance(pipe, reference, world_prompts(spec).retain, classifier,
                                       n_per_prompt, seed, steps, guidance))
    else:
        skipped.append("fd (no reference model)")
    if attack in ("paraphrase", "all"):
        report.update(paraphrase_attack(pipe, spec, classifier, n_per_prompt, seed, steps, guidance))
    if attack in ("softprompt", "all"):
        if reference is None:
            raise ValueError("the soft-prompt attack needs the original model (--reference)")
        report.update(softprompt_attack(pipe, reference, spec, classifier, k=softprompt_k,
                                        attack_steps=softprompt_steps, n_per_prompt=n_per_prompt, seed=seed,
                                        steps=steps, guidance=guidance))
    report["skipped"] = skipped
    report["seconds"] = time.perf_counter() - t0
    return report
