"""Adversarial prompt attacks on an unlearned model.

- ``paraphrase``: the concept under its synonyms and in held-out templates (no optimization);
- ``softprompt``: UnlearnDiffAtk's soft prefix, k free token embeddings before each forget prompt;
- ``embedding``: every token embedding of each forget prompt optimized (a strictly larger search
  space than the prefix: the words themselves may move);
- ``inversion``: Concept-Inversion-style textual inversion: one new word embedding learned from the
  original model's images of the concept, against the unlearned model, shared by every prompt.

The optimized attacks all minimize the unlearned model's denoising loss on images of the concept
sampled from the original model, then sample from the unlearned model with what they found. Each
reports an attack success rate, ``asr_<name>``: the fraction of attacked generations in which the
shipped classifier sees the erased concept again. Without a classifier (a model outside the shapes
world) each reports ``<name>_distance`` instead, how close its generations come to the original
model's (:func:`trust_fast.evaluation.generic.generic_report`). Both models stay unchanged.
"""
from __future__ import annotations

import contextlib
import time

import torch

from ..concepts import ConceptSpec
from ..defaults import EMBEDDING_STEPS, INVERSION_STEPS
from ..models import family_for
from ..objectives import Noising, mse
from ..softprompt import (encode_edited, encode_with_prefix, first_word, minimize, placeholder_ids, prefixed_ids,
                          random_prefix, split)
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


@contextlib.contextmanager
def _frozen(*modules):
    """Every parameter of `modules` without gradient while active (restored after)."""
    req = {p: p.requires_grad for m in modules for p in m.parameters()}
    for p in req:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, r in req.items():
            p.requires_grad_(r)


def _check(pipe, name: str, classifier, prompts, **counts: int):
    """One line naming what is wrong with an attack's arguments (ValueError), else the pipeline's family."""
    bad = {k: v for k, v in counts.items() if v < 1}
    if bad:
        raise ValueError(f"the {name} attack's {', '.join(f'{k}={v}' for k, v in bad.items())}: each must be >= 1")
    if classifier is None and not prompts:
        raise ValueError(f"without a classifier the {name} attack needs its prompts (the forget prompts)")
    return family_for(pipe)


