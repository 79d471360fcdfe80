"""TrustUnlearner: one unlearning step = objectives -> localization -> Hessian term -> masked update.

The same engine runs TRUST and the baselines (SalUn, ESD); a method is a :class:`TrustConfig`
naming registered pieces (see :mod:`trust_fast.methods`). Two ways to use it:

- high level: ``TrustUnlearner(pipe, concept="red").step()`` draws its own data-free batches
  (forget/anchor/retain images sampled once from the frozen model and cached);
- low level, inside your own diffusers loop: ``forget_loss(...)`` / ``retain_loss(...)`` on your
  batch, then ``update(loss_f, loss_r)`` (localization + Hessian term + masked optimizer step).

Only the target modules are trainable (everything else has requires_grad False). The unlearner
orchestrates components that each own their state (``state_dict``/``load_state_dict``, collected
by :mod:`trust_fast.checkpoint`): the denoiser passes (:mod:`.denoiser`), mixed precision
(:mod:`.precision`), the data-free cache (:mod:`.data`), the adversary (:mod:`.adversary`), the
Hessian regularizer (:mod:`.regularizer`), the method's localization and forget objective
(:mod:`trust_fast.methods`) and the run's record (:mod:`.report`). The step itself lives in
:mod:`.update`; the run, the report and saving in :mod:`.run`.
"""
from __future__ import annotations

import time
from dataclasses import asdict

import torch
from torch import Tensor

from .. import distributed, methods, objectives
from ..concepts import ConceptSpec, PromptSet, parse_concept
from ..config import TrustConfig, effective_fields
from ..fsdp import Sharding
from ..guard import check_finite
from ..localize import Target, find_targets, freeze_all_but
from ..models import family_for
from .adversary import Adversary
from .data import DataFreeCache, Embeddings, pipeline_guidance
from .denoiser import Denoiser
from .precision import Precision, amp_dtype
from .regularizer import HessianTerm
from .report import RunRecord
from .run import RunMixin
from .update import UpdateMixin


