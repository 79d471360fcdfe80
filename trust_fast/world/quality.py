"""The shapes model's quality bar: attribute accuracy of its generations over every fully described
prompt of the world, and agreement of synonym prompts with their plain words."""
from __future__ import annotations

import torch

from . import vocab


def measure_quality(pipe, classifier, n_per_prompt: int = 4, seed: int = 0, steps: int | None = None,
                    guidance: float | None = None, every_template: bool = True) -> dict:
    """color/shape/texture/all accuracy over every description x template (or, without
    `every_template`, every description once with the templates rotating: a CI-sized sample), and
    synonym agreement (a synonym's images show its canonical value), at the default sampling
    settings unless given."""
    from ..evaluation.metrics import DEFAULT_GUIDANCE, DEFAULT_STEPS, sample_images

    steps, guidance = steps or DEFAULT_STEPS, guidance or DEFAULT_GUIDANCE
    reps = len(vocab.TEMPLATES) if every_template else 1
    attrs = [d for d in vocab.descriptions() for _ in range(reps)]
    prompts = [vocab.caption(d, t % len(vocab.TEMPLATES)) for t, d in enumerate(attrs)]
    pred = classifier.predict(sample_images(pipe, prompts, n_per_prompt, seed, steps, guidance))
    truth = {k: torch.tensor([vocab.index_of(k, a[k]) for a in attrs for _ in range(n_per_prompt)])
             for k in vocab.ATTRIBUTES}
    ok = {k: pred[k] == truth[k] for k in truth}
    out = {f"{k}_acc": v.float().mean().item() for k, v in ok.items()}
    out["all_acc"] = torch.stack(list(ok.values())).all(0).float().mean().item()
    out["n_images"] = len(prompts) * n_per_prompt
    agree = total = 0
    for attr in ("color", "shape", "texture"):
        syn_prompts, syn_truth = [], []
        for value, syns in vocab.ATTRIBUTES[attr].items():
            for s in syns:
                for k, d in enumerate(x for x in vocab.descriptions() if x[attr] == value):
                    syn_prompts.append(vocab.caption(d, k % len(vocab.TEMPLATES), {attr: s}))
                    syn_truth.append(vocab.index_of(attr, value))
        p = classifier.predict(sample_images(pipe, syn_prompts, n_per_prompt, seed + 1, steps, guidance))[attr]
        t = torch.tensor([v for v in syn_truth for _ in range(n_per_prompt)])
        agree += (p == t).sum().item()
        total += t.numel()
    out["synonym_agreement"] = agree / total
    out["n_synonym_images"] = total
    out.update(n_per_prompt=n_per_prompt, seed=seed, sampling_steps=steps, guidance=guidance)
    return out
