"""One evaluation report: concept metrics, quality distance and attacks, as `trust-fast evaluate` prints it."""
from __future__ import annotations

import time

from ..concepts import ConceptSpec
from ..world.concepts import world_prompts
from .attacks import ATTACK_NAMES, OPTIMIZED, paraphrase_attack, parse_attacks, run_optimized
from .metrics import DEFAULT_GUIDANCE, DEFAULT_STEPS, evaluate, quality_distance, sample_images

ATTACKS = ("none", *ATTACK_NAMES, "all")  # --attack takes one of these or a comma-separated list


def attack_settings(softprompt_steps: int = 40, softprompt_k: int = 5, settings: dict | None = None) -> dict:
    """Per-attack keyword settings: the soft-prompt shorthands merged under `settings`
    ({"embedding": {"attack_steps": 200}, ...})."""
    out = {name: {} for name in OPTIMIZED}
    out["softprompt"].update(attack_steps=softprompt_steps, k=softprompt_k)
    for name, kw in (settings or {}).items():
        if name not in OPTIMIZED:
            raise ValueError(f"no settings for attack {name!r}: only {', '.join(OPTIMIZED)} take settings")
        out[name].update(kw)
    return out


def full_report(pipe, spec: ConceptSpec, reference=None, attack: str = "none", classifier=None,
                n_per_prompt: int = 4, seed: int = 0, steps: int = DEFAULT_STEPS,
                guidance: float = DEFAULT_GUIDANCE, softprompt_steps: int = 40, softprompt_k: int = 5,
                grids: str | None = None, settings: dict | None = None,
                attack_n_per_prompt: int | None = None, retain_n_per_prompt: int | None = None,
                leak: bool = False, leak_n_per_prompt: int | None = None) -> dict:
    """evaluate() plus, with a reference (the original model), fd on the retain prompts, plus attacks.
    `attack`: 'none', 'all' or a comma-separated list of :data:`ATTACKS`; `settings`: per-attack
    keywords (see :func:`attack_settings`); `attack_n_per_prompt`: attacked images per forget prompt
    (default `n_per_prompt`); `retain_n_per_prompt`: images per retain prompt for retain accuracy,
    fd and the retain grid (default `n_per_prompt`). The optimized attacks (softprompt, embedding, inversion)
    need the reference: they attack with the original model's images.
    `grids`: a directory for ``forget.png`` and ``retain.png``, labelled original | evaluated
    images from the same noise (needs the reference).
    `leak`: add the leak scan over the world's whole prompt space (:func:`.leak.leak_scan`), with
    `leak_n_per_prompt` images per prompt (default `n_per_prompt`)."""
    from ..world import load_classifier

    attacks = parse_attacks(attack)
    settings = attack_settings(softprompt_steps, softprompt_k, settings)
    if reference is None and set(attacks) & set(OPTIMIZED):
        raise ValueError(f"the {', '.join(a for a in attacks if a in OPTIMIZED)} attack(s) need the original "
                         "model (--reference)")
    t0 = time.perf_counter()
    classifier = classifier or load_classifier()
    n_retain = retain_n_per_prompt or n_per_prompt
    report, forget_imgs, retain_imgs = evaluate(pipe, spec, classifier, n_per_prompt, seed, steps, guidance,
                                                return_images=True, retain_n_per_prompt=n_retain)
    skipped = []
    if grids and reference is None:
        skipped.append("grids (no reference model)")
    elif grids:
        from .pictures import write_grids

        prompts = world_prompts(spec)
        # evaluate() samples the forget prompts from `seed` and the retain prompts from `seed + 1`
        sets = {name: (plist, sample_images(reference, plist, n, s, steps, guidance), ours)
                for name, plist, ours, s, n in (("forget", prompts.forget, forget_imgs, seed, n_per_prompt),
                                                ("retain", prompts.retain, retain_imgs, seed + 1, n_retain))}
        report["grids"] = write_grids(grids, sets, labels=("original", "evaluated"))
    if reference is not None:
        report.update(quality_distance(pipe, reference, world_prompts(spec).retain, classifier,
                                       n_retain, seed, steps, guidance))
    else:
        skipped.append("fd (no reference model)")
    n_attacked = attack_n_per_prompt or n_per_prompt
    for name in attacks:
        if name == "paraphrase":
            report.update(paraphrase_attack(pipe, spec, classifier, n_attacked, seed, steps, guidance))
        else:
            report.update(run_optimized(name, pipe, reference, spec, classifier, settings[name],
                                        n_per_prompt=n_attacked, seed=seed, steps=steps, guidance=guidance))
    if leak:
        from .leak import leak_scan

        report.update(leak_scan(pipe, spec, classifier, leak_n_per_prompt or n_per_prompt, seed, steps, guidance))
    report["skipped"] = skipped
    report["seconds"] = time.perf_counter() - t0
    return report