class TrustUnlearner(UpdateMixin, RunMixin):
    """Unlearn a concept from a diffusers text-to-image pipeline, in place.

    Args:
        pipe: a diffusers pipeline of a supported family (trust_fast.models: SD 1.x/2.x, SDXL,
            SD3, Flux, the built-in ShapesPipeline); anything else raises UnsupportedPipeline.
        concept: "A", "A+B" or "A|B". For the built-in world the prompt sets come from its
            vocabulary; for any other model pass `prompts` too (see concepts.user_prompts).
        config: a TrustConfig (default: TRUST's defaults).
        prompts: explicit forget/anchor/retain prompts (required outside the shapes world).
            Without retain prompts, the anchors and the empty prompt are retained.
    """

    def __init__(self, pipe, concept: str | ConceptSpec | None = None, config: TrustConfig | None = None,
                 prompts: PromptSet | None = None):
        config = self._checked_config(config, prompts)
        self.family = family_for(pipe)  # UnsupportedPipeline (one line) before any work
        check_finite(pipe, "cannot unlearn from")
        self.config = cfg = config
        self.pipe, self.unet = pipe, self.family.denoiser
        self.device, self.dtype = self.unet.device, self.unet.dtype
        self.concept, self.prompts = self._concept_and_prompts(pipe, concept, prompts, cfg.partial_prompts)
        self._setup_targets()
        self._setup_models()
        self.precision = Precision(self.params, self._names, [self.targets[k].module for k in self._target_of],
                                   self.denoiser.amp_dtype)
        self.noising = objectives.Noising(pipe.scheduler, self.family.prediction_type, self.device)
        # under torch.distributed each rank draws its own batches (its gradients are averaged in update)
        self.generator = torch.Generator(device=self.device).manual_seed(cfg.seed + distributed.rank())
        self.emb = self._encode_prompts()
        neighbors = (self.prompts.neighbors(self.concept) if self.concept is not None else [])
        self.localization = methods.base.localization(self)
        self.data = DataFreeCache(self.family, self.denoiser, self.noising, self.emb,
                                  torch.tensor(neighbors, dtype=torch.int64, device=self.device), cfg, self.generator,
                                  pipeline_guidance(pipe), self.localization.needs_forget_images)
        self.optimizer = self.localization.optimizer
        self.hessian = HessianTerm(self)
        self.adversary = Adversary(self.family, self.prompts, cfg, self.generator, self.device)
        self.record = RunRecord()
        self.selected_rows: list[Tensor] = []
        self.finalized: dict | None = None
        self.resumed_from: str | None = None     # real path of the checkpoint directory it resumed from
        self._acc = None                         # micro-batches of the step being accumulated (accumulate.py)
        self.unsharded = False                   # FSDP2: the run ended with unshard()

    @torch.no_grad()
    def _encode_prompts(self) -> Embeddings:
        """The prompts' conditioning; an entry whose images are another prompt's (PromptSet's
        sources: the partial prompts) gets that prompt's in Embeddings.forget_images /
        retain_images, every other row a copy of its own (so Embeddings.sourced tells them apart)."""
        encode, p = self.family.encode, self.prompts
        emb = Embeddings(encode(p.forget), encode(p.anchors), encode(p.retain), self.family.uncond())
        for kind in ("forget", "retain"):
            own, sources = getattr(p, kind), p.image_prompts(kind)
            rows = [i for i, (text, src) in enumerate(zip(own, sources)) if text != src]
            if rows:
                images = getattr(emb, kind).clone()
                images[rows] = encode([sources[i] for i in rows])
                setattr(emb, f"{kind}_images", images)
        return emb

    @staticmethod
    def _checked_config(config, prompts) -> TrustConfig:
        """The config validated, with its automatic values (the adversary on, the retain cache as
        large as the forget one) resolved."""
        if config is not None and not isinstance(config, TrustConfig):
            raise TypeError(f"config must be a TrustConfig (trust_fast.methods.config('trust', ...) builds one), got "
                            f"{type(config).__name__}")
        if prompts is not None and not isinstance(prompts, PromptSet):
            raise TypeError(f"prompts must be a PromptSet (trust_fast.concepts.user_prompts builds one), got "
                            f"{type(prompts).__name__}")
        config = config or TrustConfig()
        config.validate()
        resolved = effective_fields(asdict(config))
        return config.replace(**{k: v for k, v in resolved.items() if v != getattr(config, k)})

    @staticmethod
    def _concept_and_prompts(pipe, concept, prompts, partial: str = "off") -> tuple[ConceptSpec | None, PromptSet]:
        """A pipeline that knows its own concepts (the built-in world's ShapesPipeline) checks the
        concept's words and builds the prompt sets; for any other, the user gives the prompts.
        `partial` (TrustConfig.partial_prompts): add the prompts that name only part of the concept,
        the pipeline's own (concept_prompts(spec, partial=True)) or derived from the words
        (PromptSet.with_partials) for the user's prompts, unless they already carry image sources."""
        if concept is not None and not isinstance(concept, (str, ConceptSpec)):
            raise TypeError(f"concept must be a str ('A', 'A+B' or 'A|B') or a ConceptSpec, got {concept!r} "
                            f"({type(concept).__name__})")
        own_parse, own_prompts = getattr(pipe, "parse_concept", None), getattr(pipe, "concept_prompts", None)
        if isinstance(concept, str):
            concept = own_parse(concept) if callable(own_parse) else parse_concept(concept, world=False)
        partial = concept is not None and (partial == "on" or (partial == "auto" and concept.b is not None))
        if prompts is None:
            if concept is None or not callable(own_prompts):
                raise ValueError("outside the shapes world, give prompts (trust_fast.concepts.user_prompts) "
                                 "as well as the concept")
            prompts = own_prompts(concept, partial=True) if partial else own_prompts(concept)
        elif partial and not prompts.forget_sources:
            prompts = prompts.with_partials(concept)
        if not prompts.forget:
            raise ValueError(f"concept {str(concept)!r} has no forget prompts")
        if not prompts.retain:
            prompts = PromptSet(prompts.forget, prompts.anchors, sorted(set(prompts.anchors)) + [""],
                                forget_sources=prompts.forget_sources)
        return concept, prompts

    def _setup_targets(self) -> None:
        """The target modules (default: the family's; a UNet's cross-attention q/k/v and feed-forward
        layers, an MMDiT's joint-attention projections and feed-forward layers), the only trainable
        parameters; FSDP2 (trust_fast.fsdp): this rank's rows of every target."""
        cfg = self.config
        self.target_patterns = self.family.expand_targets(cfg.targets)
        self.targets: list[Target] = find_targets(self.unet, self.target_patterns)
        self.trainable_params = freeze_all_but(self.unet, self.targets)
        self.sharding = Sharding.of([t.weight for t in self.targets])
        if self.sharding is not None:
            self._check_sharded_config()
        for component in self.pipe.components.values():  # text encoders, VAE: never trained
            if isinstance(component, torch.nn.Module) and component is not self.unet:
                component.requires_grad_(False)
        self.params: list[Tensor] = [p for t in self.targets for p in t.params]
        pos = {id(p): i for i, p in enumerate(self.params)}
        self._weight_pos = [pos[id(t.weight)] for t in self.targets]
        self._target_of = [k for k, t in enumerate(self.targets) for _ in t.params]  # param -> its target
        names = {id(p): n for n, p in self.unet.named_parameters()}
        self._names = [names[id(p)] for p in self.params]
        self._dparams: list[Tensor] | None = None  # FSDP2: the sharded parameters (DTensors)
        if self.sharding is not None:  # from here on, params and targets are this rank's shards
            self._dparams = self.params
            self.targets = [Target(t.name, t.module, Sharding.local(t.weight), Sharding.local(t.bias))
                            for t in self.targets]
            self.params = [p for t in self.targets for p in t.params]
        # gradients and Hessian state to average over data-parallel ranks (FSDP2 reduce-scatters
        # its gradients itself, and a rank's shards are its own)
        self._average = distributed.average_ if self.sharding is None else (lambda tensors: None)
        # rows of the whole targets (FSDP2: over all ranks; self.targets hold this rank's)
        self.total_rows = (sum(self.sharding.global_rows) if self.sharding is not None
                           else sum(t.rows for t in self.targets))

    def _setup_models(self) -> None:
        """The frozen copy of the target weights (when the method needs the original model), the
        denoiser passes, and the config's fast paths (memory format, checkpointing)."""
        cfg = self.config
        needs_frozen = self.forget_objective.needs_frozen or cfg.retain_objective == "distill" or cfg.hessian != "none"
        self.theta0: list[Tensor] | None = [p.detach().clone() for p in self.params] if needs_frozen else None
        frozen = dict(zip(self._names, self.theta0)) if self.theta0 is not None else None
        # without a frozen copy (SalUn), a digest tells whether the run changed the model at all
        self._start_digest = (distributed.weights_digest(self.params) if self.theta0 is None and self.sharding is None
                              else None)
        if cfg.channels_last:
            self.unet.to(memory_format=torch.channels_last)
        if cfg.grad_checkpointing:
            if not callable(getattr(self.unet, "enable_gradient_checkpointing", None)):
                raise ValueError(f"grad_checkpointing: the denoiser ({type(self.unet).__name__}) has no "
                                 "enable_gradient_checkpointing()")
            self.unet.enable_gradient_checkpointing()
        amp = None if self.sharding is not None else amp_dtype(cfg.amp, self.device, self.dtype)  # FSDP2 casts itself
        sharded_frozen = None
        if self.sharding is not None:
            sharded_frozen = lambda: self.sharding.swapped(self.params, self.theta0, self._edited_rows())  # noqa: E731
        self.denoiser = Denoiser(self.family, amp, self.params, frozen, cfg.channels_last, cfg.compile_unet,
                                 sharded_frozen)

    def _check_sharded_config(self) -> None:
        """What an FSDP2 denoiser does not support, refused before any work (ValueError)."""
        cfg, why = self.config, None
        if cfg.amp not in ("auto", "off"):
            why = f"amp={cfg.amp!r} (give shard_denoiser an FSDP2 MixedPrecisionPolicy instead)"
        elif cfg.hessian == "hvp":
            why = "hessian='hvp' (use 'diag': its products are finite differences under FSDP2)"
        elif cfg.localization == "static":
            why = "static localization (SalUn's mask ranks all weights together)"
        elif cfg.compile_unet or cfg.compile:
            why = "compile / compile_unet"
        elif any(t.weight.dtype != torch.float32 for t in self.targets):
            why = "half-precision sharded weights (keep them float32 and cast with a MixedPrecisionPolicy)"
        if why:
            raise ValueError(f"an FSDP2-sharded denoiser does not support {why}")

    # --------------------------------------------------------------- parts, by role

    @property
    def forget_objective(self):
        """The method's forget objective (registered in trust_fast.methods), as the config names it now."""
        return methods.base.forget_objective(self.config)

    @property
    def opt_params(self) -> list[Tensor]:
        """The tensors the optimizer steps: float32 masters of half-precision targets, or the params."""
        return self.precision.opt_params

    @property
    def masked_optimizer(self):
        """The MaskedAdamW under ``self.optimizer``, which may be a wrapper of it (accelerate's
        ``AcceleratedOptimizer`` after ``unlearner.optimizer = accelerator.prepare(unlearner.optimizer)``):
        row selection and the Hessian penalty go to it, ``step()`` through the wrapper."""
        opt = self.optimizer
        for _ in range(8):
            if hasattr(opt, "set_rows"):
                return opt
            opt = getattr(opt, "optimizer", None)
        raise TypeError(f"unlearner.optimizer ({type(self.optimizer).__name__}) wraps no MaskedAdamW; "
                        "replace it only with a wrapper of the unlearner's own optimizer")

    def _edited_rows(self) -> list[Tensor | None]:
        """Per target param, the rows that can differ from theta_0: those MaskedAdamW ever updated
        (None, all rows, under a dense optimizer; Sharding.swapped widens them to all rows inside a
        whole-shard swap such as a finite-difference probe)."""
        try:
            opt = self.masked_optimizer
        except TypeError:
            return [None] * len(self.params)
        return [opt.edited_rows(q) for q in self.opt_params]

    def _param_rows(self, rows: list[Tensor]) -> list[Tensor]:
        """The selected rows of each target param (a target's weight and bias share its rows)."""
        return [rows[k] for k in self._target_of]

    def pred(self, noisy: Tensor, t: Tensor, cond: Tensor) -> Tensor:
        """The edited model's prediction, with grad to the target parameters."""
        return self.denoiser.pred(noisy, t, cond)

    def frozen_pred(self, noisy: Tensor, t: Tensor, cond: Tensor) -> Tensor:
        """eps_0 (or v_0): the original model's prediction, without grad."""
        return self.denoiser.frozen_pred(noisy, t, cond)

    def gradients(self, loss: Tensor) -> list[Tensor]:
        """Gradient of `loss` w.r.t. the target parameters (float16: through the loss scale, returned
        unscaled in float32). FSDP2: this rank's rows of the mean over the ranks (one backward)."""
        if self.sharding is not None:
            return Sharding.grads(loss, self._dparams)
        return self.precision.grads(loss)

    # --------------------------------------------------------------- data-free

    def sample_x0(self, emb: Tensor, n_per: int, batch_size: int = 256, bar=None) -> Tensor:
        """Data-free x0 (len(emb), n_per, C, H, W) from the frozen model (see DataFreeCache.sample_x0)."""
        return self.data.sample_x0(emb, n_per, batch_size, bar)

    def prepare(self, progress: bool = False) -> None:
        """Sample and cache the data-free images (once; `progress` shows a bar per image batch on
        stderr); the method's localization prepares here too (SalUn's static mask)."""
        if self.data.pools is not None:
            return
        t0 = time.perf_counter()
        self.data.fill(progress)
        self.localization.prepare(self)
        self.data.seconds = time.perf_counter() - t0
        self.record.seconds += self.data.seconds

    def pool_shapes(self) -> dict[str, tuple[int, ...]]:
        """Shape of each cached pool of data-free images: (prompts, images per prompt, *latent shape)."""
        return self.data.shapes()

    def forget_batch(self, n: int):
        """A data-free forget batch of n (a fraction behind the adversary's prefixes)."""
        return self.data.forget_batch(n, self.adversary.emb_forget, self.config.adv_fraction)

    def retain_batch(self, n: int):
        """A data-free retain batch of n (neighbours first; a fraction behind the adversary)."""
        return self.data.retain_batch(n, self.adversary.emb_retain, self.config.adv_retain_fraction)

    def adversary_shape(self) -> tuple[int, ...]:
        return self.adversary.shape()

    def refresh_adversary(self) -> None:
        """Step the adversary against the current model (see trust_fast.engine.adversary)."""
        self.adversary.refresh(self.data.forget_images, self.noising, self.pred)

    # --------------------------------------------------------------- state, by component

    def state_dict(self) -> dict:
        """The run's state as its components hold it (trust_fast.checkpoint writes it with the run's
        identity: concept, config, target names, base digest)."""
        return {"params": [p.detach().cpu().clone() for p in self.params],
                **self.precision.state_dict(),
                "optimizer": self.optimizer.state_dict(),
                **self.localization.state_dict(),
                **self.hessian.state_dict(),
                **self.data.state_dict(),
                **self.adversary.state_dict(),
                **self.record.state_dict(),
                "generator": self.generator.get_state(),
                "torch_rng": torch.get_rng_state()}

    def check_state(self, f, state: dict) -> None:
        """Every tensor a saved state restores, checked against this run by its component (count,
        shape, dtype kind, range, finiteness) before anything is restored. `f`: the checkpoint's
        field checker (trust_fast.checkpoint.Fields), which raises one ValueError naming the field."""
        f.tensors(state["params"], "target parameter", self.params, floating=True)
        self.precision.check_state(f, state)
        self.localization.check_state(f, state, self)
        self.hessian.check_state(f, state)
        self.data.check_state(f, state)
        self.adversary.check_state(f, state, self.emb.forget, self.emb.retain)
        self.record.check_state(f, state)
        f.same_groups(state["optimizer"], self.optimizer, "optimizer")

    @torch.no_grad()
    def load_state_dict(self, state: dict) -> None:
        """Restore a state checked by :meth:`check_state` (the optimizer validates its own first,
        so a refused state leaves the unlearner as it was)."""
        self.optimizer.load_state_dict(state["optimizer"])
        for p, v in zip(self.params, state["params"], strict=True):
            p.copy_(v.to(p.device, p.dtype))
        self.precision.load_state_dict(state)
        self.localization.load_state_dict(state, self)
        self.hessian.load_state_dict(state)
        self.data.load_state_dict(state)
        self.adversary.load_state_dict(state, self.dtype)
        self.record.load_state_dict(state)
        self.generator.set_state(state["generator"])
        torch.set_rng_state(state["torch_rng"])

    # --------------------------------------------------------------- the components' state, by the names
    # of the single-class engine (README, tests and scripts read them)

    step_count = property(lambda self: self.record.step_count,
                          lambda self, v: setattr(self.record, "step_count", v))
    skipped_steps = property(lambda self: self.record.skipped_steps)
    skipped_by_reason = property(lambda self: self.record.skipped_by_reason)
    seconds = property(lambda self: self.record.seconds)
    history = property(lambda self: self.record.history)
    failed_checkpoints = property(lambda self: self.record.failed_checkpoints)
    pools = property(lambda self: self.data.pools, lambda self, v: setattr(self.data, "pools", v))
    pool_seconds = property(lambda self: self.data.seconds)
    master = property(lambda self: self.precision.master)
    loss_scale = property(lambda self: self.precision.loss_scale,
                          lambda self, v: setattr(self.precision, "loss_scale", v))
    amp_dtype = property(lambda self: self.denoiser.amp_dtype)
    localizer = property(lambda self: self.localization.localizer)
    mask = property(lambda self: getattr(self.localization, "mask", None))
    hutchinson = property(lambda self: self.hessian.hutchinson)
    adv_prefixes = property(lambda self: self.adversary.prefixes)
    adv_optimizers = property(lambda self: self.adversary.optimizers)
    emb_forget_adv = property(lambda self: self.adversary.emb_forget)
    emb_retain_adv = property(lambda self: self.adversary.emb_retain)
    adv_refreshes = property(lambda self: self.adversary.refreshes)
    adv_seconds = property(lambda self: self.adversary.seconds)
    emb_forget = property(lambda self: self.emb.forget)
    emb_anchor = property(lambda self: self.emb.anchor)
    emb_retain = property(lambda self: self.emb.retain)
    emb_uncond = property(lambda self: self.emb.uncond)
    prediction_type = property(lambda self: self.noising.prediction_type)
    alphas_cumprod = property(lambda self: self.noising.alphas_cumprod)
    num_train_timesteps = property(lambda self: self.noising.num_train_timesteps)
