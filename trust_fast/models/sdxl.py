"""Stable Diffusion XL: two text encoders whose penultimate hidden states are concatenated, the
second one's pooled projection and the micro-conditioning time ids as the UNet's added
conditions. The pooled embedding is packed into the conditioning tensor as extra rows after the
tokens (zero-padded to D); the time ids are the same for every image (original = target size =
the UNet's sample size in pixels, no crop) and are built in ``denoiser_inputs``."""
from __future__ import annotations

import torch
from torch import Tensor

from .base import Family, PackedPooled, UnsupportedPipeline, class_name
from .registry import register_family


@register_family
class StableDiffusionXL(PackedPooled, Family):
    """SDXL base: two text encoders, pooled text embedding and time ids as added conditions."""

    name = "sdxl"
    denoiser_name = "unet"
    pipeline_classes = ("StableDiffusionXLPipeline",)

    def __init__(self, pipe):
        super().__init__(pipe)
        self._pack_setup(self.denoiser.config.cross_attention_dim, pipe.text_encoder_2.config.projection_dim)
        scale = getattr(pipe, "vae_scale_factor", 8)  # pixels per latent, as the pipeline computes it
        _, h, w = self.sample_shape()
        self.time_ids = [h * scale, w * scale, 0, 0, h * scale, w * scale]
        expected = self.denoiser.add_embedding.linear_1.in_features
        got = self.denoiser.config.addition_time_embed_dim * len(self.time_ids) + self.pooled_dim
        if expected != got:
            raise UnsupportedPipeline(f"SDXL pipeline whose UNet expects added embeddings of {expected} values, "
                                      f"but its time ids and pooled text embedding give {got}")

    @staticmethod
    def matches(pipe) -> bool:
        unet = getattr(pipe, "unet", None)
        return (class_name(unet) == "UNet2DConditionModel" and unet.config.get("addition_embed_type") == "text_time"
                and getattr(pipe, "text_encoder_2", None) is not None
                and getattr(pipe, "tokenizer_2", None) is not None)

    def prompt_encoders(self) -> list[tuple]:
        pairs = [(self.pipe.tokenizer, self.pipe.text_encoder), (self.pipe.tokenizer_2, self.pipe.text_encoder_2)]
        # SDXL refiner-style pipelines have only the second encoder
        return [(tok, te, tok.model_max_length) for tok, te in pairs if te is not None]

    def _encode_ids(self, ids: list[Tensor]) -> Tensor:
        hidden, pooled = [], None
        for (_, te, _), i in zip(self.prompt_encoders(), ids):
            out = te(i, output_hidden_states=True)
            hidden.append(out.hidden_states[-2].to(self.denoiser.device))
            pooled = out[0].to(self.denoiser.device)  # the last encoder's pooled projection
        return self.pack(torch.cat(hidden, -1), pooled)

    def uncond(self) -> Tensor:
        if self.pipe.config.get("force_zeros_for_empty_prompt", True):
            return torch.zeros_like(self.encode([""]))  # what the pipeline does for an empty negative prompt
        return self.encode([""])

    def denoiser_kwargs(self, cond: Tensor) -> dict:
        hidden, pooled = self.unpack(cond)
        ids = torch.tensor(self.time_ids, device=cond.device, dtype=cond.dtype).expand(cond.shape[0], -1)
        return {"encoder_hidden_states": hidden, "added_cond_kwargs": {"text_embeds": pooled, "time_ids": ids}}


__all__ = ["StableDiffusionXL"]
