"""The Family base class: everything the engine needs to know about a pipeline, behind one interface.

A family adapter wraps one pipeline (``Family(pipe)``) and answers for it. The engine
(:class:`trust_fast.TrustUnlearner`) never looks at a pipeline's class; it always works on
unpacked latents (N, C, H, W) and on a packed conditioning (N, L, D), and asks the family for the
rest. The hooks, with what the base class does when a family does not override them:

Denoiser
    ``denoiser`` (attribute): the pipeline component that denoises, the only one unlearning edits;
    ``denoiser_name`` (class attribute): its component name (``"unet"``, ``"transformer"``).
    Nothing else assumes a name: code that needs the denoiser asks ``family.denoiser``.
    ``denoiser_inputs(noisy, t, cond) -> dict``: every keyword of one denoiser call for latents
    ``noisy`` (N, C, H, W), training timesteps ``t`` (N,) and a packed conditioning ``cond``
    (base: ``sample``/``timestep`` and :meth:`denoiser_kwargs`).
    ``prediction(output, noisy) -> Tensor``: the denoiser's output object as a prediction shaped
    like ``noisy`` (base: ``output.sample``). Latent packing (Flux's 2x2 patches) happens inside
    these two hooks only.
    ``prediction_type``: "epsilon", "v_prediction" or "sample" (the scheduler's config), or
    "flow" (flow matching: x_t = (1 - s) x0 + s noise with s = t / T, the velocity noise - x0 as
    target).
    ``sample_shape() -> (C, H, W)``: the unpacked latents the denoiser denoises at the pipeline's
    default size.

Conditioning
    ``encode(prompts) -> (N, L, D)``: the conditioning of each prompt as one tensor on the
    denoiser's device and dtype. Everything the engine does with conditionings (index,
    concatenate, repeat) is done on that tensor, so a family with extra conditions packs them
    into it (:class:`PackedPooled`: pooled embeddings as extra rows after the tokens).
    ``uncond() -> (1, L, D)``: the conditioning classifier-free guidance uses for "no prompt".
    ``prompt_encoders()``, ``tokenize(prompts)``, ``encode_ids(ids)``: the text encoders a prompt
    passes through (tokenizer, encoder, token count), its token ids for each, and the
    conditioning computed from those ids with gradients, so that :mod:`trust_fast.softprompt` can
    put free token embeddings into every encoder.
    ``pipeline_embeds(cond) -> dict``: a packed conditioning as the pipeline's ``__call__`` takes
    it (``prompt_embeds``, and ``pooled_prompt_embeds`` where the family has one).

Sampling
    ``sampler()``: a fresh scheduler for sampling the data-free images (base: DDIM on the
    pipeline's noise schedule).
    ``set_timesteps(scheduler, steps, device)``: set that scheduler up for ``steps`` steps (base:
    ``scheduler.set_timesteps(steps, device=device)``; Flux passes its resolution shift ``mu``).
    ``guided_prediction(pred_fn, x, t, cond, uncond, scale) -> Tensor``: the guided prediction
    of one sampling step, ``pred_fn(x, t, cond)`` being a denoiser pass that returns
    :meth:`prediction`'s tensor. Base: classifier-free guidance, one pass over
    ``[x, x]`` with ``[uncond, cond]``, ``e_u + scale * (e_c - e_u)``; Flux (guidance-distilled)
    makes one conditional pass with ``scale`` as the transformer's ``guidance`` input.
    ``pack_pipeline_latents(x)`` / ``unpack_pipeline_latents(x)``: unpacked latents as the
    pipeline's ``latents=`` argument takes them, and what the pipeline returns with
    ``output_type="latent"`` as unpacked latents (base: both the identity).

Targets
    ``default_targets``: the module glob patterns TRUST edits by default;
    ``cross_attention_targets``: the modules where the prompt reaches the image (what ESD-x
    trains); both come from the table in :mod:`trust_fast.models.targets`, and a config names
    either as ``"@default"`` / ``"@cross_attention"`` (:meth:`Family.expand_targets`).

Registry
    ``matches(pipe)`` (static): whether a pipeline belongs to the family; ``name``: its short
    name; ``pipeline_classes``: the ``_class_name`` values of model_index.json the loader takes
    for it; ``supported``: how the refusal message names it. A family registers itself with
    :func:`trust_fast.models.registry.register_family`.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from .targets import CROSS_ATTENTION_TARGETS, DEFAULT_TARGETS


class UnsupportedPipeline(ValueError):
    """The pipeline belongs to no family trust_fast knows."""


class Family:
    """One model family's knowledge (see the module docstring for every hook). Subclasses set
    ``name`` (and the table rows of :mod:`trust_fast.models.targets` under it), implement
    ``matches``, ``_encode_ids`` and ``denoiser_kwargs``, and override the hooks whose default
    does not fit."""

    name = "?"
    default_targets: tuple[str, ...] = DEFAULT_TARGETS["sd"]
    cross_attention_targets: tuple[str, ...] = CROSS_ATTENTION_TARGETS["sd"]
    denoiser_name = "unet"
    pipeline_classes: tuple[str, ...] = ()
    supported: tuple[str, ...] = ()

    def __init_subclass__(cls, **kwargs):
        """A family's target sets are its rows of the table in :mod:`.targets` (by ``name``), and
        the refusal message names its pipeline classes, unless the class says otherwise."""
        super().__init_subclass__(**kwargs)
        for attr, table in (("default_targets", DEFAULT_TARGETS), ("cross_attention_targets", CROSS_ATTENTION_TARGETS)):
            if cls.name in table and attr not in cls.__dict__:
                setattr(cls, attr, table[cls.name])
        if "supported" not in cls.__dict__:
            cls.supported = cls.pipeline_classes

    def __init__(self, pipe):
        self.pipe = pipe
        self.denoiser = getattr(pipe, self.denoiser_name)

    @staticmethod
    def matches(pipe) -> bool:
        raise NotImplementedError

    # ------------------------------------------------------------------ denoiser

    @property
    def prediction_type(self) -> str:
        return self.pipe.scheduler.config.get("prediction_type", "epsilon")

    def sample_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of what the denoiser denoises."""
        c = self.denoiser.config
        size = c.sample_size if isinstance(c.sample_size, int) else c.sample_size[0]
        return c.in_channels, size, size

    def denoiser_kwargs(self, cond: Tensor) -> dict:
        """The conditioning keywords of the denoiser call for a packed conditioning."""
        raise NotImplementedError

    def denoiser_inputs(self, noisy: Tensor, t: Tensor, cond: Tensor) -> dict:
        """Every keyword of one denoiser call: ``prediction(denoiser(**inputs), noisy)`` is its prediction."""
        return {"sample": noisy, "timestep": t, **self.denoiser_kwargs(cond)}

    def prediction(self, output, noisy: Tensor) -> Tensor:
        """The denoiser's output as a prediction tensor shaped like `noisy`."""
        return output.sample

    # ------------------------------------------------------------------ targets

    def expand_targets(self, patterns: tuple[str, ...] | None) -> tuple[str, ...]:
        """Module glob patterns with the family's target sets spelled out: ``"@default"`` (what
        TRUST edits by default; also what None means) and ``"@cross_attention"``."""
        if patterns is None:
            return tuple(self.default_targets)
        sets = {"@default": self.default_targets, "@cross_attention": self.cross_attention_targets}
        out = []
        for p in patterns:
            if p.startswith("@") and p not in sets:
                raise ValueError(f"unknown target set {p!r}; the sets are {', '.join(sorted(sets))}")
            out.extend(sets[p] if p in sets else (p,))
        return tuple(out)

    # ------------------------------------------------------------------ conditioning

    def prompt_encoders(self) -> list[tuple]:
        """(tokenizer, text encoder, token count) of every encoder a prompt passes through, in order."""
        tok, te = self.pipe.tokenizer, self.pipe.text_encoder
        return [(tok, te, tok.model_max_length)]

    def tokenize(self, prompts: list[str]) -> list[Tensor]:
        """The prompts' token ids (N, L) for each of :meth:`prompt_encoders`, on that encoder's device."""
        return [tok(prompts, padding="max_length", max_length=n, truncation=True, return_tensors="pt")
                .input_ids.to(te.device) for tok, te, n in self.prompt_encoders()]

    def encode_ids(self, ids: list[Tensor]) -> Tensor:
        """Conditioning (N, L, D) from the token ids of each encoder (:meth:`tokenize`), with
        gradients through the encoders, on the denoiser's device and dtype."""
        return self._encode_ids(ids).to(self.denoiser.device, self.denoiser.dtype)

    @torch.no_grad()
    def encode(self, prompts: list[str]) -> Tensor:
        """Conditioning (N, L, D) of the prompts, on the denoiser's device and dtype."""
        out = [self.encode_ids(self.tokenize(prompts[i:i + 256])) for i in range(0, len(prompts), 256)]
        if not out:
            return self.encode([""])[:0]
        return torch.cat(out)

    def uncond(self) -> Tensor:
        """The conditioning (1, L, D) of "no prompt"."""
        return self.encode([""])

    def _encode_ids(self, ids: list[Tensor]) -> Tensor:
        raise NotImplementedError

    def pipeline_embeds(self, cond: Tensor) -> dict:
        """The keywords of the pipeline's ``__call__`` that stand for the prompts of a packed conditioning."""
        return {"prompt_embeds": cond}

    # ------------------------------------------------------------------ sampling

    def sampler(self):
        """A fresh scheduler that samples the data-free images: DDIM on the pipeline's noise schedule."""
        from diffusers import DDIMScheduler

        return DDIMScheduler.from_config(self.pipe.scheduler.config)

    def set_timesteps(self, scheduler, steps: int, device) -> None:
        """Set `scheduler` (from :meth:`sampler`) up to sample in `steps` steps."""
        scheduler.set_timesteps(steps, device=device)

    def guided_prediction(self, pred_fn, x: Tensor, t: Tensor, cond: Tensor, uncond: Tensor,
                          scale: float) -> Tensor:
        """Classifier-free guidance: one pass of ``pred_fn(x, t, cond)`` over the unconditional and
        conditional halves, ``e_u + scale * (e_c - e_u)``. `t`: the step's timestep (a scalar or
        one per image); `uncond`: (1, L, D) or one per image."""
        n = x.shape[0]
        both = pred_fn(torch.cat([x, x]), per_image(t, n).repeat(2), torch.cat([uncond.expand(n, -1, -1), cond]))
        e_u, e_c = both.chunk(2)
        return e_u + scale * (e_c - e_u)

    def pack_pipeline_latents(self, x: Tensor) -> Tensor:
        """Unpacked latents (N, C, H, W) as the pipeline's ``latents=`` argument takes them."""
        return x

    def unpack_pipeline_latents(self, x: Tensor) -> Tensor:
        """What the pipeline returns with ``output_type="latent"``, as unpacked latents (N, C, H, W)."""
        return x



