"""FLUX.1 (``FluxPipeline``, ``FluxTransformer2DModel``): a rectified-flow MMDiT on 2x2-packed
latents, conditioned on T5's token states and CLIP's pooled embedding, guidance-distilled (dev) or
not (schnell).

- Conditioning: T5's last hidden states (``max_sequence_length`` 512 tokens, the pipeline's
  default) as ``encoder_hidden_states``, the CLIP text encoder's pooled output as
  ``pooled_projections``, packed into one tensor like SD3's (:class:`PackedPooled`); the text
  position ids ``txt_ids`` are zeros, as the pipeline makes them.
- Latents: the engine works on unpacked latents (N, C, H, W); :meth:`Flux.denoiser_inputs` packs
  them into the transformer's (N, H/2 * W/2, 4C) tokens with their position ids ``img_ids``, and
  :meth:`Flux.prediction` unpacks the transformer's output. The timestep goes in as t / 1000,
  as the pipeline passes it.
- Guidance: a guidance-distilled transformer (``guidance_embeds``) takes the guidance scale as an
  input instead of a second, unconditional pass. Training passes use the pipeline's default
  guidance (3.5); sampling the data-free images (:meth:`Flux.guided_prediction`) makes one
  conditional pass with the sampling scale as that input. Without guidance embeddings (schnell)
  sampling is one conditional pass, as the pipeline's is.
- Sampling: the pipeline's flow-matching Euler scheduler with its sigmas and the resolution shift
  ``mu`` for the image's token count (:meth:`Flux.set_timesteps`).
"""
from __future__ import annotations

import contextlib
import inspect

import torch
from torch import Tensor

from .base import JointTransformer, per_image
from .registry import register_family

DEFAULT_GUIDANCE = 3.5  # FluxPipeline.__call__'s guidance_scale


