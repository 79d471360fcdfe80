"""The adversary trained against during unlearning: AdvUnlearn's inner loop, made cheap.

A soft prefix shared by all forget prompts, warm-started across refreshes, takes `adv_steps` Adam
steps that *minimize the current model's diffusion loss* on images of the concept (what an
UnlearnDiffAtk attacker does); the forget prompts are then re-encoded behind it, and a fraction of
every forget batch is mapped to the anchors from there. With `adv_population` > 1 there are that
many prefixes from their own random starts (an attacker starts from a random one too), and each
refresh steps the next in turn. With `adv_mode="tokens"` the adversary is instead an offset on
every input token embedding of each forget prompt (zero at the start, so the prompts themselves:
the embedding attack's search space), stepped on the prompts of each batch. Under
torch.distributed the adversary's gradient is averaged, so every rank holds the same prefixes
(offsets).
"""
from __future__ import annotations

import time

import torch
from torch import Tensor

from .. import distributed, objectives
from ..softprompt import (encode_with_offsets, encode_with_prefix, index_ids, minimize, offsets_shape, prefixed_ids,
                          random_prefix, widths)


class Adversary:
    """Soft prefixes (k, D) float32 (adv_population of them, made at their first refresh), their
    Adam optimizers, and the forget (and retain) prompts encoded behind each (N, L, D).

    Args:
        family: the family adapter (text encoders); `prompts`: the run's PromptSet.
        config: the TrustConfig (adv_* fields, batch_size); `generator`: the run's generator.
        device: where the prefixes live.
    """

    def __init__(self, family, prompts, config, generator: torch.Generator, device: torch.device):
        self.family, self.prompts, self.config = family, prompts, config
        self.generator, self.device = generator, device
        self.prefixes: list[Tensor] = []
        self.optimizers: list[torch.optim.Adam] = []
        self.emb_forget: list[Tensor] = []
        self.emb_retain: list[Tensor] = []  # retain prompts behind each (adv_retain_fraction > 0)
        self.refreshes = 0
        self.seconds = 0.0
        self._ids: list[Tensor] | None = None
        self._retain_ids: list[Tensor] | None = None

    @property
    def tokens(self) -> bool:
        return self.config.adv_mode == "tokens"

    def shape(self) -> tuple[int, ...]:
        """Shape of one adversary's free tensor: (adv_prefix, sum of the text encoders' widths) for a
        soft prefix; (forget prompts, token positions, sum of widths) for token offsets."""
        if self.tokens:
            return offsets_shape(self.family, len(self.prompts.forget))
        return (self.config.adv_prefix, sum(widths(self.family)))

    def _encode(self, ids: list[Tensor], free: Tensor) -> Tensor:
        return (encode_with_offsets if self.tokens else encode_with_prefix)(self.family, ids, free)

    def _start(self) -> None:
        """A new adversary: offsets start at the prompts themselves, as the embedding attack does;
        prefixes at random (ranks draw different starts: rank 0's is taken)."""
        cfg = self.config
        if self.tokens:
            self.prefixes.append(torch.zeros(self.shape(), device=self.device))
        else:
            self.prefixes.append(random_prefix(self.family, cfg.adv_prefix, self.generator).to(self.device))
        distributed.broadcast_(self.prefixes[-1:])
        self.optimizers.append(torch.optim.Adam([self.prefixes[-1]], lr=cfg.adv_lr))
        self.emb_forget.append(None)
        if cfg.adv_retain_fraction > 0:
            self.emb_retain.append(None)

    def refresh(self, images, noising: objectives.Noising, pred) -> None:
        """Step the next adversary: `images(n)` draws (x0, forget prompt index) from the data-free
        cache, `noising` noises them, `pred(noisy, t, cond)` is the edited model's prediction."""
        cfg = self.config
        t0 = time.perf_counter()
        if self._ids is None:  # the prompts never change: tokenize them once
            self._ids = (self.family.tokenize(self.prompts.forget) if self.tokens
                         else prefixed_ids(self.family, self.prompts.forget, cfg.adv_prefix))
        which = self.refreshes % cfg.adv_population
        if which == len(self.prefixes):
            self._start()
        prefix = self.prefixes[which].requires_grad_(True)

        def loss() -> Tensor:
            x0, i = images(cfg.batch_size)
            noisy, t, noise = noising.noised(x0, self.generator)
            cond = self._encode(index_ids(self._ids, i), prefix[i] if self.tokens else prefix)
            return objectives.mse(pred(noisy, t, cond), noising.target(x0, noise, t))

        minimize([prefix], loss, cfg.adv_steps, self.optimizers[which], reduce=distributed.average_)
        prefix.requires_grad_(False)
        with torch.no_grad():
            self.emb_forget[which] = self._behind(self._ids, prefix)
            if cfg.adv_retain_fraction > 0:
                if self._retain_ids is None:
                    self._retain_ids = prefixed_ids(self.family, self.prompts.retain, cfg.adv_prefix)
                self.emb_retain[which] = self._behind(self._retain_ids, prefix)
        self.refreshes += 1
        self.seconds += time.perf_counter() - t0

    def _behind(self, ids: list[Tensor], prefix: Tensor) -> Tensor:
        """Every prompt of `ids` encoded behind `prefix` (offsets: each with its own), 256 at a time."""
        return torch.cat([self._encode(index_ids(ids, slice(k, k + 256)), prefix[k:k + 256] if self.tokens else prefix)
                          for k in range(0, ids[0].shape[0], 256)])

    # ------------------------------------------------------------- state

    def state_dict(self) -> dict:
        if not self.prefixes:
            return {"adversary": None}
        return {"adversary": {"prefixes": [q.detach().cpu() for q in self.prefixes],
                              "optimizers": [o.state_dict() for o in self.optimizers],
                              "emb_forget": [e.cpu() for e in self.emb_forget],
                              "emb_retain": [e.cpu() for e in self.emb_retain], "refreshes": self.refreshes,
                              "seconds": self.seconds}}

    def check_state(self, f, state: dict, emb_forget: Tensor, emb_retain: Tensor) -> None:
        """`f`: the checkpoint's field checker; `emb_forget`/`emb_retain`: the run's prompt
        conditionings, whose shapes the saved adversarial ones must have."""
        adv = f.of_type(state.get("adversary"), "adversary", dict, none=True)
        if adv is None:
            return
        cfg = self.config
        if not cfg.adv_prefix:
            f.misfit("adversary", ": the checkpoint has an adversary, this run none")
        prefixes = f.of_type(adv.get("prefixes"), "adversary.prefixes", list)
        optimizers = f.of_type(adv.get("optimizers"), "adversary.optimizers", list)
        if not 1 <= len(prefixes) <= cfg.adv_population or len(optimizers) != len(prefixes):
            f.misfit("adversary", f": {len(prefixes)} prefixes and {len(optimizers)} optimizers, expected as many, "
                     f"1 to {cfg.adv_population}")
        # one soft token spans every text encoder of the family: a prefix (or token offsets) of another
        # model's encoders would be split wrongly at the first refresh
        want = self.shape()
        what = (f"{want[0]} tokens over this model's text encoders" if not self.tokens
                else f"offsets of {want[0]} forget prompts over this model's text encoders")
        for k, (q, o) in enumerate(zip(prefixes, optimizers)):
            f.of_type(q, f"adversarial prefix {k}", torch.Tensor)
            if tuple(q.shape) != want:
                f.misfit(f"adversarial prefix {k}", f": shape {tuple(q.shape)}, expected {want} ({what})")
            f.tensor(q, f"adversarial prefix {k}", floating=True)
            f.adam(o, f"adversary.optimizers[{k}]", [q])
            if isinstance(o, dict):
                f.same_groups(o, torch.optim.Adam([torch.zeros(1, requires_grad=True)], lr=cfg.adv_lr),
                              f"adversary.optimizers[{k}]")
        saved = f.of_type(adv.get("emb_forget"), "adversary.emb_forget", list)
        f.tensors(saved, "adversary.emb_forget", [emb_forget] * len(prefixes), floating=True)
        saved = f.of_type(adv.get("emb_retain", []), "adversary.emb_retain", list)
        if saved:
            f.tensors(saved, "adversary.emb_retain", [emb_retain] * len(prefixes), floating=True)
        if adv.get("refreshes") is not None:
            f.count(adv["refreshes"], "adversary.refreshes", len(prefixes))
        f.seconds(adv.get("seconds"), "adversary.seconds")

    def load_state_dict(self, state: dict, dtype: torch.dtype) -> None:
        adv = state.get("adversary")
        if adv is None:
            return
        self.prefixes = [q.to(self.device) for q in adv["prefixes"]]
        self.optimizers = []
        for q, o in zip(self.prefixes, adv["optimizers"]):
            self.optimizers.append(torch.optim.Adam([q], lr=self.config.adv_lr))
            self.optimizers[-1].load_state_dict(o)
        self.emb_forget = [e.to(self.device, dtype) for e in adv["emb_forget"]]
        self.emb_retain = [e.to(self.device, dtype) for e in adv.get("emb_retain", [])]
        self.refreshes = adv["refreshes"] if adv["refreshes"] is not None else len(self.prefixes)
        self.seconds = adv["seconds"]
