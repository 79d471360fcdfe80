"""Stable Diffusion 3 / 3.5 (MMDiT, ``SD3Transformer2DModel``): two CLIP encoders (penultimate
states concatenated, zero-padded to the joint width) followed by T5's states (zeros when the
pipeline has no third encoder, as diffusers does), the two pooled embeddings as
``pooled_projections`` (packed like SDXL's), flow matching. Default targets: see
:mod:`trust_fast.models.targets`."""
from __future__ import annotations

import torch
from torch import Tensor

from .base import JointTransformer
from .registry import register_family


@register_family
class StableDiffusion3(JointTransformer, transformer="SD3Transformer2DModel", t5_tokens=256):  # pipeline T5 length
    """SD3 / SD3.5 (MMDiT): CLIP-L, CLIP-G and optional T5 states, pooled projections, flow matching."""

    name = "sd3"
    pipeline_classes = ("StableDiffusion3Pipeline",)

    def prompt_encoders(self) -> list[tuple]:
        p = self.pipe
        out = [(p.tokenizer, p.text_encoder, p.tokenizer.model_max_length),
               (p.tokenizer_2, p.text_encoder_2, p.tokenizer_2.model_max_length)]
        if getattr(p, "text_encoder_3", None) is not None:
            out.append((p.tokenizer_3, p.text_encoder_3, self.t5_tokens))
        return out

    def _encode_ids(self, ids: list[Tensor]) -> Tensor:
        dev = self.denoiser.device
        hidden, pooled = [], []
        for (_, te, _), i in zip(self.prompt_encoders()[:2], ids):
            out = te(i, output_hidden_states=True)
            hidden.append(out.hidden_states[-2].to(dev))
            pooled.append(out[0].to(dev))
        clip = torch.cat(hidden, -1)
        clip = torch.nn.functional.pad(clip, (0, self.width - clip.shape[-1]))
        if len(ids) < 3:  # what the pipeline does without T5: zeros in its place
            t5 = clip.new_zeros(clip.shape[0], self.t5_tokens, self.width)
        else:
            t5 = self.pipe.text_encoder_3(ids[2])[0].to(dev, clip.dtype)
        return self.pack(torch.cat([clip, t5], -2), torch.cat(pooled, -1))

    def sample_shape(self) -> tuple[int, int, int]:
        c = self.denoiser.config
        return c.in_channels, c.sample_size, c.sample_size

    def denoiser_kwargs(self, cond: Tensor) -> dict:
        hidden, pooled = self.unpack(cond)
        return {"encoder_hidden_states": hidden, "pooled_projections": pooled}

    def denoiser_inputs(self, noisy: Tensor, t: Tensor, cond: Tensor) -> dict:
        return {"hidden_states": noisy, "timestep": t, **self.denoiser_kwargs(cond)}

    def sampler(self):
        return type(self.pipe.scheduler).from_config(self.pipe.scheduler.config)


__all__ = ["StableDiffusion3"]
