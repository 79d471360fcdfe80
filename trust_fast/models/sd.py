"""Stable Diffusion 1.x and 2.x (epsilon or v-prediction, any scheduler) and every pipeline with the
same parts: a ``UNet2DConditionModel`` without added conditions, one CLIP text encoder and
tokenizer. The built-in ``ShapesPipeline`` of the shapes world is one (without a VAE): it is
matched by its parts, so this module needs nothing from :mod:`trust_fast.world`."""
from __future__ import annotations

from torch import Tensor

from .base import Family, class_name
from .registry import register_family


@register_family
class StableDiffusion(Family):
    """SD 1.x / 2.x and pipelines with the same parts (one CLIP text encoder, no added conditions)."""

    name = "sd"
    denoiser_name = "unet"
    pipeline_classes = ("StableDiffusionPipeline", "ShapesPipeline")
    supported = ("StableDiffusionPipeline (1.x, 2.x)", "ShapesPipeline")

    @staticmethod
    def matches(pipe) -> bool:
        unet = getattr(pipe, "unet", None)
        return (class_name(unet) == "UNet2DConditionModel" and unet.config.get("addition_embed_type") is None
                and getattr(pipe, "text_encoder", None) is not None and getattr(pipe, "tokenizer", None) is not None
                and getattr(pipe, "text_encoder_2", None) is None)

    def _encode_ids(self, ids: list[Tensor]) -> Tensor:
        return self.pipe.text_encoder(ids[0])[0]

    def denoiser_kwargs(self, cond: Tensor) -> dict:
        return {"encoder_hidden_states": cond}


__all__ = ["StableDiffusion"]