def pack_latents(x: Tensor) -> Tensor:
    """(N, C, H, W) latents -> (N, H/2 * W/2, 4C) tokens of 2x2 patches (FluxPipeline._pack_latents)."""
    n, c, h, w = x.shape
    return x.view(n, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(n, (h // 2) * (w // 2), c * 4)


def unpack_latents(x: Tensor, h: int, w: int) -> Tensor:
    """(N, H/2 * W/2, 4C) tokens -> (N, C, H, W) latents: the inverse of :func:`pack_latents`."""
    n, _, d = x.shape
    return x.view(n, h // 2, w // 2, d // 4, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(n, d // 4, h, w)


def image_ids(h: int, w: int, device, dtype) -> Tensor:
    """The (H/2 * W/2, 3) position ids of the packed tokens of (H, W) latents: (0, row, column)."""
    ids = torch.zeros(h // 2, w // 2, 3)
    ids[..., 1] += torch.arange(h // 2)[:, None]
    ids[..., 2] += torch.arange(w // 2)[None, :]
    return ids.reshape(-1, 3).to(device=device, dtype=dtype)


def calculate_shift(seq_len: int, config) -> float:
    """The pipeline's resolution shift mu for `seq_len` image tokens (FluxPipeline's calculate_shift)."""
    base_len, max_len = config.get("base_image_seq_len", 256), config.get("max_image_seq_len", 4096)
    base_shift, max_shift = config.get("base_shift", 0.5), config.get("max_shift", 1.15)
    m = (max_shift - base_shift) / (max_len - base_len)
    return seq_len * m + base_shift - m * base_len


@register_family
class Flux(JointTransformer, transformer="FluxTransformer2DModel", t5_tokens=512):  # FluxPipeline's T5 length
    """FLUX.1 dev / schnell: T5 states + CLIP pooled, packed latents, distilled guidance, flow matching."""

    name = "flux"
    pipeline_classes = ("FluxPipeline",)

    def __init__(self, pipe):
        super().__init__(pipe)
        default = inspect.signature(type(pipe).__call__).parameters.get("guidance_scale")
        self.guidance = (DEFAULT_GUIDANCE if default is None or default.default is inspect.Parameter.empty
                         else float(default.default))

    # ------------------------------------------------------------------ conditioning

    def prompt_encoders(self) -> list[tuple]:
        p = self.pipe
        return [(p.tokenizer, p.text_encoder, p.tokenizer.model_max_length),
                (p.tokenizer_2, p.text_encoder_2, self.t5_tokens)]

    def _encode_ids(self, ids: list[Tensor]) -> Tensor:
        dev = self.denoiser.device
        pooled = self.pipe.text_encoder(ids[0], output_hidden_states=False).pooler_output.to(dev)
        t5 = self.pipe.text_encoder_2(ids[1], output_hidden_states=False)[0].to(dev)
        return self.pack(t5, pooled)

    def denoiser_kwargs(self, cond: Tensor) -> dict:
        hidden, pooled = self.unpack(cond)
        return {"encoder_hidden_states": hidden, "pooled_projections": pooled,
                "txt_ids": torch.zeros(hidden.shape[1], 3, device=cond.device, dtype=cond.dtype)}

    # ------------------------------------------------------------------ denoiser

    def sample_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of the unpacked latents at the pipeline's default size (``default_sample_size``
        latents, 128 for FLUX.1, rounded down to even as the pipeline does)."""
        size = int(getattr(self.pipe, "default_sample_size", 128))
        return self.denoiser.config.in_channels // 4, 2 * (size // 2), 2 * (size // 2)

    def denoiser_inputs(self, noisy: Tensor, t: Tensor, cond: Tensor) -> dict:
        n, _, h, w = noisy.shape
        guidance = None
        if self.denoiser.config.guidance_embeds:
            guidance = torch.full((n,), self.guidance, device=noisy.device, dtype=torch.float32)
        return {"hidden_states": pack_latents(noisy), "timestep": per_image(t, n).to(noisy.dtype) / 1000,
                "guidance": guidance, **self.denoiser_kwargs(cond),
                "img_ids": image_ids(h, w, noisy.device, noisy.dtype)}

    def prediction(self, output, noisy: Tensor) -> Tensor:
        return unpack_latents(output.sample, *noisy.shape[-2:])

    # ------------------------------------------------------------------ sampling

    def sampler(self):
        return type(self.pipe.scheduler).from_config(self.pipe.scheduler.config)

    def set_timesteps(self, scheduler, steps: int, device) -> None:
        """The pipeline's timesteps: sigmas from 1 to 1/steps, shifted by mu for the image's token count."""
        import numpy as np

        config = scheduler.config
        sigmas = None if config.get("use_flow_sigmas") else np.linspace(1.0, 1 / steps, steps)
        _, h, w = self.sample_shape()
        mu = calculate_shift((h // 2) * (w // 2), config) if config.get("use_dynamic_shifting") else None
        if sigmas is None:
            scheduler.set_timesteps(steps, device=device, mu=mu)
        else:
            scheduler.set_timesteps(sigmas=sigmas, device=device, mu=mu)

    @contextlib.contextmanager
    def distilled_guidance(self, scale: float):
        """The guidance scale the denoiser inputs carry, `scale` inside the block."""
        before, self.guidance = self.guidance, float(scale)
        try:
            yield
        finally:
            self.guidance = before

    def guided_prediction(self, pred_fn, x: Tensor, t: Tensor, cond: Tensor, uncond: Tensor,
                          scale: float) -> Tensor:
        """One conditional pass, `scale` as the distilled guidance (``uncond`` unused, as in the pipeline)."""
        with self.distilled_guidance(scale):
            return pred_fn(x, per_image(t, x.shape[0]), cond)

    def pack_pipeline_latents(self, x: Tensor) -> Tensor:
        return pack_latents(x)

    def unpack_pipeline_latents(self, x: Tensor) -> Tensor:
        _, h, w = self.sample_shape()
        if x.dim() == 3 and x.shape[1] != (h // 2) * (w // 2):  # another size than the default: square
            h = w = 2 * round(x.shape[1] ** 0.5)
        return unpack_latents(x, h, w) if x.dim() == 3 else x


__all__ = ["Flux", "pack_latents", "unpack_latents", "image_ids", "calculate_shift"]
