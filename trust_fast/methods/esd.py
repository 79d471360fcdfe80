"""ESD-x (Gandikota et al., 2023), as published:

- trains every parameter of the cross-attention modules (a UNet's attn2: to_q, to_k, to_v, to_out;
  the model family's ``"@cross_attention"`` set, an MMDiT's joint attention), densely, with Adam;
- loss = MSE(eps_theta(x_t, c), eps_0(x_t, none) - eta * (eps_0(x_t, c) - eps_0(x_t, none))),
  eta = 1, the frozen original model's predictions without grad;
- no retain term.

x_t: ESD's code noises its own samples of the concept prompt; here x_t is noised from images of
the forget prompts sampled once from the original model (the same cache every method uses), which
saves ESD the per-iteration sampling cost.
"""
from __future__ import annotations

from ..config import TrustConfig


def config(**overrides) -> TrustConfig:
    base = TrustConfig(method="esd", targets=("@cross_attention",), localization="dense", forget_objective="esd", eta=1.0,
                       retain_objective="none", alpha=0.0, hessian="none", x0_from="forget", lr=1e-3,
                       adv_prefix=0)
    return base.replace(**overrides)
