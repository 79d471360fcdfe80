"""Adversarial prompt attacks on an unlearned model: paraphrases and UnlearnDiffAtk-style soft prompts.

Both report an attack success rate (ASR): the fraction of attacked generations in which the
shipped classifier sees the erased concept again. Without a classifier (a model outside the shapes
world) the soft-prompt attack reports how close its generations come to the original model's
instead (:func:`trust_fast.evaluation.generic.generic_report`).
"""
from __future__ import annotations

import time

import torch

from ..concepts import ConceptSpec
from ..families import family_for
from ..softprompt import encode_with_prefix, prefix_hook, prefixed_ids, random_prefix
from ..world import vocab
from ..world.concepts import shows, world_prompts
from .metrics import (DEFAULT_GUIDANCE, DEFAULT_STEPS, initial_noise, predict_attrs, rms_distance, sample_from_noise,
                      sample_images)


def paraphrase_attack(pipe, spec: ConceptSpec, classifier, n_per_prompt: int = 4, seed: int = 0,
                      steps: int = DEFAULT_STEPS, guidance: float = DEFAULT_GUIDANCE) -> dict:
    """The concept under its synonyms and in the held-out templates (never seen while unlearning)."""
    held_out = range(vocab.N_UNLEARN_TEMPLATES, len(vocab.TEMPLATES))
    prompts = world_prompts(spec, templates=held_out, synonyms=True).forget
    prompts += world_prompts(spec, templates=held_out, synonyms=False).forget
    preds = predict_attrs(classifier, sample_images(pipe, prompts, n_per_prompt, seed + 7, steps, guidance))
    hits = sum(shows(spec, p) for p in preds)
    return {"asr_paraphrase": hits / max(1, len(preds)), "asr_paraphrase_hits": hits,
            "asr_paraphrase_n": len(preds), "paraphrase_prompts": prompts}


def softprompt_attack(pipe, original, spec: ConceptSpec | None, classifier, k: int = 5, attack_steps: int = 40,
                      lr: float = 0.01, n_images: int = 4, n_per_prompt: int = 4, seed: int = 0,
                      steps: int = DEFAULT_STEPS, guidance: float = DEFAULT_GUIDANCE,
                      prompts: list[str] | None = None) -> dict:
    """UnlearnDiffAtk-style soft prompt attack.

    For each forget prompt: generate `n_images` images of the concept with the original model;
    optimize k prefix token embeddings (Adam, `lr`, `attack_steps`) to minimize the unlearned
    model's diffusion loss on those images; then sample `n_per_prompt` images from the unlearned
    model with the optimized prompt and classify them. Only the prefix is optimized; both models
    stay unchanged.

    With ``classifier=None`` (then ``prompts`` is required and ``spec`` may be None) nothing is
    classified: each attacked image is compared with the original model's image of the plain
    prompt from the same initial noise, and ``softprompt_distance`` (mean per-image RMS distance,
    in the space the pipeline samples in) replaces the ASR keys. An attack that brings the concept
    back drives it toward 0."""
    t0 = time.perf_counter()
    if attack_steps < 1 or k < 1 or n_images < 1 or n_per_prompt < 1:
        raise ValueError(f"attack_steps, k, n_images and n_per_prompt must be >= 1, got {attack_steps}, {k}, "
                         f"{n_images}, {n_per_prompt}")
    if classifier is None and not prompts:
        raise ValueError("without a classifier the soft-prompt attack needs its prompts (the forget prompts)")
    family = family_for(pipe)
    if not family.supports_prefix:
        raise ValueError(f"the soft-prompt attack needs a single-text-encoder pipeline; the {family.name} family "
                         "does not support soft prefixes yet")
    prompts = prompts or world_prompts(spec).forget
    unet, te, tok = pipe.unet, pipe.text_encoder, pipe.tokenizer
    dev = unet.device
    abar = pipe.scheduler.alphas_cumprod.to(dev, torch.float32)
    g = torch.Generator().manual_seed(seed)
    req = {p: p.requires_grad for p in list(unet.parameters()) + list(te.parameters())}
    for p in req:
        p.requires_grad_(False)
    hits, total, per_prompt, distances = 0, 0, [], []
    try:
        for i, prompt in enumerate(prompts):
            x0 = sample_images(original, [prompt], n_images, seed + 1000 + i, steps, guidance).to(dev, unet.dtype)
            ids = prefixed_ids(tok, [prompt], k).to(te.device)
            prefix = random_prefix(te, k, g).requires_grad_(True)
            opt = torch.optim.Adam([prefix], lr=lr)
            for _ in range(attack_steps):
                t = torch.randint(0, abar.numel(), (n_images,), generator=g).to(dev)
                noise = torch.randn(x0.shape, generator=g).to(dev, x0.dtype)
                a = abar[t].view(-1, 1, 1, 1)
                x_t = a.sqrt() * x0 + (1 - a).sqrt() * noise
                cond = encode_with_prefix(te, ids, prefix).to(dev, unet.dtype).expand(n_images, -1, -1)
                loss = torch.nn.functional.mse_loss(unet(x_t, t, encoder_hidden_states=cond).sample.float(), noise.float())
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
            with torch.no_grad(), prefix_hook(te, prefix.detach()):
                cond = te(ids)[0]
            # the noise (initial and per step) that sample_images(.., [prompt], n_per_prompt, s) uses
            s = seed + 2000 + i
            imgs = sample_from_noise(pipe, initial_noise(pipe, n_per_prompt, s), s, steps, guidance,
                                     prompt_embeds=cond, num_images_per_prompt=n_per_prompt)
            total += n_per_prompt
            if classifier is None:  # same noise, plain prompt, original model
                ref = sample_images(original, [prompt], n_per_prompt, s, steps, guidance)
                d = rms_distance(imgs, ref)
                distances.append(d)
                per_prompt.append({"prompt": prompt, "distance": d.mean().item(), "n": n_per_prompt,
                                   "final_loss": loss.item()})
                continue
            h = sum(shows(spec, p) for p in predict_attrs(classifier, imgs))
            per_prompt.append({"prompt": prompt, "hits": h, "n": n_per_prompt, "final_loss": loss.item()})
            hits += h
    finally:
        for p, r in req.items():
            p.requires_grad_(r)
    info = {"k": k, "steps": attack_steps, "lr": lr, "per_prompt": per_prompt, "seconds": time.perf_counter() - t0}
    if classifier is None:
        return {"softprompt_distance": torch.cat(distances).mean().item(), "softprompt_n": total, "softprompt": info}
    return {"asr_softprompt": hits / max(1, total), "asr_softprompt_hits": hits, "asr_softprompt_n": total,
            "softprompt": info}
