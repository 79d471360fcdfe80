"""The data-free image cache: images of the forget, anchor and retain prompts sampled once from the
frozen model, and the noised batches every step draws from them."""
from __future__ import annotations

import inspect
import time
from dataclasses import dataclass

import torch
from torch import Tensor

X0_POOLS = {"forget": ["forget"], "anchor": ["anchor"], "forget+anchor": ["forget", "anchor"]}


@dataclass
class Batch:
    noisy: Tensor
    t: Tensor
    cond: Tensor
    x0: Tensor
    noise: Tensor
    anchor: Tensor | None = None


@dataclass
class Embeddings:
    """The prompts' conditioning (N, L, D) on the denoiser's device and dtype. `forget_images` /
    `retain_images`: the conditioning the entries' data-free images are sampled with, where it is
    not their own (PromptSet.forget_sources: partial prompts train on the whole concept's images)."""
    forget: Tensor
    anchor: Tensor
    retain: Tensor
    uncond: Tensor
    forget_images: Tensor | None = None
    retain_images: Tensor | None = None

    def images_of(self, kind: str) -> Tensor:
        """The conditioning that samples the `kind` ("forget", "retain") pool."""
        own = getattr(self, f"{kind}_images")
        return getattr(self, kind) if own is None else own

    def sourced(self, kind: str) -> Tensor:
        """(N,) bool: the `kind` entries whose images are another prompt's (the partial prompts; the
        other rows of `<kind>_images` are copies of their own conditioning)."""
        return (self.images_of(kind) != getattr(self, kind)).flatten(1).any(1)


def pipeline_guidance(pipe) -> float:
    """The classifier-free guidance scale a pipeline samples with by default (7.5 when it names none)."""
    param = inspect.signature(type(pipe).__call__).parameters.get("guidance_scale")
    return 7.5 if param is None or param.default is inspect.Parameter.empty else param.default


