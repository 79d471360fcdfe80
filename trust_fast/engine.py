"""TrustUnlearner: one unlearning step = objectives -> localization -> Hessian term -> masked update.

The same engine runs TRUST and the baselines (SalUn, ESD); a method is a :class:`TrustConfig`
(see :mod:`trust_fast.methods`). Two ways to use it:

- high level: ``TrustUnlearner(pipe, concept="red").step()`` draws its own data-free batches
  (forget/anchor/retain images sampled once from the frozen model and cached);
- low level, inside your own diffusers loop: ``forget_loss(...)`` / ``retain_loss(...)`` on your
  batch, then ``update(loss_f, loss_r)`` (localization + Hessian term + masked optimizer step).

Only the target modules are trainable (everything else has requires_grad False); the frozen
model eps_0 is the same UNet evaluated with the saved original target weights swapped in by
``torch.func.functional_call``, so no second UNet is held in memory. Under ``amp`` every pass
runs in autocast with half-precision copies of the frozen matmul and convolution weights swapped
in the same way.
"""
from __future__ import annotations

import contextlib
import inspect
import os
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch
from torch import Tensor
from torch.func import functional_call

from . import distributed, objectives
from .concepts import ConceptSpec, PromptSet, parse_concept
from .families import family_for
from .config import (ADV_PREFIX_AUTO, COMPILE_BACKENDS, LOCALIZATIONS, PREDATED_FIELDS, X0_SOURCES,  # noqa: F401
                     TrustConfig, effective_fields)
from .hessian import HutchinsonDiagonal, double_backward_attention, grad_and_hvps, scaled
from .fsdp import Sharding
from .guard import check_finite
from .localize import DynamicLocalizer, Target, find_targets, freeze_all_but, static_mask

_AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def encode_prompts(pipe, prompts: list[str]) -> Tensor:
    """Conditioning (N, L, D) of the prompts for the pipeline's denoiser, on its device and dtype
    (see trust_fast.families: for SDXL the pooled embedding is packed in as extra rows)."""
    return family_for(pipe).encode(prompts)


def encode_images(pipe, images: Tensor) -> Tensor:
    """Images (N, 3, H, W) in [-1, 1] -> what the UNet denoises: VAE latents times the VAE's
    scaling factor when the pipeline has a VAE, the pixels themselves otherwise."""
    vae = getattr(pipe, "vae", None)
    denoiser = family_for(pipe).denoiser
    images = images.to(denoiser.device)
    if vae is None:
        return images.to(denoiser.dtype)
    with torch.no_grad():
        lat = vae.encode(images.to(vae.dtype)).latent_dist.sample()
    shift = vae.config.get("shift_factor") or 0.0  # SD3's VAE is shifted, then scaled
    return ((lat - shift) * vae.config.scaling_factor).to(denoiser.dtype)


SHARDED_HESSIAN_NEEDS_FN = (
    "under FSDP2 the Hessian steps take finite differences of the retain gradient, which needs the retain loss "
    "as a function that recomputes it: on those steps call update(forget_loss, lambda: unlearner.retain_loss(...)) "
    "(not accumulate(), nor a computed loss)")


def amp_dtype(mode: str, device: torch.device, dtype: torch.dtype) -> torch.dtype | None:
    """The autocast dtype of TrustConfig.amp `mode` for a denoiser on `device` holding `dtype`
    weights (None: no autocast). Autocast is mixed precision for float32 models: a half-precision
    model already runs in half precision (auto resolves to off; bf16/fp16 are refused)."""
    if mode == "off":
        return None
    if dtype != torch.float32:
        if mode == "auto":
            return None
        raise ValueError(f"amp={mode!r} autocasts a float32 model; this one holds {dtype} weights (use amp='off')")
    if mode == "auto":
        return torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else None
    return _AMP_DTYPES[mode]


def _check_loss(name: str, loss) -> None:
    """A loss handed to update(): None, or a scalar tensor with a graph to differentiate."""
    if loss is None:
        return
    if not isinstance(loss, Tensor):
        raise TypeError(f"update: {name} must be a scalar torch.Tensor (or None), got {type(loss).__name__}")
    if loss.numel() != 1:
        raise ValueError(f"update: {name} must be a scalar, got shape {tuple(loss.shape)}")
    if not loss.requires_grad:
        raise ValueError(f"update: {name} has no graph to differentiate (computed under no_grad, or not from the "
                         "model's forward pass)")


def _all_finite(tensors: list[Tensor]) -> bool:
    """True when no tensor holds a NaN or an Inf (one host sync for the whole list)."""
    flags = [torch.isfinite(t).all() for t in tensors if t.numel()]
    return bool(torch.stack(flags).all()) if flags else True


# why a step was skipped (report()["skipped_by_reason"]); a skipped step changes no weight and no state
SKIP_NO_FORGET = "no forget examples in the batch"
SKIP_NON_FINITE = "non-finite loss or gradient"
SKIP_OVERFLOW = "float16 overflow (loss scale lowered)"
SKIP_WEIGHTS = "non-finite weights after the update (rolled back)"
# skips that mean the run is diverging, not that a loss scale is settling
DIVERGING = (SKIP_NON_FINITE, SKIP_WEIGHTS)


class NonFiniteUpdate(ValueError):
    """A dense optimizer step made weights non-finite (a sparse one is rolled back instead)."""


class RunDiverged(ValueError):
    """Most steps of the run were skipped for non-finite values: its weights are not saved."""


LOSS_SCALE_INIT = 2.0 ** 16   # float16 models: the first loss scale
LOSS_SCALE_GROWTH = 100      # good steps between doublings of the loss scale


@dataclass
class _Batch:
    noisy: Tensor
    t: Tensor
    cond: Tensor
    x0: Tensor
    noise: Tensor
    anchor: Tensor | None = None


class _RetainParts:
    """The retain loss of a batch as micro-batch parts, for the steps that differentiate it twice:
    each part computes its share of the mean loss (weighted by its size) and records the value.
    Called as a whole, it is the whole batch's loss in one pass."""

    def __init__(self, part: Callable[[slice], Tensor], n: int, size: int):
        self.part, self.values = part, []
        self.parts = [self._part(part, slice(i, min(i + size, n)), n) for i in range(0, n, size)]

    def _part(self, part, sl: slice, n: int):
        def run() -> Tensor:
            loss = part(sl) * ((sl.stop - sl.start) / n)
            self.values.append(loss.detach())
            return loss
        return run

    def __call__(self) -> Tensor:
        return self.part(slice(None))

    def total(self) -> Tensor:
        return torch.stack(self.values).sum()


def _differentiated(retain_loss):
    """What the Hessian terms differentiate: the loss, or the functions computing its parts."""
    return retain_loss.parts if isinstance(retain_loss, _RetainParts) else retain_loss




@dataclass
class _History:
    steps: list[dict] = field(default_factory=list)
    evals: list[dict] = field(default_factory=list)


@dataclass
class _Accumulated:
    """Sums over the micro-batches of one accumulated step (TrustUnlearner.accumulate)."""
    n_forget: int = 0
    n_retain: int = 0
    loss_f: Tensor | None = None
    loss_r: Tensor | None = None
    g_f: list[Tensor] | None = None
    g_r: list[Tensor] | None = None
    hv: list[Tensor] | None = None
    diag_before: tuple | None = None

    @staticmethod
    def _add(total, new):
        return list(new) if total is None else [a + b for a, b in zip(total, new)]

    def add_forget(self, loss: Tensor, grads: list[Tensor]) -> None:
        self.n_forget += 1
        self.loss_f = loss if self.loss_f is None else self.loss_f + loss
        self.g_f = self._add(self.g_f, grads)

    def add_retain(self, loss: Tensor, grads: list[Tensor], hv: list[Tensor] | None) -> None:
        self.n_retain += 1
        self.loss_r = loss if self.loss_r is None else self.loss_r + loss
        self.g_r = self._add(self.g_r, grads)
        if hv is not None:
            self.hv = self._add(self.hv, hv)

    def mean(self) -> "_Accumulated":
        f, r = max(1, self.n_forget), max(1, self.n_retain)
        return _Accumulated(self.n_forget, self.n_retain,
                            None if self.loss_f is None else self.loss_f / f, None if self.loss_r is None else self.loss_r / r,
                            None if self.g_f is None else [g / f for g in self.g_f],
                            None if self.g_r is None else [g / r for g in self.g_r],
                            None if self.hv is None else [h / r for h in self.hv], self.diag_before)


