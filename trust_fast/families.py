"""The public names of :mod:`trust_fast.models` under their old module (``trust_fast.families``):
the model family adapters, :func:`family_for`, :func:`load_pipeline` and the refusal type. New
code imports from :mod:`trust_fast.models`."""
from __future__ import annotations

from .models import (DTYPES, SUPPORTED_CLASSES, Family, Flux, StableDiffusion, StableDiffusion3,  # noqa: F401
                     StableDiffusionXL, UnsupportedPipeline, family_for, load_pipeline, registered, stored_dtype)
from .models import supported as _supported
from .models.targets import UNET_TARGETS  # noqa: F401

FAMILIES = registered()  # the built-in families, in the order family_for asks them
SUPPORTED = _supported()

__all__ = ["Family", "StableDiffusion", "StableDiffusionXL", "StableDiffusion3", "Flux", "FAMILIES", "family_for",
           "UnsupportedPipeline", "UNET_TARGETS", "SUPPORTED", "SUPPORTED_CLASSES", "load_pipeline", "stored_dtype",
           "DTYPES"]