def per_image(t: Tensor, n: int) -> Tensor:
    """Timestep `t` (a scalar, one value, or one per image) as one per image (n,)."""
    t = t.reshape(-1)
    return t.expand(n) if t.numel() == 1 else t


class PackedPooled:
    """Pooled text embeddings packed as extra rows after the tokens of a conditioning (SDXL, SD3, Flux)."""

    def _pack_setup(self, width: int, pooled_dim: int) -> None:
        self.width, self.pooled_dim = width, pooled_dim
        self.pooled_rows = math.ceil(pooled_dim / width)

    def pack(self, hidden: Tensor, pooled: Tensor) -> Tensor:
        """(N, L, D) token states + (N, P) pooled -> (N, L + ceil(P / D), D)."""
        n = hidden.shape[0]
        pad = hidden.new_zeros(n, self.pooled_rows * self.width)
        pad[:, :self.pooled_dim] = pooled.to(hidden.dtype)
        return torch.cat([hidden, pad.view(n, self.pooled_rows, self.width)], 1)

    def unpack(self, cond: Tensor) -> tuple[Tensor, Tensor]:
        n = cond.shape[0]
        hidden = cond[:, :cond.shape[1] - self.pooled_rows]
        pooled = cond[:, cond.shape[1] - self.pooled_rows:].reshape(n, -1)[:, :self.pooled_dim]
        return hidden, pooled

    def pipeline_embeds(self, cond: Tensor) -> dict:
        hidden, pooled = self.unpack(cond)
        return {"prompt_embeds": hidden, "pooled_prompt_embeds": pooled}