class _Attack:
    """What the optimized attacks share: the concept's images from the original model, the
    unlearned model's denoising loss on them, and sampling + judging with the conditioning found.
    Free token embeddings go into every text encoder of the pipeline's family
    (:mod:`trust_fast.softprompt`); while an attack runs, the denoiser and the encoders have no
    gradients (restored after)."""

    def __init__(self, pipe, original, spec, classifier, name: str, seed: int, steps: int, guidance: float):
        self.pipe, self.original, self.spec, self.classifier, self.name = pipe, original, spec, classifier, name
        self.seed, self.steps, self.guidance = seed, steps, guidance
        self.family = fam = family_for(pipe)
        self.denoiser, self.encoders = fam.denoiser, [te for _, te, _ in fam.prompt_encoders()]
        self.dev = self.denoiser.device
        self.noising = Noising(pipe.scheduler, fam.prediction_type, self.dev)
        self.g = torch.Generator().manual_seed(seed)
        self.hits, self.total, self.per_prompt, self.distances = 0, 0, [], []
        self.t0 = time.perf_counter()

    def concept_images(self, i: int, prompt: str, n: int) -> torch.Tensor:
        """n images of forget prompt i from the original model (the attack's training data)."""
        return sample_images(self.original, [prompt], n, self.seed + 1000 + i, self.steps,
                             self.guidance).to(self.dev, self.denoiser.dtype)

    def frozen(self):
        return _frozen(self.denoiser, *self.encoders)

    def loss(self, x0: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """The unlearned model's denoising loss on x0 under `cond` (one random timestep per image)."""
        x_t, t, noise = self.noising.noised(x0, self.g)
        inputs = self.family.denoiser_inputs(x_t, t, cond.to(self.dev, self.denoiser.dtype))
        return mse(self.family.prediction(self.denoiser(**inputs), x_t), self.noising.target(x0, noise, t))

    def judge(self, i: int, prompt: str, cond: torch.Tensor, n: int, **extra) -> None:
        """Sample n images of prompt i from the unlearned model under `cond` (1, L, D) and count how
        many show the concept (or, without a classifier, their distance to the original's image of
        the plain prompt from the same noise)."""
        # the noise (initial and per step) that sample_images(.., [prompt], n, s) uses
        s = self.seed + 2000 + i
        with torch.no_grad():
            imgs = sample_from_noise(self.pipe, initial_noise(self.pipe, n, s), s, self.steps, self.guidance,
                                     **self.family.pipeline_embeds(cond.detach().to(self.dev, self.denoiser.dtype)),
                                     num_images_per_prompt=n)
        self.total += n
        if self.classifier is None:
            d = rms_distance(imgs, sample_images(self.original, [prompt], n, s, self.steps, self.guidance))
            self.distances.append(d)
            self.per_prompt.append({"prompt": prompt, "distance": d.mean().item(), "n": n, **extra})
            return
        h = sum(shows(self.spec, p) for p in predict_attrs(self.classifier, imgs))
        self.per_prompt.append({"prompt": prompt, "hits": h, "n": n, **extra})
        self.hits += h

    def result(self, **settings) -> dict:
        name = self.name
        info = {**settings, "per_prompt": self.per_prompt, "seconds": time.perf_counter() - self.t0}
        if self.classifier is None:
            return {f"{name}_distance": torch.cat(self.distances).mean().item(), f"{name}_n": self.total, name: info}
        return {f"asr_{name}": self.hits / max(1, self.total), f"asr_{name}_hits": self.hits,
                f"asr_{name}_n": self.total, name: info}


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
    _check(pipe, "soft-prompt", classifier, prompts, attack_steps=attack_steps, n_images=n_images,
           n_per_prompt=n_per_prompt, k=k)
    prompts = prompts or world_prompts(spec).forget
    a = _Attack(pipe, original, spec, classifier, "softprompt", seed, steps, guidance)
    with a.frozen():
        for i, prompt in enumerate(prompts):
            x0 = a.concept_images(i, prompt, n_images)
            ids = prefixed_ids(a.family, [prompt], k)
            prefix = random_prefix(a.family, k, a.g).to(a.dev).requires_grad_(True)
            loss = minimize([prefix], lambda: a.loss(x0, encode_with_prefix(a.family, ids, prefix).expand(n_images, -1, -1)),
                            attack_steps, torch.optim.Adam([prefix], lr=lr))
            with torch.no_grad():
                cond = encode_with_prefix(a.family, ids, prefix)
            a.judge(i, prompt, cond, n_per_prompt, final_loss=loss.item())
    return a.result(k=k, steps=attack_steps, lr=lr)


def embedding_attack(pipe, original, spec: ConceptSpec | None, classifier, attack_steps: int = EMBEDDING_STEPS,
                     lr: float = 0.01, n_images: int = 4, n_per_prompt: int = 4, seed: int = 0,
                     steps: int = DEFAULT_STEPS, guidance: float = DEFAULT_GUIDANCE,
                     prompts: list[str] | None = None) -> dict:
    """Every input token embedding of each forget prompt optimized against the unlearned model.

    Starts from the prompt's own token embeddings and frees every position after the start token
    (the words, the end token and the padding the denoiser also attends to), then proceeds as the
    soft-prompt attack does (Adam, `lr`, `attack_steps`, on `n_images` images of the concept from
    the original model; `n_per_prompt` attacked images per prompt). Reports ``asr_embedding`` (or,
    without a classifier, ``embedding_distance``)."""
    _check(pipe, "embedding", classifier, prompts, attack_steps=attack_steps, n_images=n_images,
           n_per_prompt=n_per_prompt)
    prompts = prompts or world_prompts(spec).forget
    a = _Attack(pipe, original, spec, classifier, "embedding", seed, steps, guidance)
    firsts = [first_word(tok) for tok, _, _ in a.family.prompt_encoders()]

    def freed(free: torch.Tensor, first: int):
        return lambda out: torch.cat([out[:, :first], free.to(out).expand(out.shape[0], -1, -1)], 1)

    with a.frozen():
        for i, prompt in enumerate(prompts):
            x0 = a.concept_images(i, prompt, n_images)
            ids = a.family.tokenize([prompt])
            with torch.no_grad():  # every encoder's own embeddings of the prompt, after its start token
                frees = [te.get_input_embeddings()(x)[0, f:].float().clone().requires_grad_(True)
                         for te, x, f in zip(a.encoders, ids, firsts)]
            edits = [freed(v, f) for v, f in zip(frees, firsts)]
            loss = minimize(frees, lambda: a.loss(x0, encode_edited(a.family, ids, edits).expand(n_images, -1, -1)),
                            attack_steps, torch.optim.Adam(frees, lr=lr))
            with torch.no_grad():
                cond = encode_edited(a.family, ids, edits)
            a.judge(i, prompt, cond, n_per_prompt, final_loss=loss.item())
    return a.result(steps=attack_steps, lr=lr)


def inversion_attack(pipe, original, spec: ConceptSpec | None, classifier, attack_steps: int = INVERSION_STEPS,
                     lr: float = 0.05, n_images: int = 4, n_per_prompt: int = 4, seed: int = 0,
                     steps: int = DEFAULT_STEPS, guidance: float = DEFAULT_GUIDANCE,
                     prompts: list[str] | None = None, word: str | None = None, batch_size: int = 8) -> dict:
    """Concept-Inversion-style attack: textual inversion of the erased concept against the unlearned model.

    In every forget prompt the concept's word (`word`; default: the spec's first term, "red" for
    "red" and "red+circle") becomes one placeholder token (prepended where the word does not occur).
    One embedding for it, shared by all prompts and started from a random vocabulary token, is
    learned (Adam, `lr`, `attack_steps` steps of `batch_size` images drawn from the `n_images` per
    prompt the original model made of the concept) to minimize the unlearned model's denoising loss.
    Then every forget prompt is sampled with the placeholder (`n_per_prompt` images each). Reports
    ``asr_inversion`` (or, without a classifier, ``inversion_distance``)."""
    _check(pipe, "inversion", classifier, prompts, attack_steps=attack_steps, n_images=n_images,
           n_per_prompt=n_per_prompt, batch_size=batch_size)
    prompts = prompts or world_prompts(spec).forget
    word = word if word is not None else (spec.a if spec is not None else "")
    a = _Attack(pipe, original, spec, classifier, "inversion", seed, steps, guidance)
    ids, at = [], []  # per encoder: the prompts' ids with the placeholder, and where it sits
    for tok, te, n in a.family.prompt_encoders():
        placed = [placeholder_ids(tok, p, word, n) for p in prompts]
        ids.append(torch.cat([i for i, _ in placed]).to(te.device))
        mask = torch.zeros(ids[-1].shape, dtype=torch.bool)
        mask[torch.arange(len(placed)), torch.tensor([pos for _, pos in placed])] = True
        at.append(mask.to(te.device))

    def encode(sel: torch.Tensor) -> torch.Tensor:
        """The conditioning of prompts `sel` with the learned word at each encoder's placeholder."""
        edits = [lambda out, m=m[sel.to(m.device)], w=w: torch.where(m.unsqueeze(-1), w.to(out), out)
                 for m, w in zip(at, split(a.family, v))]
        return encode_edited(a.family, [x[sel.to(x.device)] for x in ids], edits)

    with a.frozen():
        x0 = torch.cat([a.concept_images(i, p, n_images) for i, p in enumerate(prompts)])
        owner = torch.arange(len(prompts)).repeat_interleave(n_images)
        v = random_prefix(a.family, 1, a.g)[0].to(a.dev).requires_grad_(True)

        def batch_loss() -> torch.Tensor:
            pick = torch.randperm(x0.shape[0], generator=a.g)[:batch_size]
            return a.loss(x0[pick.to(x0.device)], encode(owner[pick]))

        loss = minimize([v], batch_loss, attack_steps, torch.optim.Adam([v], lr=lr))
        for i, prompt in enumerate(prompts):
            with torch.no_grad():
                cond = encode(torch.tensor([i]))
            a.judge(i, prompt, cond, n_per_prompt)
    return a.result(steps=attack_steps, lr=lr, word=word, batch_size=batch_size, final_loss=loss.item())


OPTIMIZED = {"softprompt": softprompt_attack, "embedding": embedding_attack, "inversion": inversion_attack}
ATTACK_NAMES = ("paraphrase", *OPTIMIZED)


def parse_attacks(attack: str) -> list[str]:
    """'none', 'all', or a comma-separated list of attack names -> the attacks to run, in a fixed
    order. ValueError naming the unknown ones."""
    text = (attack or "none").strip().lower()
    if text == "none":
        return []
    if text == "all":
        return list(ATTACK_NAMES)
    asked = [a.strip() for a in text.split(",") if a.strip()]
    unknown = [a for a in asked if a not in ATTACK_NAMES]
    if unknown or not asked:
        raise ValueError(f"unknown attack(s) {', '.join(map(repr, unknown)) or repr(attack)}: choose none, all, or "
                         f"a comma-separated list of {', '.join(ATTACK_NAMES)}")
    return [a for a in ATTACK_NAMES if a in asked]


def run_optimized(name: str, pipe, original, spec, classifier, settings: dict | None = None, **common) -> dict:
    """One optimized attack by name with its per-attack `settings` (its own keywords: attack_steps,
    lr, k, ...) and the `common` ones (n_per_prompt, seed, steps, guidance, prompts)."""
    return OPTIMIZED[name](pipe, original, spec, classifier, **common, **(settings or {}))
