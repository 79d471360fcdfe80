"""SalUn (Fan et al., 2024) for text-to-image diffusion, as published:

- weight saliency mask computed once before training: the gradient of the forgetting loss (the
  diffusion loss on the forget data) summed over the forget set, and the top 50% of |sum| over
  all UNet weights (one global threshold);
- the whole UNet is trainable; after each backward, grad *= mask; Adam (no weight decay);
- loss = MSE(eps_theta(x_t, c_f), sg eps_theta(x_t, c_pseudo)) + 0.5 * diffusion loss on the
  retain data. The pseudo prompt is the concept's anchor (another value of the same attribute:
  SalUn's "random label" relabelling).

Forget and retain images are sampled from the original model (data-free, as for every method here).
"""
from __future__ import annotations

from ..config import TrustConfig


def config(**overrides) -> TrustConfig:
    base = TrustConfig(method="salun", targets=("*",), localization="static", mask_fraction=0.5,
                       forget_objective="pseudo", retain_objective="diffusion", alpha=0.5, hessian="none",
                       retain_batch_size=16, retain_neighbors=0.0,
                       x0_from="forget", lr=3e-4, adv_prefix=0)
    return base.replace(**overrides)