class TrustUnlearner:
    """Unlearn a concept from a diffusers text-to-image pipeline, in place.

    Args:
        pipe: a diffusers pipeline of a supported family (trust_fast.families: SD 1.x/2.x, SDXL,
            the built-in ShapesPipeline); anything else raises UnsupportedPipeline.
        concept: "A", "A+B" or "A|B". For the built-in world the prompt sets come from its
            vocabulary; for any other model pass `prompts` too (see concepts.user_prompts).
        config: a TrustConfig (default: TRUST's defaults).
        prompts: explicit forget/anchor/retain prompts (required outside the shapes world).
            Without retain prompts, the anchors and the empty prompt are retained.
    """

    def __init__(self, pipe, concept: str | ConceptSpec | None = None, config: TrustConfig | None = None,
                 prompts: PromptSet | None = None):
        if config is not None and not isinstance(config, TrustConfig):
            raise TypeError(f"config must be a TrustConfig (trust_fast.methods.config('trust', ...) builds one), got "
                            f"{type(config).__name__}")
        if prompts is not None and not isinstance(prompts, PromptSet):
            raise TypeError(f"prompts must be a PromptSet (trust_fast.concepts.user_prompts builds one), got "
                            f"{type(prompts).__name__}")
        config = config or TrustConfig()
        config.validate()
        self.family = family_for(pipe)  # UnsupportedPipeline (one line) before any work
        check_finite(pipe, "cannot unlearn from")
        # the automatic values (the adversary on, the retain cache as large as the forget one)
        resolved = effective_fields(asdict(config))
        config = config.replace(**{k: v for k, v in resolved.items() if v != getattr(config, k)})
        self.config = cfg = config
        self.pipe, self.unet = pipe, self.family.denoiser
        self.device, self.dtype = self.unet.device, self.unet.dtype
        self.amp_dtype = amp_dtype(cfg.amp, self.device, self.dtype)
        # a pipeline that knows its own concepts (the built-in world's ShapesPipeline) checks the
        # concept's words and builds the prompt sets; for any other, the user gives the prompts
        if concept is not None and not isinstance(concept, (str, ConceptSpec)):
            raise TypeError(f"concept must be a str ('A', 'A+B' or 'A|B') or a ConceptSpec, got {concept!r} "
                            f"({type(concept).__name__})")
        own_parse, own_prompts = getattr(pipe, "parse_concept", None), getattr(pipe, "concept_prompts", None)
        if isinstance(concept, str):
            concept = own_parse(concept) if callable(own_parse) else parse_concept(concept, world=False)
        self.concept = concept
        if prompts is None:
            if concept is None or not callable(own_prompts):
                raise ValueError("outside the shapes world, give prompts (trust_fast.concepts.user_prompts) "
                                 "as well as the concept")
            prompts = own_prompts(concept)
        if not prompts.forget:
            raise ValueError(f"concept {str(concept)!r} has no forget prompts")
        if not prompts.retain:
            prompts = PromptSet(prompts.forget, prompts.anchors, sorted(set(prompts.anchors)) + [""])
        self.prompts = prompts
        self._neighbors = (torch.tensor(prompts.neighbors(concept), dtype=torch.int64, device=self.device)
                           if concept is not None else torch.zeros(0, dtype=torch.int64, device=self.device))

        # default targets: the family's (a UNet's cross-attention q/k/v and feed-forward layers; an
        # MMDiT's joint-attention text and query projections and image feed-forward layers)
        self.target_patterns = self.family.expand_targets(cfg.targets)
        self.targets: list[Target] = find_targets(self.unet, self.target_patterns)
        self.trainable_params = freeze_all_but(self.unet, self.targets)
        # FSDP2 (trust_fast.fsdp): the engine trains this rank's rows of every target
        self.sharding = Sharding.of([t.weight for t in self.targets])
        if self.sharding is not None:
            self._check_sharded_config()
            self.amp_dtype = None  # FSDP2's MixedPrecisionPolicy casts instead
        self._setup_fast_paths()
        for component in pipe.components.values():  # text encoders, VAE: never trained
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
        needs_frozen = (cfg.forget_objective in ("anchor", "esd") or cfg.retain_objective == "distill"
                        or cfg.hessian != "none")
        self.theta0: list[Tensor] | None = [p.detach().clone() for p in self.params] if needs_frozen else None
        self._frozen = dict(zip(self._names, self.theta0)) if self.theta0 is not None else None
        # without a frozen copy (SalUn), a digest tells whether the run changed the model at all
        self._start_digest = (distributed.weights_digest(self.params) if self.theta0 is None and self.sharding is None
                              else None)
        # amp: half-precision copies of the frozen matmul/conv weights, made once, stand in for them
        # on every pass. Autocast caches no cast of a weight without grad, so otherwise every pass
        # would cast them again and every graph would hold its own copies (1.2 GB per graph for
        # SD-1.5 in bf16).
        self._amp_weights = self._half_frozen_weights() if self.amp_dtype is not None else None
        self._frozen_weights = ({**(self._amp_weights or {}), **self._frozen} if self._frozen is not None
                                else self._amp_weights)
        # Half-precision models (float16, bfloat16) train on float32 master values of the target
        # weights: the optimizer steps the masters and the model's rows are refreshed from them, so
        # updates smaller than a half-precision step are not lost. float16 also scales its losses
        # (dynamic: halved after a step with an overflow, doubled after LOSS_SCALE_GROWTH good ones).
        half = any(p.dtype in (torch.float16, torch.bfloat16) for p in self.params)
        self.master: list[Tensor] | None = [p.detach().float().clone() for p in self.params] if half else None
        self.opt_params: list[Tensor] = self.master if half else self.params
        fp16 = self.amp_dtype == torch.float16 or any(p.dtype == torch.float16 for p in self.params)
        self.loss_scale: float | None = LOSS_SCALE_INIT if fp16 else None
        self._good_steps = 0
        # Hessian steps under amp differentiate w.r.t. half-precision leaf copies of the target
        # weights that autocast would cast anyway (float32 Linear/conv weights and biases): the same
        # values reach the same ops, but the gradient and the Hessian products come out in half
        # precision, half the memory of the run's peak (see :meth:`_hessian_leaves`)
        castable = (torch.nn.Linear, torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d)
        self._half_hessian = self.amp_dtype is not None
        self._castable = [isinstance(self.targets[k].module, castable) and p.dtype == torch.float32
                          for k, p in zip(self._target_of, self.params)]
        self._leaves: dict[str, Tensor] | None = None  # the leaf copies while a Hessian step runs

        sched = pipe.scheduler
        self.prediction_type = self.family.prediction_type
        self.alphas_cumprod = (None if self.prediction_type == "flow"  # flow matching has no abar
                               else sched.alphas_cumprod.to(self.device, torch.float32))
        self.num_train_timesteps = int(sched.config.num_train_timesteps)
        # under torch.distributed each rank draws its own batches (its gradients are averaged in update)
        self.generator = torch.Generator(device=self.device).manual_seed(cfg.seed + distributed.rank())

        with torch.no_grad():
            self.emb_forget = self.family.encode(prompts.forget)
            self.emb_anchor = self.family.encode(prompts.anchors)
            self.emb_retain = self.family.encode(prompts.retain)
            self.emb_uncond = self.family.uncond()

        if cfg.localization == "dynamic":
            from .optim import MaskedAdamW

            self.optimizer = MaskedAdamW(self.opt_params, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps,
                                         weight_decay=cfg.weight_decay, compile=cfg.compile)
            # FSDP2: saliency gathered over the ranks, selection on whole layers, this rank's rows kept
            self.localizer = DynamicLocalizer(self.targets, cfg.xi, cfg.loc_interval, cfg.saliency, cfg.max_fraction,
                                              compile=cfg.compile,
                                              localize=self.sharding.localizer() if self.sharding else None)
        else:
            self.optimizer = torch.optim.AdamW(self.opt_params, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps,
                                               weight_decay=cfg.weight_decay)
            self.localizer = None
        self.mask: list[Tensor] | None = None
        self.hutchinson = (HutchinsonDiagonal(self.params, self.generator, getattr(torch, cfg.hessian_dtype))
                           if cfg.hessian == "diag" else None)
        self.pools: dict[str, Tensor] | None = None
        # the adversary: soft prefixes (k, D) float32 (adv_population of them, made at their first
        # refresh), their Adam optimizers, and the forget prompts encoded behind each (N, L, D)
        self.adv_prefixes: list[Tensor] = []
        self.adv_optimizers: list[torch.optim.Adam] = []
        self.emb_forget_adv: list[Tensor] = []
        self.emb_retain_adv: list[Tensor] = []  # retain prompts behind each (adv_retain_fraction > 0)
        self.adv_refreshes = 0
        self._adv_ids: list[Tensor] | None = None
        self._adv_retain_ids: Tensor | None = None
        self.adv_seconds = 0.0
        self.step_count = 0
        self.seconds = 0.0
        self.pool_seconds = 0.0
        self.history = _History()
        self.selected_rows: list[Tensor] = []
        self.skipped_steps = 0
        self.skipped_by_reason: dict[str, int] = {}
        self.finalized: dict | None = None
        self.resumed_from: str | None = None     # real path of the checkpoint directory it resumed from
        self.failed_checkpoints: list[int] = []  # steps whose checkpoint could not be written
        self._acc: _Accumulated | None = None    # micro-batches of the step being accumulated
        self.unsharded = False                   # FSDP2: the run ended with unshard()

    @property
    def _opt(self) -> dict:
        """The tensor the optimizer steps for each target parameter (by id): its float32 master, or
        itself. Built on demand, so that a deep copy of the unlearner maps its own tensors."""
        return {id(p): q for p, q in zip(self.params, self.opt_params)}

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

    # ------------------------------------------------------------------ models

    def _setup_fast_paths(self) -> None:
        """The denoiser switches of the config: memory format, gradient checkpointing, compilation."""
        cfg = self.config
        if cfg.channels_last:
            self.unet.to(memory_format=torch.channels_last)
        if cfg.grad_checkpointing:
            if not callable(getattr(self.unet, "enable_gradient_checkpointing", None)):
                raise ValueError(f"grad_checkpointing: the denoiser ({type(self.unet).__name__}) has no "
                                 "enable_gradient_checkpointing()")
            self.unet.enable_gradient_checkpointing()
        self._forward = self.unet
        if cfg.compile_unet:
            # the target weights are updated in place and the frozen ones swapped in per pass: the
            # compiled graph takes parameters as inputs, so neither recompiles
            backend = "inductor" if cfg.compile_unet is True else cfg.compile_unet
            self._forward = torch.compile(self.unet, backend=backend)

    def _half_frozen_weights(self) -> dict[str, Tensor]:
        """amp_dtype copies of the weights and biases of the denoiser's linear and convolution
        layers outside the targets (the ops autocast runs in half precision anyway)."""
        trained = {id(p) for p in self.params}
        out = {}
        for name, module in self.unet.named_modules():
            if isinstance(module, (torch.nn.Linear, torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d)):
                for pname, p in module.named_parameters(recurse=False):
                    if id(p) not in trained and p.dtype == torch.float32:
                        out[f"{name}.{pname}" if name else pname] = p.detach().to(self.amp_dtype)
        return out

    def _denoise(self, noisy: Tensor, t: Tensor, cond: Tensor, weights: dict | None = None,
                 eager: bool = False) -> Tensor:
        """One denoiser pass (under autocast when amp is on; the prediction comes back in the
        model's dtype), with `weights` swapped in when given. `eager`: not through the compiled
        denoiser (a graph to be differentiated twice: compiled backwards are not differentiable)."""
        inputs = self.family.denoiser_inputs(noisy, t, cond)
        forward = self.unet if eager else self._forward
        if self.config.channels_last and noisy.dim() == 4:
            inputs[next(iter(inputs))] = noisy.contiguous(memory_format=torch.channels_last)
        with (torch.autocast(self.device.type, dtype=self.amp_dtype) if self.amp_dtype is not None
              else contextlib.nullcontext()):
            if weights is None:
                out = forward(**inputs).sample
            else:  # a compiled denoiser holds the model as _orig_mod
                prefix = "_orig_mod." if forward is not self.unet else ""
                out = functional_call(forward, {prefix + k: v for k, v in weights.items()}, (), inputs,
                                      strict=False).sample
        return out.to(self.dtype)

    def frozen_pred(self, noisy: Tensor, t: Tensor, cond: Tensor) -> Tensor:
        """eps_0 (or v_0): the original model's prediction, without grad (an ordinary tensor: it is
        made in inference mode and copied out, so that losses may save it for backward). FSDP2:
        theta_0 is copied into the local shards for the pass (every rank takes part)."""
        if self.sharding is not None:
            if self.theta0 is None:
                with torch.no_grad():
                    return self._denoise(noisy, t, cond)
            with torch.no_grad(), self.sharding.swapped(self.params, self.theta0, self._edited_rows()):
                return self._denoise(noisy, t, cond)
        with torch.inference_mode():
            out = self._denoise(noisy, t, cond, self._frozen_weights)
        return out.clone()

    def _edited_rows(self) -> list[Tensor | None]:
        """Per target param, the rows that can differ from theta_0: those MaskedAdamW ever updated
        (None, all rows, under a dense optimizer; Sharding.swapped widens them to all rows inside a
        whole-shard swap such as a finite-difference probe)."""
        try:
            opt = self.masked_optimizer
        except TypeError:
            return [None] * len(self.params)
        return [opt.edited_rows(q) for q in self.opt_params]

    def pred(self, noisy: Tensor, t: Tensor, cond: Tensor) -> Tensor:
        """The edited model's prediction, with grad to the target parameters."""
        return self._denoise(noisy, t, cond, self._amp_weights)

    # --------------------------------------------------------------- data-free

    @torch.no_grad()
    def sample_x0(self, emb: Tensor, n_per: int, batch_size: int = 256, bar=None) -> Tensor:
        """Data-free x0: (len(emb), n_per, C, H, W) sampled from the frozen model with CFG and the
        family's sampler (DDIM; flow-matching Euler for SD3), in the space the denoiser denoises
        (latents for a pipeline with a VAE)."""
        cfg = self.config
        guidance = cfg.x0_guidance
        if guidance is None:
            guidance = inspect.signature(type(self.pipe).__call__).parameters.get("guidance_scale")
            guidance = 7.5 if guidance is None or guidance.default is inspect.Parameter.empty else guidance.default
        sched = self.family.sampler()
        sched.set_timesteps(cfg.x0_steps, device=self.device)
        conds = emb.repeat_interleave(n_per, 0)
        x = torch.randn(conds.shape[0], *self.family.sample_shape(), generator=self.generator, device=self.device,
                        dtype=self.dtype) * getattr(sched, "init_noise_sigma", 1.0)
        out = []
        for i in range(0, conds.shape[0], batch_size):
            xb, cb = x[i:i + batch_size], conds[i:i + batch_size]
            ub = self.emb_uncond.expand(cb.shape[0], -1, -1)
            if i:  # stateful samplers (flow-matching Euler) count their steps: start each batch afresh
                sched.set_timesteps(cfg.x0_steps, device=self.device)
            for t in sched.timesteps:
                both = self.frozen_pred(torch.cat([xb, xb]), t.expand(2 * xb.shape[0]), torch.cat([ub, cb]))
                e_u, e_c = both.chunk(2)
                xb = sched.step(e_u + guidance * (e_c - e_u), t, xb).prev_sample
            out.append(xb)
            if bar is not None:
                bar.update(xb.shape[0])
        return torch.cat(out).view(emb.shape[0], n_per, *x.shape[1:])

    def prepare(self, progress: bool = False) -> None:
        """Sample and cache the data-free images (once; `progress` shows a bar per image batch on
        stderr); SalUn's static mask is computed here too."""
        if self.pools is not None:
            return
        from tqdm.auto import tqdm

        t0 = time.perf_counter()
        cfg = self.config
        wanted = self._pool_prompts()
        per = {name: cfg.x0_retain_per_prompt if name == "retain" else cfg.x0_per_prompt for name in wanted}
        total = sum(e.shape[0] * per[name] for name, e in wanted.items())
        with tqdm(total=total, desc="data-free images", unit="img", disable=not progress, leave=False) as bar:
            pools = {name: self.sample_x0(emb, per[name], bar=bar) for name, emb in wanted.items()}
        self.pools = pools
        if cfg.localization == "static":
            self.mask = self._salun_mask()
        self.pool_seconds = time.perf_counter() - t0
        self.seconds += self.pool_seconds

    def _pool_prompts(self) -> dict[str, Tensor]:
        """The prompts whose data-free images the run caches, by pool name: their embeddings."""
        cfg = self.config
        wanted = {}
        if cfg.x0_from in ("forget", "forget+anchor") or cfg.localization == "static" or cfg.adv_prefix:
            wanted["forget"] = self.emb_forget
        if cfg.x0_from in ("anchor", "forget+anchor"):
            wanted["anchor"] = self.emb_anchor
        if cfg.retain_objective != "none" and cfg.alpha > 0:
            wanted["retain"] = self.emb_retain
        return wanted

    def pool_shapes(self) -> dict[str, tuple[int, ...]]:
        """Shape of each cached pool of data-free images: (prompts, images per prompt, *latent shape)."""
        cfg = self.config
        return {name: (emb.shape[0], cfg.x0_retain_per_prompt if name == "retain" else cfg.x0_per_prompt,
                       *self.family.sample_shape())
                for name, emb in self._pool_prompts().items()}

    def _noisy(self, x0: Tensor, t: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
        n = x0.shape[0]
        if t is None:
            t = torch.randint(0, self.num_train_timesteps, (n,), generator=self.generator, device=self.device)
        noise = torch.randn(x0.shape, generator=self.generator, device=self.device, dtype=x0.dtype)
        if self.alphas_cumprod is None:
            return objectives.add_noise_flow(x0, noise, t, self.num_train_timesteps), t, noise
        return objectives.add_noise(x0, noise, t, self.alphas_cumprod), t, noise

    def _forget_batch(self, n: int) -> _Batch:
        cfg = self.config
        n_p, per = self.emb_forget.shape[0], cfg.x0_per_prompt
        i = torch.randint(0, n_p, (n,), generator=self.generator, device=self.device)
        j = torch.randint(0, per, (n,), generator=self.generator, device=self.device)
        sources = {"forget": ["forget"], "anchor": ["anchor"], "forget+anchor": ["forget", "anchor"]}[cfg.x0_from]
        x0 = self.pools[sources[0]][i, j]
        if len(sources) == 2:
            use_anchor = torch.rand(n, generator=self.generator, device=self.device) < 0.5
            x0 = torch.where(use_anchor.view(-1, 1, 1, 1), self.pools["anchor"][i, j], x0)
        noisy, t, noise = self._noisy(x0)
        cond = self.emb_forget[i]
        k = round(cfg.adv_fraction * n) if self.emb_forget_adv else 0
        if k:  # the last k rows see the forget prompt behind one of the adversary's prefixes
            adv = self.emb_forget_adv
            if len(adv) == 1:
                behind = adv[0][i[n - k:]]
            else:
                which = torch.randint(0, len(adv), (k,), generator=self.generator, device=self.device)
                behind = torch.stack(adv)[which, i[n - k:]]
            cond = torch.cat([cond[:n - k], behind])
        return _Batch(noisy, t, cond, x0, noise, self.emb_anchor[i])

    def adversary_shape(self) -> tuple[int, ...]:
        """Shape of one adversary's free tensor: (adv_prefix, sum of the text encoders' widths) for a
        soft prefix; (forget prompts, token positions, sum of widths) for token offsets."""
        from .softprompt import offsets_shape, widths

        if self.config.adv_mode == "tokens":
            return offsets_shape(self.family, len(self.prompts.forget))
        return (self.config.adv_prefix, sum(widths(self.family)))

    def refresh_adversary(self) -> None:
        """AdvUnlearn's inner loop, made cheap: a soft prefix shared by all forget prompts,
        warm-started across refreshes, takes `adv_steps` Adam steps that *minimize the current
        model's diffusion loss* on images of the concept (what an UnlearnDiffAtk attacker does);
        the forget prompts are then re-encoded behind it, and a fraction of every forget batch is
        mapped to the anchors from there. With `adv_population` > 1 there are that many prefixes
        from their own random starts (an attacker starts from a random one too), and each refresh
        steps the next in turn. With `adv_mode="tokens"` the adversary is instead an offset on
        every input token embedding of each forget prompt (zero at the start, so the prompts
        themselves: the embedding attack's search space), stepped on the prompts of each batch.
        Under torch.distributed the adversary's gradient is averaged, so every rank holds the same
        prefixes (offsets)."""
        from .softprompt import encode_with_offsets, encode_with_prefix, index_ids, prefixed_ids, random_prefix

        cfg, fam = self.config, self.family
        t0 = time.perf_counter()
        tokens = cfg.adv_mode == "tokens"
        encode = encode_with_offsets if tokens else encode_with_prefix
        if self._adv_ids is None:  # the prompts never change: tokenize them once
            self._adv_ids = fam.tokenize(self.prompts.forget) if tokens else prefixed_ids(fam, self.prompts.forget,
                                                                                           cfg.adv_prefix)
        ids = self._adv_ids
        which = self.adv_refreshes % cfg.adv_population
        if which == len(self.adv_prefixes):  # this adversary's first refresh
            if tokens:  # offsets start at the prompts themselves, as the embedding attack does
                self.adv_prefixes.append(torch.zeros(self.adversary_shape(), device=self.device))
            else:
                self.adv_prefixes.append(random_prefix(fam, cfg.adv_prefix, self.generator).to(self.device))
            distributed.broadcast_(self.adv_prefixes[-1:])  # ranks draw different starts: take rank 0's
            self.adv_optimizers.append(torch.optim.Adam([self.adv_prefixes[which]], lr=cfg.adv_lr))
            self.emb_forget_adv.append(None)
            if cfg.adv_retain_fraction > 0:
                self.emb_retain_adv.append(None)
        optimizer = self.adv_optimizers[which]
        pool = self.pools["forget"]
        prefix = self.adv_prefixes[which].requires_grad_(True)
        for _ in range(cfg.adv_steps):
            n = cfg.batch_size
            i = torch.randint(0, pool.shape[0], (n,), generator=self.generator, device=self.device)
            j = torch.randint(0, pool.shape[1], (n,), generator=self.generator, device=self.device)
            x0 = pool[i, j]
            noisy, t, noise = self._noisy(x0)
            target = objectives.diffusion_target(x0, noise, t, self.alphas_cumprod, self.prediction_type)
            cond = encode(fam, index_ids(ids, i), prefix[i] if tokens else prefix)
            (g,) = torch.autograd.grad(objectives.mse(self.pred(noisy, t, cond), target), [prefix])
            distributed.average_([g])
            if _all_finite([g]):
                prefix.grad = g
                optimizer.step()
            prefix.grad = None
        prefix.requires_grad_(False)
        with torch.no_grad():
            def behind(all_ids: list[Tensor]) -> Tensor:
                return torch.cat([encode(fam, index_ids(all_ids, slice(k, k + 256)),
                                         prefix[k:k + 256] if tokens else prefix)
                                  for k in range(0, all_ids[0].shape[0], 256)])

            self.emb_forget_adv[which] = behind(ids)
            if cfg.adv_retain_fraction > 0:
                if self._adv_retain_ids is None:
                    self._adv_retain_ids = prefixed_ids(fam, self.prompts.retain, cfg.adv_prefix)
                self.emb_retain_adv[which] = behind(self._adv_retain_ids)
        self.adv_refreshes += 1
        self.adv_seconds += time.perf_counter() - t0

    def _retain_batch(self, n: int) -> _Batch:
        pool = self.pools["retain"]
        i = torch.randint(0, pool.shape[0], (n,), generator=self.generator, device=self.device)
        k = round(self.config.retain_neighbors * n) if self._neighbors.numel() else 0
        if k:  # the first k draws come from the concept's neighbours (A without B, B without A)
            pick = torch.randint(0, self._neighbors.numel(), (k,), generator=self.generator, device=self.device)
            i[:k] = self._neighbors[pick]
        j = torch.randint(0, pool.shape[1], (n,), generator=self.generator, device=self.device)
        x0 = pool[i, j]
        noisy, t, noise = self._noisy(x0)
        cond = self.emb_retain[i]
        k = round(self.config.adv_retain_fraction * n) if self.emb_retain_adv else 0
        if k:  # the last k rows: their retain prompts behind one of the adversary's prefixes
            which = torch.randint(0, len(self.emb_retain_adv), (k,), generator=self.generator, device=self.device)
            cond = torch.cat([cond[:n - k], torch.stack(self.emb_retain_adv)[which, i[n - k:]]])
        return _Batch(noisy, t, cond, x0, noise)

    def _salun_mask(self) -> list[Tensor]:
        """SalUn: sum the gradient of the diffusion loss on the forget data over one pass of the
        cached forget images, then keep the top `mask_fraction` of |sum| over all weights."""
        pool = self.pools["forget"]
        x0_all = pool.flatten(0, 1)
        cond_all = self.emb_forget.repeat_interleave(pool.shape[1], 0)
        sums = [torch.zeros_like(p) for p in self.params]
        bs = self.config.batch_size
        for k in range(0, x0_all.shape[0], bs):
            x0 = x0_all[k:k + bs]
            noisy, t, noise = self._noisy(x0)
            target = objectives.diffusion_target(x0, noise, t, self.alphas_cumprod, self.prediction_type)
            loss = objectives.mse(self.pred(noisy, t, cond_all[k:k + bs]), target)
            for s, g in zip(sums, torch.autograd.grad(loss, self.params, allow_unused=True)):
                if g is not None:
                    s.add_(g)
        return static_mask(sums, self.config.mask_fraction)

    # ------------------------------------------------------------------ losses

    def _double_backward_now(self) -> bool:
        cfg, s = self.config, self.step_count
        return ((cfg.hessian == "hvp" and s % cfg.hvp_interval == 0 and s > 0)
                or (cfg.hessian == "diag" and s % cfg.diag_interval == 0))

    def forget_loss(self, noisy: Tensor, timesteps: Tensor, cond: Tensor, anchor_cond: Tensor | None = None,
                    target: Tensor | None = None) -> Tensor:
        """The forget loss of a batch you provide.

        noisy: (N, C, H, W) noised images/latents; timesteps: (N,) int64; cond: (N, L, D) embeddings
        of the forget prompts; anchor_cond: (N, L, D) embeddings of their anchors (objectives
        "anchor" and "pseudo"; the esd objective uses the empty prompt). `target` overrides the
        regression target (computed without grad otherwise). Returns a float32 scalar, or None for
        an empty batch (N = 0: a batch of yours without forget examples; :meth:`update` skips it)."""
        if noisy.shape[0] == 0:
            return None
        if target is None:
            target = self.forget_target(noisy, timesteps, cond, anchor_cond)
        return objectives.mse(self.pred(noisy, timesteps, cond), target)

    def forget_target(self, noisy: Tensor, timesteps: Tensor, cond: Tensor, anchor_cond: Tensor | None) -> Tensor:
        obj = self.config.forget_objective
        if obj == "esd":
            uncond = self.emb_uncond.expand(noisy.shape[0], -1, -1)
            e_u, e_c = self.frozen_pred(torch.cat([noisy, noisy]), torch.cat([timesteps, timesteps]),
                                        torch.cat([uncond, cond])).chunk(2)
            return objectives.negative_guidance(e_u, e_c, self.config.eta)
        if anchor_cond is None:
            raise ValueError(f"the {obj!r} forget objective needs anchor_cond (embeddings of the anchor prompts)")
        if obj == "anchor":
            return self.frozen_pred(noisy, timesteps, anchor_cond)
        with torch.no_grad():  # SalUn: the current model on the pseudo (anchor) prompt, detached
            return self.pred(noisy, timesteps, anchor_cond)

    def retain_loss(self, noisy: Tensor, timesteps: Tensor, cond: Tensor, target: Tensor | None = None,
                    x0: Tensor | None = None, noise: Tensor | None = None) -> Tensor:
        """The retain loss of a batch you provide: self-distillation against the frozen model
        ("distill"), or the ordinary diffusion loss ("diffusion", needs x0 and noise). On steps
        that differentiate it twice (Hessian term), its forward runs under the math attention backend.
        None for an empty batch (:meth:`update` then steps without the retain term)."""
        if noisy.shape[0] == 0:
            return None
        if target is None:
            if self.config.retain_objective == "diffusion":
                if x0 is None or noise is None:
                    raise ValueError("the diffusion retain objective needs x0 and noise")
                target = objectives.diffusion_target(x0, noise, timesteps, self.alphas_cumprod, self.prediction_type)
            else:
                target = self.frozen_pred(noisy, timesteps, cond)
        if self._double_backward_now() and self.sharding is None:
            weights = self._amp_weights if self._leaves is None else {**(self._amp_weights or {}), **self._leaves}
            with double_backward_attention():
                return objectives.mse(self._denoise(noisy, timesteps, cond, weights, eager=True), target)
        return objectives.mse(self.pred(noisy, timesteps, cond), target)

    # ------------------------------------------------------------------ update

    def _grads(self, loss: Tensor) -> list[Tensor]:
        """Gradient of `loss` w.r.t. the target parameters (float16: through the loss scale, returned
        unscaled in float32). FSDP2: this rank's rows of the mean over the ranks (one backward)."""
        if self.sharding is not None:
            return Sharding.grads(loss, self._dparams)
        if self.loss_scale is not None:
            gs = torch.autograd.grad(loss * self.loss_scale, self.params, allow_unused=True)
            return [g.float() / self.loss_scale if g is not None else torch.zeros_like(p, dtype=torch.float32)
                    for g, p in zip(gs, self.params)]
        gs = torch.autograd.grad(loss, self.params, allow_unused=True)
        return [g if g is not None else torch.zeros_like(p) for g, p in zip(gs, self.params)]

    def _grad_and_hvp(self, loss: Tensor, keep=None, wrt=None) -> tuple[list[Tensor], list[Tensor]]:
        """Retain gradient and H_r Delta (Delta = current minus original weights, from the float32
        masters when there are any), unscaled like :meth:`_grads`, both passed through `keep`;
        differentiated w.r.t. `wrt` (:meth:`_hessian_leaves`; default the target params)."""
        keep = keep or list
        delta = [q.detach() - p0.to(q.dtype) for q, p0 in zip(self.opt_params, self.theta0)]
        g_r, (hv,) = grad_and_hvps(scaled(loss, self.loss_scale), wrt or self.params, [delta], keep)
        if self.loss_scale is None:
            return g_r, keep(hv)
        return [g.float() / self.loss_scale for g in g_r], [h.float() / self.loss_scale for h in keep(hv)]

    @contextlib.contextmanager
    def _hessian_leaves(self, on: bool):
        """While active (and `on`, under amp), the retain pass of a Hessian step runs on leaf copies
        of the castable target params in the amp dtype; yields what to differentiate w.r.t. (one
        tensor per target param: its leaf, or the param itself). Autocast would cast those params
        to the same values on entry to the same ops, so the loss, the gradient and the Hessian
        products are the ones of the float32 params (a cast's backward only widens them), held in
        half precision: the full-size gradient and H z of the Hessian step take half the memory."""
        if not (on and self._half_hessian and any(self._castable)):
            yield self.params
            return
        wrt = [p.detach().to(self.amp_dtype).requires_grad_(True) if c else p
               for p, c in zip(self.params, self._castable)]
        self._leaves = {n: w for n, w, c in zip(self._names, wrt, self._castable) if c}
        try:
            yield wrt
        finally:
            self._leaves = None

    def _finite_difference_probes(self, retain_loss: Tensor, retain_fn, keep):
        """FSDP2's Hutchinson probes: (retain gradient through `keep`, [(z, H z)]) with
        H z = (g(theta + eps z) - g(theta)) / eps, eps = config.hessian_fd_eps, each z drawn on this
        rank's rows (the ranks' draws make one probe of the whole weights) and the retain loss
        recomputed by `retain_fn` at the shifted weights; the weights are restored bit for bit."""
        if retain_fn is None:
            raise ValueError(SHARDED_HESSIAN_NEEDS_FN)
        eps = self.config.hessian_fd_eps
        g0 = self._grads(retain_loss)
        pending = []
        for z in self.hutchinson.draw(self.config.diag_samples):
            # a generator: one shifted tensor at a time, not a second full copy beside swapped()'s own
            with self.sharding.swapped(self.params, (p + eps * z.tensor(i, p.dtype) for i, p in enumerate(self.params))):
                g1 = self._grads(retain_fn())
            pending.append((z, [(a - b).div_(eps) for a, b in zip(g1, g0)]))
            del g1
        return (g0 if keep is None else keep(g0)), pending

    def _row_keeper(self, rows: list[Tensor] | None):
        """None without selected rows, else a function taking a gradient set (one tensor per target
        param) to its selected rows: MaskedAdamW reads nothing else, so a step past localization
        holds its gradients (forget, retain, H_r Delta) on those rows only, not three full sets."""
        if rows is None:
            return None
        per_param = self._param_rows(rows)
        return lambda gs: [g.index_select(0, r) for g, r in zip(gs, per_param)]

    def _param_rows(self, rows: list[Tensor]) -> list[Tensor]:
        """The selected rows of each target param (a target's weight and bias share its rows)."""
        return [rows[k] for k in self._target_of]

    def accumulate(self, forget_loss: Tensor | None, retain_loss: Tensor | None = None) -> None:
        """Gradient accumulation: fold one micro-batch's losses into the current step. Call it for
        every micro-batch but the last and :meth:`update` with the last; localization, the
        Hessian term and the optimizer step then run once, on the mean forget and retain gradients
        (and Hessian products) over the micro-batches, exactly as :meth:`update` on the mean
        losses would, without holding every micro-batch's graph. Under the diag Hessian each
        retain micro-batch folds its own probes into the running estimate."""
        cfg = self.config
        _check_loss("forget_loss", forget_loss)
        _check_loss("retain_loss", retain_loss)
        acc = self._acc = self._acc or _Accumulated()
        if forget_loss is not None:
            acc.add_forget(forget_loss.detach(), self._grads(forget_loss))
        if retain_loss is not None and cfg.alpha > 0:
            g_r, hv, before = self._retain_terms(retain_loss, keep_before=acc.diag_before is None)
            acc.diag_before = acc.diag_before or before  # the state before the step's first probes
            acc.add_retain(retain_loss.detach(), g_r, hv)

    def _retain_terms(self, retain_loss: Tensor, keep_before: bool = True, keep=None, wrt=None):
        """(retain gradient, H_r Delta or None, Hutchinson state before new probes or None) of one
        retain loss: the hvp and diag Hessian terms on the steps that differentiate twice. `keep`
        (see :meth:`_row_keeper`) maps the gradient and H_r Delta to what is returned of them."""
        cfg = self.config
        if not self._double_backward_now() or cfg.hessian == "none":
            g_r = self._grads(retain_loss)
            return (g_r if keep is None else keep(g_r)), None, None
        if self.sharding is not None:
            raise ValueError(SHARDED_HESSIAN_NEEDS_FN)
        # the backward passes run under the forward's attention backend too: gradient checkpointing
        # recomputes the forward there
        with double_backward_attention():
            if cfg.hessian == "hvp":
                g_r, hv = self._grad_and_hvp(retain_loss, keep, wrt)
                return g_r, hv, None
            before = ([d.clone() for d in self.hutchinson.diags], self.hutchinson.count) if keep_before else None
            return self.hutchinson.update(retain_loss, cfg.diag_samples, self.loss_scale), None, before

    def update(self, forget_loss: Tensor | None, retain_loss: Tensor | Callable[[], Tensor | None] | None = None
               ) -> dict:
        """Localization + Hessian term + optimizer step for losses you computed (with
        :meth:`forget_loss` / :meth:`retain_loss`). Returns the step's stats (see :meth:`step`).
        A forget loss of None (a batch without forget examples) skips the step: there is nothing to
        localize on (under torch.distributed, on every rank if any rank has none).

        `retain_loss` may be a function returning it: it is then called once the forget gradient is
        taken, so the forget pass's graph is freed before the retain pass builds its own (on
        Hessian steps, the largest of the run)."""
        cfg = self.config
        _check_loss("forget_loss", forget_loss)
        if not callable(retain_loss):
            _check_loss("retain_loss", retain_loss)
        t0 = time.perf_counter()
        pre = None
        retain_fn, t_retain_forward = (retain_loss, 0.0) if callable(retain_loss) else (None, 0.0)
        if retain_fn is not None:
            retain_loss = None
        if self._acc is not None and retain_fn is not None:
            retain_loss, retain_fn = retain_fn(), None
        if self._acc is not None:  # the last micro-batch of an accumulated step
            self.accumulate(forget_loss, retain_loss)
            pre, self._acc = self._acc.mean(), None
            forget_loss, retain_loss = pre.loss_f, pre.loss_r
        no_forget = forget_loss is None
        if no_forget:
            forget_loss = torch.zeros((), device=self.device)
            g_f = [torch.zeros_like(p) for p in self.params]
        elif pre is not None:
            g_f = pre.g_f
        else:
            g_f = self._grads(forget_loss)
        # data parallel: every rank localizes on the same (averaged) gradient, so all select the same rows
        self._average(g_f)
        # a non-finite loss or gradient on any rank skips the step on all ranks: weights, optimizer,
        # localization and Hessian state stay as they were
        skip = distributed.any_rank(no_forget or not _all_finite([forget_loss.detach(), *g_f]))
        reason = SKIP_NO_FORGET if no_forget else self._skip_reason(forget_loss) if skip else None
        t1 = time.perf_counter()
        rows = None
        prev_rows = self.localizer.rows if self.localizer is not None else None
        if self.localizer is not None and not skip:
            rows = self.localizer(self.step_count, [g_f[i] for i in self._weight_pos])
            if self.sharding is None:  # a sharded localizer checks the rows of the whole layers itself
                distributed.check_same_rows(rows, self.step_count)
        keep = self._row_keeper(rows)  # from here on, gradients are held on the selected rows only
        if keep is not None:
            g_f = keep(g_f)
        t2 = time.perf_counter()
        hessian_now = not skip and cfg.alpha > 0 and cfg.hessian != "none" and self._double_backward_now()
        # a retain pass this step computes (not one computed before, nor in parts) may run on half-precision leaves
        leaves = contextlib.ExitStack()
        wrt = leaves.enter_context(self._hessian_leaves(
            retain_fn is not None and hessian_now and not isinstance(retain_fn, _RetainParts)))
        if retain_fn is not None:
            if isinstance(retain_fn, _RetainParts) and hessian_now:
                retain_loss = retain_fn  # computed part by part with its Hessian terms below
            else:
                retain_loss = retain_fn()
                t_retain_forward = time.perf_counter() - t2
        grads = g_f
        diag_before = pre.diag_before if pre is not None else None  # Hutchinson state to restore on a skip
        if retain_loss is not None and cfg.alpha > 0 and not skip:
            pending = None  # Hutchinson probes of this step, folded in only if the step is kept
            if pre is not None:
                g_r, hv, diag_before = pre.g_r, pre.hv, pre.diag_before
                if keep is not None:
                    g_r, hv = keep(g_r), (keep(hv) if hv is not None else None)
            elif cfg.hessian == "diag" and self._double_backward_now() and self.sharding is not None:
                g_r, pending = self._finite_difference_probes(retain_loss, retain_fn, keep)
                hv = None
            elif cfg.hessian == "diag" and self._double_backward_now():
                with double_backward_attention():
                    g_r, pending = self.hutchinson.probe(_differentiated(retain_loss), cfg.diag_samples,
                                                         self.loss_scale, keep, wrt=wrt)
                hv = None
            else:
                g_r, hv, diag_before = self._retain_terms(_differentiated(retain_loss), keep=keep, wrt=wrt)
            leaves.close()
            g_r = [g.float() for g in g_r]
            hv = [h.float() for h in hv] if hv is not None else None
            if isinstance(retain_loss, _RetainParts):
                retain_loss = retain_loss.total()
            if hv is not None:
                self._average(hv)
            if diag_before is not None:
                self._average(self.hutchinson.diags)
            self._average(g_r)
            fresh = [*g_r, *(hv or []), *(self.hutchinson.diags if diag_before is not None else []),
                     *(h for _, hz in pending or [] for h in hz)]
            skip = distributed.any_rank(not _all_finite([retain_loss.detach(), *fresh]))
            if skip:
                reason = self._skip_reason(retain_loss)
                if self.localizer is not None:
                    self.localizer.rows = prev_rows
                rows = None
            else:
                if pending is not None:
                    self.hutchinson.fold(pending)
                    self._average(self.hutchinson.diags)
                if diag_before is not None or pending is not None:
                    self._set_diag_penalty()
                # in place: a dense step holds at most two gradient sets (three were 10 GB for SalUn on SD-1.5)
                grads = [gf.add_(gr, alpha=cfg.alpha) for gf, gr in zip(g_f, g_r)]
                if hv is not None:
                    grads = [g.add_(h, alpha=cfg.lam) for g, h in zip(grads, hv)]
                g_r = hv = fresh = pre = pending = None
        leaves.close()
        t3 = time.perf_counter()
        if skip and diag_before is not None:  # a skipped step leaves no Hessian probes behind
            for d, old in zip(self.hutchinson.diags, diag_before[0]):
                d.copy_(old)
            self.hutchinson.count = diag_before[1]
        if not skip:
            if keep is not None:  # the selected rows' gradients into otherwise zero gradients
                for p, g, r in zip(self.opt_params, grads, self._param_rows(rows)):
                    p.grad = torch.zeros_like(p).index_copy_(0, r, g.to(p.dtype))
            else:
                for p, g in zip(self.opt_params, grads):
                    p.grad = g.to(p.dtype)
            snapshot = None
            if rows is not None:
                opt = self._opt
                self.masked_optimizer.set_rows({opt[id(p)]: r for t, r in zip(self.targets, rows) for p in t.params})
                snapshot = self.masked_optimizer.snapshot_rows()
            else:
                if self.hutchinson is not None and self.hutchinson.count > 0:
                    self._diag_penalty_dense()
                if self.mask is not None:
                    for p, m in zip(self.opt_params, self.mask):
                        p.grad.mul_(m)
            self.optimizer.step()
            for p in self.opt_params:
                p.grad = None
            if self.master is not None:
                self._refresh_from_master(rows)
            if not self._updated_rows_finite(rows):
                self._undo_update(rows, snapshot)
                if self.localizer is not None:
                    self.localizer.rows = prev_rows
                skip, reason, rows = True, SKIP_WEIGHTS, None
        if self.loss_scale is not None:
            self._update_loss_scale(skip and reason != SKIP_WEIGHTS)
        if skip:
            self.skipped_steps += 1
            self.skipped_by_reason[reason] = self.skipped_by_reason.get(reason, 0) + 1
        t4 = time.perf_counter()
        n_sel = (0 if skip else self.total_rows if rows is None
                 else self.sharding.selected if self.sharding is not None else sum(r.numel() for r in rows))
        self.selected_rows = rows if rows is not None else []
        stats = {"step": self.step_count, "loss_forget": None if no_forget else float(forget_loss.detach()),
                 "loss_retain": float(retain_loss.detach()) if retain_loss is not None else None,
                 "selected_rows": n_sel, "selected_fraction": n_sel / max(1, self.total_rows), "skipped": skip,
                 **({"skip_reason": reason} if skip else {}),
                 **({"loss_scale": self.loss_scale} if self.loss_scale is not None else {}),
                 "time_forget_backward": t1 - t0, "time_localize": t2 - t1,
                 "time_retain_backward": t3 - t2 - t_retain_forward, "time_retain_forward": t_retain_forward,
                 "time_optimizer": t4 - t3}
        self.step_count += 1
        return stats

    def _skip_reason(self, loss: Tensor) -> str:
        """Why a step with a non-finite loss or gradient is skipped: under a float16 loss scale a
        finite loss with non-finite gradients is an overflow the lowered scale fixes."""
        if self.loss_scale is not None and bool(torch.isfinite(loss.detach()).all()):
            return SKIP_OVERFLOW
        return SKIP_NON_FINITE

    @torch.no_grad()
    def _updated_rows_finite(self, rows: list[Tensor] | None) -> bool:
        """Whether the weights this step updated are finite: the selected rows (of the float32
        masters and the model's half-precision copies), every target weight after a dense step.
        One host sync; all ranks agree."""
        if rows is not None:
            flags = [self.masked_optimizer.set_rows_finite()]
            if self.master is not None:
                flags += [torch.isfinite(p.index_select(0, r)).all()
                          for t, r in zip(self.targets, rows) if r.numel() for p in t.params]
            ok = bool(torch.stack(flags).all())
        else:
            ok = _all_finite([*self.opt_params, *(self.params if self.master is not None else [])])
        return not distributed.any_rank(not ok)

    @torch.no_grad()
    def _undo_update(self, rows: list[Tensor] | None, snapshot: list | None) -> None:
        """Roll back a step whose update made weights non-finite: the selected rows and their
        optimizer state as they were (a copy the size of the selection, taken before the step). A
        dense optimizer's state is the size of the model and is not copied every step: its run stops."""
        if snapshot is None:
            raise NonFiniteUpdate(f"step {self.step_count} made target weights non-finite (NaN or Inf) with a dense "
                                  f"optimizer, which cannot be rolled back; the run stops (lower lr, now "
                                  f"{self.config.lr:g})")
        self.masked_optimizer.undo_step(snapshot)
        if self.master is not None:
            self._refresh_from_master(rows)

    @torch.no_grad()
    def _refresh_from_master(self, rows: list[Tensor] | None) -> None:
        """Write the float32 masters into the model's half-precision target weights: the selected
        rows (all rows after a dense step)."""
        if rows is None:
            for p, q in zip(self.params, self.master):
                p.copy_(q)
            return
        opt = self._opt
        for t, r in zip(self.targets, rows):
            if r.numel():
                for p in t.params:
                    p.index_copy_(0, r, opt[id(p)].index_select(0, r).to(p.dtype))

    def _update_loss_scale(self, overflow: bool) -> None:
        if overflow:
            self.loss_scale, self._good_steps = max(1.0, self.loss_scale / 2), 0
        else:
            self._good_steps += 1
            if self._good_steps % LOSS_SCALE_GROWTH == 0:
                self.loss_scale = min(LOSS_SCALE_INIT * 2 ** 8, self.loss_scale * 2)

    def _set_diag_penalty(self) -> None:
        """MaskedAdamW's fused penalty reads the running estimate itself (its kernels clamp h at 0)."""
        if self.localizer is not None:
            h = self.hutchinson.diags
            self.masked_optimizer.set_penalty({p: (hp, p0) for p, hp, p0 in zip(self.opt_params, h, self.theta0)},
                                       self.config.lam)

    def _diag_penalty_dense(self) -> None:
        """Dense optimizers have no fused penalty: add lam * max(h, 0) * Delta to the gradients."""
        for p, hp, p0 in zip(self.opt_params, self.hutchinson.diags, self.theta0):
            p.grad.add_(self.config.lam * hp.clamp(min=0).to(p.dtype) * (p.detach() - p0.to(p.dtype)))

    # -------------------------------------------------------------------- step

    def step(self) -> dict:
        """One unlearning step on data-free batches. Returns losses, selected rows and timings:
        step, loss_forget, loss_retain, selected_rows, selected_fraction, seconds and time_* phases."""
        if self.unsharded:
            raise RuntimeError("this FSDP2 run ended with unshard(): its denoiser was gathered for saving")
        self.prepare()
        cfg = self.config
        self.finalized = None
        t0 = time.perf_counter()
        if cfg.adv_prefix and self.step_count % cfg.adv_interval == 0:
            self.refresh_adversary()
        t_adv = time.perf_counter() - t0
        fb = self._forget_batch(cfg.batch_size)
        use_retain = cfg.retain_objective != "none" and cfg.alpha > 0
        rb = self._retain_batch(cfg.retain_batch_size) if use_retain else None
        # one frozen forward for the anchor targets of the forget batch and the distillation
        # targets of the retain batch
        f_target = r_target = None
        if cfg.forget_objective == "anchor" and use_retain and cfg.retain_objective == "distill":
            both = self.frozen_pred(torch.cat([fb.noisy, rb.noisy]), torch.cat([fb.t, rb.t]),
                                    torch.cat([fb.anchor, rb.cond]))
            f_target, r_target = both.split([fb.noisy.shape[0], rb.noisy.shape[0]])
        loss_f = self.forget_loss(fb.noisy, fb.t, fb.cond, fb.anchor, target=f_target)
        # the retain pass runs once the forget gradient is taken and its graph freed; on steps that
        # differentiate it twice, a micro-batch at a time
        loss_r = None
        if rb:
            def part(sl: slice = slice(None)) -> Tensor:
                return self.retain_loss(rb.noisy[sl], rb.t[sl], rb.cond[sl], target=None if r_target is None
                                        else r_target[sl], x0=rb.x0[sl], noise=rb.noise[sl])
            n, size = rb.noisy.shape[0], cfg.hessian_micro_batch
            loss_r = (_RetainParts(part, n, size) if 0 < size < n and self._double_backward_now() and self.sharding is None
                      else part)
        t1 = time.perf_counter()
        stats = self.update(loss_f, loss_r)
        stats["time_forward"] = t1 - t0 - t_adv + stats.pop("time_retain_forward")
        stats["time_adversary"] = t_adv
        stats["seconds"] = time.perf_counter() - t0
        self.seconds += stats["seconds"]
        self.history.steps.append(stats)
        return stats

    def run(self, steps: int | None = None, progress: bool = False, eval_fn=None, eval_interval: int = 0,
            checkpoint_dir: str | None = None, checkpoint_every: int = 0,
            overwrite_checkpoint: bool = False, log_fn=None) -> list[dict]:
        """Run `steps` steps (default config.steps). With `eval_fn(unlearner) -> dict` and
        `eval_interval` > 0, evaluate every eval_interval steps and at the end (history.evals).
        With `log_fn(kind, step, values)`, every step's stats (kind "step") and every evaluation
        (kind "eval") are also handed to it (e.g. :class:`trust_fast.tblog.TensorBoardLog`).
        With `checkpoint_dir` and `checkpoint_every` > 0, write a checkpoint every that many steps
        (counted from step 0, so a resumed run keeps the same cadence; see trust_fast.checkpoint).
        The directory is claimed for the run (trust_fast.io.claim_output): a checkpoint of another
        run in it is replaced only with `overwrite_checkpoint` or when this run resumed from it."""
        from tqdm.auto import tqdm

        steps = self.config.steps if steps is None else steps
        for name, value in (("steps", steps), ("eval_interval", eval_interval), ("checkpoint_every", checkpoint_every)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"run: {name} must be an int >= 0, got {value!r}")
        if checkpoint_every > 0 and checkpoint_dir is None:
            raise ValueError("run: checkpoint_every > 0 needs a checkpoint_dir to write the checkpoints to")
        end = self.step_count + steps
        with contextlib.ExitStack() as stack:
            if checkpoint_dir is not None and checkpoint_every > 0:
                from .checkpoint import claim_checkpoint_dir

                stack.enter_context(claim_checkpoint_dir(
                    checkpoint_dir, overwrite=overwrite_checkpoint or self.resumed_from == os.path.realpath(checkpoint_dir),
                    inputs=[("source model", self.source_path())]))
            self.prepare(progress)
            bar = tqdm(range(steps), desc=f"{self.config.method} {self.concept or ''}".strip(), disable=not progress)
            out = []
            for _ in bar:
                s = self.step()
                out.append(s)
                bar.set_postfix(forget=f"{s['loss_forget']:.4f}", rows=s["selected_rows"])
                done = self.step_count
                if log_fn is not None:
                    log_fn("step", done, s)
                if eval_fn is not None and eval_interval > 0 and (done % eval_interval == 0 or done == end):
                    self.history.evals.append({"step": done, **eval_fn(self)})
                    if log_fn is not None:
                        log_fn("eval", done, self.history.evals[-1])
                if checkpoint_dir is not None and checkpoint_every > 0 and done % checkpoint_every == 0:
                    self._checkpoint(checkpoint_dir, done)
        if self.step_count >= self.config.steps:
            self.finalize()
        return out

    def _checkpoint(self, directory: str, step: int) -> None:
        """A checkpoint that cannot be written (disk full, directory gone) costs the run nothing but
        that checkpoint: warn in one line and try again at the next interval."""
        from .checkpoint import save_checkpoint

        try:
            save_checkpoint(self, directory)
        except OSError as e:
            self.failed_checkpoints.append(step)
            warnings.warn(f"could not write the checkpoint of step {step} to {directory!r} "
                          f"({e.strerror or e}); training goes on, the next interval tries again", stacklevel=2)

    @torch.no_grad()
    def finalize(self) -> dict:
        """Consolidate the edit at the end of a run: every row that dynamic localization updated in
        fewer than ``config.min_row_updates`` steps goes back to its original weights (bias
        included). Such rows were salient once or twice and carry little of the erasure; dropping
        them halves the rows an unlearned model differs in (so the sparse patch) without a measured
        cost: on "circle", 612 -> 320 rows with UA and retain accuracy unchanged. Called by
        :meth:`run` when the configured steps are done and by :meth:`save`; idempotent until the
        next step. A no-op for dense methods (SalUn, ESD) and for min_row_updates 1."""
        if self.finalized is not None:
            return self.finalized
        changed = reset = 0
        m = self.config.min_row_updates
        if self.localizer is not None and self.theta0 is not None:
            pos = {id(p): k for k, p in enumerate(self.params)}
            for t in self.targets:
                rows, counts = self.masked_optimizer.row_updates(self.opt_params[pos[id(t.weight)]])
                drop = rows[counts < m]
                changed += rows.numel()
                reset += drop.numel()
                if drop.numel():
                    for p in t.params:
                        p[drop] = self.theta0[pos[id(p)]][drop].to(p.dtype)
                        if self.master is not None:
                            self.master[pos[id(p)]][drop] = self.theta0[pos[id(p)]][drop].float()
        self.finalized = {"rows_ever_updated": changed, "rows_reset": reset, "rows_kept": changed - reset,
                          "min_row_updates": m}
        return self.finalized

    # ------------------------------------------------------------------ output

    def state_bytes(self) -> dict:
        """Memory the engine holds beyond the model: optimizer state, frozen target copies,
        Hessian diagonal, cached images, static mask."""
        opt = self.optimizer
        if hasattr(opt, "state_bytes"):
            opt_bytes = opt.state_bytes()
        else:
            opt_bytes = sum(v.numel() * v.element_size() for st in opt.state.values() for v in st.values()
                            if isinstance(v, Tensor))
        nbytes = lambda ts: sum(t.numel() * t.element_size() for t in ts)  # noqa: E731
        return {"optimizer_state_bytes": opt_bytes,
                "frozen_copy_bytes": nbytes(self.theta0 or []),
                "amp_weights_bytes": nbytes((self._amp_weights or {}).values()),
                "hessian_bytes": self.hutchinson.state_bytes() if self.hutchinson else 0,
                "x0_cache_bytes": nbytes((self.pools or {}).values()),
                "mask_bytes": nbytes(self.mask or [])}

    def report(self) -> dict:
        """Summary of the run so far (the CLI adds the evaluation figures)."""
        h = self.history.steps
        mean_rows = sum(s["selected_rows"] for s in h) / len(h) if h else 0.0
        return {"concept": str(self.concept) if self.concept is not None else None,
                "kind": self.concept.kind if self.concept is not None else None,
                "method": self.config.method, "steps": self.step_count,
                "applied_steps": self.step_count - self.skipped_steps, "skipped_steps": self.skipped_steps,
                "skipped_by_reason": dict(self.skipped_by_reason), "changed_rows": self.changed_rows(),
                "unchanged": self.unchanged(),
                "failed_checkpoints": self.failed_checkpoints,
                "seconds": self.seconds,
                "x0_sampling_seconds": self.pool_seconds, "adversary_seconds": self.adv_seconds,
                "trainable_params": self.trainable_params,
                "target_modules": len(self.targets), "target_patterns": list(self.target_patterns),
                "target_rows": self.total_rows,
                "mean_selected_rows": mean_rows, "mean_selected_fraction": mean_rows / max(1, self.total_rows),
                "finalized": self.finalized,
                "mask_fraction": (sum(float(m.sum()) for m in self.mask) / sum(m.numel() for m in self.mask)
                                  if self.mask else None),
                **self.state_bytes(),
                "device": str(self.device), "threads": torch.get_num_threads(),
                # FSDP2: ranks the targets are sharded over (the *_bytes above are this rank's share)
                "fsdp_shards": self.sharding.world if self.sharding is not None else None,
                "config": asdict(self.config),
                "history": h, "evals": self.history.evals}

    @torch.no_grad()
    def changed_rows(self) -> int | None:
        """Rows of the target modules (a weight row with its bias entry) that differ from the
        original model now; None without a frozen copy to compare with (SalUn) or when sharded."""
        if self.theta0 is None or self.sharding is not None:
            return None
        flags = []
        for t in self.targets:
            changed = [(p != p0).reshape(p.shape[0], -1).any(dim=1) for p, p0 in zip(self.params, self.theta0)
                       if any(p is q for q in t.params)]
            flags.append(torch.stack(changed).any(dim=0).sum())
        return int(torch.stack(flags).sum()) if flags else 0

    def base_digest(self) -> str | None:
        """SHA-256 of the target weights the run started from (its frozen copy, or the digest taken
        at the start when it keeps none); None under FSDP2. A checkpoint resumes only on this base."""
        return distributed.weights_digest(self.theta0) if self.theta0 is not None else self._start_digest

    def diverged(self) -> str | None:
        """Why the run's weights must not be saved, or None: more than half of its steps were skipped
        for non-finite losses, gradients or weights (an lr too large, a poisoned batch source)."""
        bad = sum(self.skipped_by_reason.get(r, 0) for r in DIVERGING)
        if self.step_count and 2 * bad > self.step_count:
            return (f"the run diverged: {bad} of its {self.step_count} steps were skipped for non-finite values "
                    f"({', '.join(f'{r}: {n}' for r, n in self.skipped_by_reason.items())}); lower lr "
                    f"(now {self.config.lr:g})")
        return None

    def unchanged(self) -> str | None:
        """Why the model would be saved as it was loaded, or None when the run changed a weight."""
        if self.step_count == 0:
            return "no step was run"
        changed = self.changed_rows()
        if changed is None and self._start_digest is not None:
            changed = int(distributed.weights_digest(self.params) != self._start_digest)
        if changed != 0:
            return None
        fin = self.finalized or {}
        if self.skipped_steps == self.step_count:
            return f"every one of its {self.step_count} steps was skipped ({', '.join(self.skipped_by_reason)})"
        if not any(s.get("selected_rows") for s in self.history.steps) and self.history.steps:
            return (f"no row was selected at any of its {len(self.history.steps)} steps (xi={self.config.xi:g} is above "
                    "every saliency z-score: lower xi)")
        if fin.get("rows_ever_updated") and not fin.get("rows_kept"):
            return (f"no row was updated {fin['min_row_updates']} times, so finalize returned every row to its "
                    "original weights: run more steps or lower min_row_updates")
        return "no weight differs from the original model"

    def source_path(self) -> str | None:
        """The directory the pipeline was loaded from, if any (an input no output may touch)."""
        src = getattr(self.pipe, "name_or_path", None) or self.pipe.config.get("_name_or_path")
        return src if src and os.path.isdir(src) else None

    @torch.no_grad()
    def full_params(self) -> list[Tensor]:
        """The target parameters, whole and detached (FSDP2: gathered from every rank; every rank
        must call it)."""
        if self.sharding is None:
            return [p.detach() for p in self.params]
        return [p.full_tensor().detach() for p in self._dparams]

    def unshard(self) -> None:
        """FSDP2: end the run by finalizing and gathering the edited denoiser into a plain module
        that replaces the sharded one in rank 0's pipeline (evaluate it, save it there; the other
        ranks keep theirs). Every rank must call it; training cannot go on after it. A no-op
        without sharding or when done already."""
        if self.sharding is None or self.unsharded:
            return
        from .fsdp import gather_module

        self.finalize()
        plain = gather_module(self.unet)
        if plain is not None:
            name = next(k for k, v in self.pipe.components.items() if v is self.unet)
            self.pipe.register_modules(**{name: plain})
        self.unsharded = True

    def write_pipeline(self, directory: str | None) -> None:
        """Finalize and ``save_pretrained`` the edited pipeline into `directory`, which the caller
        has claimed (``trust_fast.io.claim_output``); :meth:`save` does both. FSDP2: every rank
        must call it (:meth:`unshard`); rank 0 writes, the others pass None."""
        from .io import write_pretrained

        problem = self.diverged()
        if problem:
            raise RunDiverged(f"refusing to save: {problem}")
        self.finalize()
        self.unshard()
        if directory is not None:
            write_pretrained(self.pipe, directory)

    def save(self, out_dir: str, overwrite: bool = False) -> None:
        """Write the edited pipeline to `out_dir` (diffusers format), all or nothing. `out_dir` must
        be new or empty, or an earlier trust_fast output with ``overwrite=True``; it may not be,
        contain or lie inside the source model. trust_fast.io.OutputError (a ValueError) otherwise."""
        from .io import claim_output

        with claim_output(out_dir, "output directory", overwrite=overwrite,
                          inputs=[("source model", self.source_path())]) as out:
            self.write_pipeline(out.path)
        why = self.unchanged()
        if why:
            warnings.warn(f"saved an unchanged model to {out_dir!r}: {why}", stacklevel=2)


__all__ = ["TrustConfig", "TrustUnlearner", "encode_prompts", "encode_images", "LOCALIZATIONS", "X0_SOURCES"]
