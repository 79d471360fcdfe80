"""The module patterns each family edits, as data: family name -> module glob patterns (matched
with fnmatch against the denoiser's module names, :func:`trust_fast.localize.find_targets`).

``DEFAULT_TARGETS``: what TRUST edits by default (a config's ``"@default"``).
``CROSS_ATTENTION_TARGETS``: where the prompt reaches the image, what ESD-x trains (a config's
``"@cross_attention"``).

- UNets (``sd``, ``sdxl``): the cross-attention q/k/v and the feed-forward layers by default; all
  of ``attn2`` as cross-attention.
- MMDiTs (``sd3``, ``flux``): the image queries of every joint attention (Flux's single-stream
  blocks attend jointly too, so their ``to_q`` is included), the text stream's query/key/value
  projections of the dual-stream blocks (where the prompt reaches the image: the counterpart of a
  UNet's cross-attention q/k/v) and the image stream's feed-forward layers (the counterpart of
  the UNet's ff layers). Cross-attention: the joint attention (SD3: ``*.attn.*``, the image-only
  ``attn2`` of SD3.5's dual-attention blocks left out, as a UNet's self-attention ``attn1`` is;
  Flux: the linear projections of every block's attention, its RMS norms left out).
"""
from __future__ import annotations

from ..localize import DEFAULT_TARGETS as UNET_TARGETS  # cross-attention q/k/v and the feed-forward layers

MMDIT_TARGETS: tuple[str, ...] = ("*attn.to_q", "*attn.add_q_proj", "*attn.add_k_proj", "*attn.add_v_proj",
                                  "*ff.net.0.proj", "*ff.net.2")

DEFAULT_TARGETS: dict[str, tuple[str, ...]] = {
    "sd": UNET_TARGETS,
    "sdxl": UNET_TARGETS,
    "sd3": MMDIT_TARGETS,
    "flux": MMDIT_TARGETS,
}

CROSS_ATTENTION_TARGETS: dict[str, tuple[str, ...]] = {
    "sd": ("*attn2.*",),
    "sdxl": ("*attn2.*",),
    "sd3": ("*.attn.*",),
    "flux": ("*.attn.to_q", "*.attn.to_k", "*.attn.to_v", "*.attn.to_out.0",
             "*.attn.add_q_proj", "*.attn.add_k_proj", "*.attn.add_v_proj", "*.attn.to_add_out"),
}

__all__ = ["DEFAULT_TARGETS", "CROSS_ATTENTION_TARGETS", "UNET_TARGETS", "MMDIT_TARGETS"]