def class_name(module) -> str:
    """A module's class name, seen through FSDP2's sharded subclass (trust_fast.fsdp)."""
    from ..fsdp import plain_class

    return plain_class(module).__name__

class JointTransformer(PackedPooled, Family):
    """A transformer denoiser (MMDiT: SD3, Flux) of class ``transformer_class``, conditioned on token
    states with the pooled CLIP embedding packed in as extra rows, trained by flow matching."""

    denoiser_name = "transformer"
    prediction_type = "flow"
    transformer_class = "?"
    t5_tokens = 256

    def __init_subclass__(cls, transformer: str | None = None, t5_tokens: int | None = None, **kwargs):
        """A joint-transformer family names its denoiser's class and its T5 sequence length where it
        is declared: ``class Flux(JointTransformer, transformer="FluxTransformer2DModel", t5_tokens=512)``."""
        super().__init_subclass__(**kwargs)
        if transformer is not None:
            cls.transformer_class = transformer
        if t5_tokens is not None:
            cls.t5_tokens = t5_tokens

    def __init__(self, pipe):
        super().__init__(pipe)
        c = self.denoiser.config
        self._pack_setup(c.joint_attention_dim, c.pooled_projection_dim)

    @classmethod
    def matches(cls, pipe) -> bool:
        return (class_name(getattr(pipe, "transformer", None)) == cls.transformer_class
                and getattr(pipe, "text_encoder", None) is not None
                and getattr(pipe, "text_encoder_2", None) is not None)


__all__ = ["Family", "PackedPooled", "JointTransformer", "UnsupportedPipeline", "class_name", "per_image"]
