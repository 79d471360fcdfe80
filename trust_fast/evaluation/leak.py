"""The leak scan: how often a model draws the concept for every prompt that could produce it.

An attack that can write any real prompt succeeds at least as often as the most leaking one, so a
concept erased only under the prompts it was trained on is not erased. In the shapes world the scan
samples every prompt of :func:`trust_fast.world.concepts.leak_prompts` (each subset of attributes
that does not contradict the concept, every template, every synonym, the bare adjectives, the empty
prompt) and the shipped classifier says which images show the concept:

- per prompt: ``k`` of ``n`` images show it, the rate and its Wilson 95% interval;
- per description (the attributes a prompt names: "red", "striped shape", the empty prompt), pooled
  over its templates and wordings: ``leak_max`` is the highest such rate. It is taken over pooled
  descriptions, not single prompts, because the maximum of some 300 rates of a few images each is
  biased upward by chance alone; ``leak_worst`` still lists the five worst single prompts.

Outside the world no classifier judges an image: :func:`generic_leak_scan` runs a user's list of
prompts through the classifier-free measure of :mod:`.generic` (each prompt's change against the
original model, over the sampling-noise floor): a prompt whose images barely moved still draws what
the original drew.
"""
from __future__ import annotations

import time

import torch

from ..concepts import ConceptSpec
from .metrics import DEFAULT_GUIDANCE, DEFAULT_STEPS, predict_attrs, rms_distance, sample_images, wilson

WORST = 5  # prompts listed under leak_worst


def _label(attrs: dict[str, str], prompt: str) -> str:
    """A description's name in the report: its words ("striped red"), or "shape" / "(empty prompt)"."""
    from ..world import vocab

    if not prompt:
        return "(empty prompt)"
    return " ".join(attrs[a] for a in vocab.ATTRIBUTE_ORDER if a in attrs) or "shape"


def _rate(k: int, n: int) -> dict:
    lo, hi = wilson(k, n)
    return {"k": k, "n": n, "rate": k / n if n else float("nan"), "ci": [lo, hi]}


def leak_scan(pipe, spec: ConceptSpec, classifier=None, n_per_prompt: int = 4, seed: int = 0,
              steps: int = DEFAULT_STEPS, guidance: float = DEFAULT_GUIDANCE, progress=None) -> dict:
    """Scan a shapes-world pipeline for `spec` over its whole prompt space (see the module doc).

    Returns ``leak_max`` (the highest pooled rate), ``leak_max_description`` and ``leak_max_ci``,
    ``leak_worst`` (the five worst prompts), ``leak_by_description`` and ``leak_by_prompt`` (each
    {k, n, rate, ci}, worst first), ``leak_n_prompts``, ``leak_n_images`` and ``leak_seconds``.
    `progress`: a callable given the number of images sampled so far and the total."""
    from ..world import load_classifier
    from ..world.concepts import leak_prompts, shows

    if n_per_prompt < 1:
        raise ValueError(f"n_per_prompt must be >= 1, got {n_per_prompt}")
    t0 = time.perf_counter()
    classifier = classifier or load_classifier()
    entries = leak_prompts(spec)
    prompts = [p for p, _ in entries]
    images = []
    chunk = 64  # prompts per sampling call: progress between calls, the same noise as one call
    for i in range(0, len(prompts), chunk):
        images.append(sample_images(pipe, prompts[i:i + chunk], n_per_prompt, seed + 21 + i, steps, guidance))
        if progress is not None:
            progress(min(i + chunk, len(prompts)) * n_per_prompt, len(prompts) * n_per_prompt)
    hits = [shows(spec, a) for a in predict_attrs(classifier, torch.cat(images))]
    by_prompt: dict[str, list[int]] = {}
    by_desc: dict[str, list[int]] = {}
    for j, (prompt, attrs) in enumerate(entries):
        k = sum(hits[j * n_per_prompt:(j + 1) * n_per_prompt])
        for table, key in ((by_prompt, prompt), (by_desc, _label(attrs, prompt))):
            kn = table.setdefault(key, [0, 0])
            kn[0] += k
            kn[1] += n_per_prompt
    desc = {key: _rate(*kn) for key, kn in by_desc.items()}
    per_prompt = {key: _rate(*kn) for key, kn in by_prompt.items()}
    worst_desc = max(desc, key=lambda key: (desc[key]["rate"], desc[key]["k"]))
    ranked = sorted(per_prompt, key=lambda key: (-per_prompt[key]["rate"], -per_prompt[key]["k"], key))
    return {"leak_max": desc[worst_desc]["rate"], "leak_max_description": worst_desc,
            "leak_max_ci": desc[worst_desc]["ci"],
            "leak_worst": [{"prompt": key, **per_prompt[key]} for key in ranked[:WORST]],
            "leak_by_description": dict(sorted(desc.items(), key=lambda kv: -kv[1]["rate"])),
            "leak_by_prompt": {key: per_prompt[key] for key in ranked},
            "leak_n_prompts": len(per_prompt), "leak_n_images": len(hits), "leak_n_per_prompt": n_per_prompt,
            "leak_seconds": time.perf_counter() - t0}


def generic_leak_scan(pipe, reference, prompts: list[str], n_per_prompt: int = 4, seed: int = 0,
                      steps: int = DEFAULT_STEPS, guidance: float = DEFAULT_GUIDANCE) -> dict:
    """A user's prompts scanned without a classifier: per prompt, ``change`` = the RMS distance of the
    model's images to the original's (same noise) over the noise floor (the original against itself
    under other noise), as in :func:`trust_fast.evaluation.generic.generic_report`. Low change means
    the prompt still draws what the original drew: ``leak_least_changed`` lists the five least changed
    prompts and ``leak_min_change`` the lowest."""
    from .generic import check_comparable

    prompts = list(prompts)
    if not prompts:
        raise ValueError("leak prompts are empty: give at least one prompt")
    if n_per_prompt < 2:
        raise ValueError(f"n_per_prompt must be >= 2 (a noise floor needs two samples), got {n_per_prompt}")
    check_comparable(pipe, reference)
    t0 = time.perf_counter()
    ours = sample_images(pipe, prompts, n_per_prompt, seed + 21, steps, guidance)
    ref = sample_images(reference, prompts, n_per_prompt, seed + 21, steps, guidance)
    ref_other = sample_images(reference, prompts, n_per_prompt, seed + 22, steps, guidance)
    dist = rms_distance(ours, ref).view(len(prompts), n_per_prompt).mean(1)
    floor = float(rms_distance(ref, ref_other).mean())
    change = {p: float(d) / floor if floor > 0 else float("nan") for p, d in zip(prompts, dist)}
    ranked = sorted(change, key=change.get)
    return {"leak_min_change": change[ranked[0]],
            "leak_least_changed": [{"prompt": p, "change": change[p]} for p in ranked[:WORST]],
            "leak_change_by_prompt": {p: change[p] for p in ranked}, "leak_noise_floor": floor,
            "leak_n_prompts": len(prompts), "leak_n_per_prompt": n_per_prompt,
            "leak_seconds": time.perf_counter() - t0}
