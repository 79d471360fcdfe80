"""The unlearning engine: :class:`TrustUnlearner` over its components (see :mod:`.unlearner`).

It knows no CLI, no world and no model class: the family adapter (trust_fast.models) and the
prompt sets arrive from outside, the method's pieces from the registry of trust_fast.methods."""
from __future__ import annotations

from torch import Tensor

from ..config import (ADV_PREFIX_AUTO, COMPILE_BACKENDS, PREDATED_FIELDS, X0_SOURCES,
                      TrustConfig, effective_fields)
from ..methods import LOCALIZATIONS  # the registered localizations, by name
from ..models import family_for
from .precision import LOSS_SCALE_GROWTH, LOSS_SCALE_INIT, amp_dtype
from .regularizer import SHARDED_HESSIAN_NEEDS_FN
from .report import DIVERGING, SKIP_NO_FORGET, SKIP_NON_FINITE, SKIP_OVERFLOW, SKIP_WEIGHTS
from .run import RunDiverged
from .unlearner import TrustUnlearner
from .update import NonFiniteUpdate


def encode_prompts(pipe, prompts: list[str]) -> Tensor:
    """Conditioning (N, L, D) of the prompts for the pipeline's denoiser, on its device and dtype
    (see trust_fast.models: for SDXL the pooled embedding is packed in as extra rows)."""
    return family_for(pipe).encode(prompts)


def encode_images(pipe, images: Tensor) -> Tensor:
    """Images (N, 3, H, W) in [-1, 1] -> what the denoiser denoises: VAE latents times the VAE's
    scaling factor when the pipeline has a VAE, the pixels themselves otherwise."""
    import torch

    vae = getattr(pipe, "vae", None)
    denoiser = family_for(pipe).denoiser
    images = images.to(denoiser.device)
    if vae is None:
        return images.to(denoiser.dtype)
    with torch.no_grad():
        lat = vae.encode(images.to(vae.dtype)).latent_dist.sample()
    shift = vae.config.get("shift_factor") or 0.0  # SD3's VAE is shifted, then scaled
    return ((lat - shift) * vae.config.scaling_factor).to(denoiser.dtype)


__all__ = ["TrustConfig", "TrustUnlearner", "encode_prompts", "encode_images", "LOCALIZATIONS", "X0_SOURCES",
           "NonFiniteUpdate", "RunDiverged", "effective_fields", "PREDATED_FIELDS", "ADV_PREFIX_AUTO",
           "COMPILE_BACKENDS", "LOSS_SCALE_INIT", "LOSS_SCALE_GROWTH", "amp_dtype", "SHARDED_HESSIAN_NEEDS_FN",
           "SKIP_NO_FORGET", "SKIP_NON_FINITE", "SKIP_OVERFLOW", "SKIP_WEIGHTS", "DIVERGING"]