class DataFreeCache:
    """Pools of data-free images, by name ("forget", "anchor", "retain"), each (prompts, images per
    prompt, *latent shape), and the batches drawn from them.

    Args:
        family: the pipeline's family adapter (sampler, latent shape, guidance).
        denoiser: the engine's :class:`~trust_fast.engine.denoiser.Denoiser` (frozen passes).
        noising: the scheduler's forward process (:class:`trust_fast.objectives.Noising`).
        emb: the prompts' :class:`Embeddings`; `neighbors` (K,) int64 retain prompts near the concept.
        config: the run's TrustConfig; `generator` draws every random number.
        guidance: the pipeline's default guidance scale (:func:`pipeline_guidance`), which the
            sampling uses unless config.x0_guidance sets one.
        forget_images: cache the forget images even when batches do not draw from them (the
            method's localization reads them, as SalUn's mask does).

    Forget entries whose images are another prompt's (partial prompts, `Embeddings.sourced`) fill
    round(config.partial_fraction * n) rows of a forget batch, the other entries the rest; retain
    entries of that kind are distilled toward the frozen model on their source (`_retain_targets`).
    """

    def __init__(self, family, denoiser, noising, emb: Embeddings, neighbors: Tensor, config, generator,
                 guidance: float, forget_images: bool = False):
        self.family, self.denoiser, self.noising, self.emb = family, denoiser, noising, emb
        sourced = emb.sourced("forget")
        self.partial, self.whole = sourced.nonzero().flatten(), (~sourced).nonzero().flatten()
        self.retain_sourced = emb.sourced("retain")
        self.neighbors, self.config, self.generator = neighbors, config, generator
        self.default_guidance, self.forget_images_wanted = guidance, forget_images
        self.device = denoiser.device
        self.pools: dict[str, Tensor] | None = None
        self.seconds = 0.0

    # ------------------------------------------------------------- sampling

    @torch.no_grad()
    def sample_x0(self, emb: Tensor, n_per: int, batch_size: int = 256, bar=None) -> Tensor:
        """Data-free x0: (len(emb), n_per, C, H, W) sampled from the frozen model with the family's
        sampler (DDIM; flow-matching Euler for SD3) and guidance, in the space the denoiser
        denoises (latents for a pipeline with a VAE)."""
        cfg, fam = self.config, self.family
        guidance = self.default_guidance if cfg.x0_guidance is None else cfg.x0_guidance
        sched = fam.sampler()
        fam.set_timesteps(sched, cfg.x0_steps, self.device)
        conds = emb.repeat_interleave(n_per, 0)
        x = torch.randn(conds.shape[0], *fam.sample_shape(), generator=self.generator, device=self.device,
                        dtype=self.denoiser.dtype) * getattr(sched, "init_noise_sigma", 1.0)
        out = []
        for i in range(0, conds.shape[0], batch_size):
            xb, cb = x[i:i + batch_size], conds[i:i + batch_size]
            ub = self.emb.uncond.expand(cb.shape[0], -1, -1)
            if i:  # stateful samplers (flow-matching Euler) count their steps: start each batch afresh
                fam.set_timesteps(sched, cfg.x0_steps, self.device)
            for t in sched.timesteps:
                guided = fam.guided_prediction(self.denoiser.frozen_pred, xb, t, cb, ub, guidance)
                xb = sched.step(guided, t, xb).prev_sample
            out.append(xb)
            if bar is not None:
                bar.update(xb.shape[0])
        return torch.cat(out).view(emb.shape[0], n_per, *x.shape[1:])

    def wanted(self) -> dict[str, Tensor]:
        """The prompts whose data-free images the run caches, by pool name: their embeddings."""
        cfg, wanted = self.config, {}
        if cfg.x0_from in ("forget", "forget+anchor") or self.forget_images_wanted or cfg.adv_prefix:
            wanted["forget"] = self.emb.images_of("forget")
        if cfg.x0_from in ("anchor", "forget+anchor"):
            wanted["anchor"] = self.emb.anchor
        if cfg.retain_objective != "none" and cfg.alpha > 0:
            wanted["retain"] = self.emb.images_of("retain")
        return wanted

    def per_prompt(self, name: str) -> int:
        cfg = self.config
        return cfg.x0_retain_per_prompt if name == "retain" else cfg.x0_per_prompt

    def shapes(self) -> dict[str, tuple[int, ...]]:
        """Shape of each pool: (prompts, images per prompt, *latent shape)."""
        return {name: (emb.shape[0], self.per_prompt(name), *self.family.sample_shape())
                for name, emb in self.wanted().items()}

    def fill(self, progress: bool = False) -> float:
        """Sample every pool (once); returns the seconds it took. `progress`: a bar on stderr."""
        from tqdm.auto import tqdm

        t0 = time.perf_counter()
        wanted = self.wanted()
        total = sum(e.shape[0] * self.per_prompt(name) for name, e in wanted.items())
        with tqdm(total=total, desc="data-free images", unit="img", disable=not progress, leave=False) as bar:
            self.pools = {name: self.sample_x0(emb, self.per_prompt(name), bar=bar) for name, emb in wanted.items()}
        self.seconds = time.perf_counter() - t0
        return self.seconds

    # ------------------------------------------------------------- batches

    def _randint(self, high: int, n: int) -> Tensor:
        return torch.randint(0, high, (n,), generator=self.generator, device=self.device)

    def forget_batch(self, n: int, adversarial: list[Tensor], fraction: float) -> Batch:
        """n forget examples; the last round(fraction * n) see their prompt behind one of the
        adversary's conditionings `adversarial` (each (forget prompts, L, D))."""
        cfg = self.config
        i = self._forget_rows(n)
        j = self._randint(cfg.x0_per_prompt, n)
        sources = X0_POOLS[cfg.x0_from]
        x0 = self.pools[sources[0]][i, j]
        if len(sources) == 2:
            use_anchor = torch.rand(n, generator=self.generator, device=self.device) < 0.5
            x0 = torch.where(use_anchor.view(-1, *[1] * (x0.dim() - 1)), self.pools["anchor"][i, j], x0)
        noisy, t, noise = self.noising.noised(x0, self.generator)
        cond = self.emb.forget[i]
        k = round(fraction * n) if adversarial else 0
        if k:
            if len(adversarial) == 1:
                behind = adversarial[0][i[n - k:]]
            else:
                which = self._randint(len(adversarial), k)
                behind = torch.stack(adversarial)[which, i[n - k:]]
            cond = torch.cat([cond[:n - k], behind])
        return Batch(noisy, t, cond, x0, noise, self.emb.anchor[i])

    def _forget_rows(self, n: int) -> Tensor:
        """n forget entries, uniform; with partial prompts, round(partial_fraction * n) of them from
        the partial entries and the rest from the whole-concept ones (so that the many partial
        prompts do not crowd out the prompts that name the whole concept)."""
        if not self.partial.numel() or not self.whole.numel():
            return self._randint(self.emb.forget.shape[0], n)
        k = round(self.config.partial_fraction * n)
        return torch.cat([self.whole[self._randint(self.whole.numel(), n - k)],
                          self.partial[self._randint(self.partial.numel(), k)]])

    def retain_batch(self, n: int, adversarial: list[Tensor], fraction: float) -> Batch:
        """n retain examples, the first round(retain_neighbors * n) from the concept's neighbours
        (A without B, B without A); the last round(fraction * n) behind an adversary's prefix."""
        pool = self.pools["retain"]
        i = self._randint(pool.shape[0], n)
        k = round(self.config.retain_neighbors * n) if self.neighbors.numel() else 0
        if k:
            i[:k] = self.neighbors[self._randint(self.neighbors.numel(), k)]
        j = self._randint(pool.shape[1], n)
        x0 = pool[i, j]
        noisy, t, noise = self.noising.noised(x0, self.generator)
        cond = self.emb.retain[i]
        k = round(fraction * n) if adversarial else 0
        if k:
            which = self._randint(len(adversarial), k)
            cond = torch.cat([cond[:n - k], torch.stack(adversarial)[which, i[n - k:]]])
        return Batch(noisy, t, cond, x0, noise, self._retain_targets(i, cond))

    def _retain_targets(self, i: Tensor, cond: Tensor) -> Tensor | None:
        """The conditioning of the retain batch's distillation targets where it is not the batch's own:
        an entry that trains on another prompt's images (a partial prompt, "a red" on red squares) is
        distilled toward the frozen model on that prompt ("a plain red square"), so that the kept
        target does not pull the partial prompt back toward the concept. None when no entry has one."""
        if self.emb.retain_images is None:
            return None
        other = self.retain_sourced[i].view(-1, *[1] * (cond.dim() - 1))
        return torch.where(other, self.emb.retain_images[i], cond)

    def forget_images(self, n: int) -> tuple[Tensor, Tensor]:
        """n images drawn from the forget pool (the adversary's training data) and their prompts' indices."""
        pool = self.pools["forget"]
        i = self._randint(pool.shape[0], n)
        j = self._randint(pool.shape[1], n)
        return pool[i, j], i

    # ------------------------------------------------------------- state

    def state_dict(self) -> dict:
        return {"pools": None if self.pools is None else {k: v.cpu() for k, v in self.pools.items()},
                "pool_seconds": self.seconds}

    def check_state(self, f, state: dict) -> None:
        pools = f.of_type(state.get("pools"), "pools", dict, none=True)
        if pools is not None:
            want = self.shapes()
            if set(pools) != set(want):
                f.misfit("data-free image cache", f": pools {sorted(map(str, pools))}, expected {sorted(want)}")
            for name, shape in want.items():
                f.tensor(pools[name], f"data-free images {name!r}", shape=shape, floating=True)

    def load_state_dict(self, state: dict) -> None:
        if state["pools"] is not None:
            self.pools = {k: v.to(self.device, self.denoiser.dtype) for k, v in state["pools"].items()}
        self.seconds = state["pool_seconds"]
