"""Model families: one adapter per kind of pipeline, behind one interface (:class:`Family`, whose
docstring lists every hook the engine calls), and the loading of pipelines.

Layout:

- :mod:`.base`: :class:`Family`, :class:`PackedPooled`, :class:`UnsupportedPipeline`;
- :mod:`.registry`: :func:`register_family` (class decorator) and :func:`family_for` (asks the
  registered families in order);
- :mod:`.targets`: the default and cross-attention target patterns of each family, as data;
- one module per family: :mod:`.sd` (SD 1.x/2.x and the shapes world's ``ShapesPipeline``),
  :mod:`.sdxl`, :mod:`.sd3`, :mod:`.flux`;
- :mod:`.loading`: :func:`load_pipeline` and its safety checks.

Anything else is refused up front with one line naming the class and the supported families.
Nothing here imports :mod:`trust_fast.world` at import time (``load_pipeline("shapes")`` does,
when called).
"""
from __future__ import annotations

from .base import Family, PackedPooled, UnsupportedPipeline
from .registry import family_for, register_family, registered, supported
# the built-in families register in this order (family_for asks them in it)
from .sd import StableDiffusion
from .sdxl import StableDiffusionXL
from .sd3 import StableDiffusion3
from .flux import Flux
from .loading import DTYPES, SUPPORTED_CLASSES, load_pipeline, stored_dtype  # after the families: its snapshot
from .targets import CROSS_ATTENTION_TARGETS, DEFAULT_TARGETS, UNET_TARGETS

__all__ = ["Family", "PackedPooled", "UnsupportedPipeline", "family_for", "register_family", "registered",
           "supported", "StableDiffusion", "StableDiffusionXL", "StableDiffusion3", "Flux", "DTYPES",
           "SUPPORTED_CLASSES", "load_pipeline", "stored_dtype", "DEFAULT_TARGETS", "CROSS_ATTENTION_TARGETS",
           "UNET_TARGETS"]
