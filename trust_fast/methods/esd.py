"""ESD-x (Gandikota et al., 2023), as published:

- trains every parameter of the cross-attention modules (a UNet's attn2: to_q, to_k, to_v, to_out;
  the model family's ``"@cross_attention"`` set, an MMDiT's joint attention), densely, with Adam;
- loss = MSE(eps_theta(x_t, c), eps_0(x_t, none) - eta * (eps_0(x_t, c) - eps_0(x_t, none))),
  eta = 1, the frozen original model's predictions without grad;
- no retain term.

x_t: ESD's code noises its own samples of the concept prompt; here x_t is noised from images of
the forget prompts sampled once from the original model (the same cache every method uses), which
saves ESD the per-iteration sampling cost. Its localization is the shared "dense" one
(:class:`trust_fast.methods.base.Dense`).
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from ..config import TrustConfig
from .base import ForgetObjective, register_forget_objective, register_method

if TYPE_CHECKING:
    from torch import Tensor


@register_forget_objective("esd")
class NegativeGuidance(ForgetObjective):
    """Target: eps_0(x_t, none) - eta * (eps_0(x_t, c) - eps_0(x_t, none)), one frozen pass for both."""

    needs_anchor = False

    def target(self, u, noisy: Tensor, t: Tensor, cond: Tensor, anchor_cond: Tensor | None) -> Tensor:
        import torch

        from .. import objectives

        uncond = u.emb_uncond.expand(noisy.shape[0], -1, -1)
        e_u, e_c = u.denoiser.frozen_pred(torch.cat([noisy, noisy]), torch.cat([t, t]),
                                          torch.cat([uncond, cond])).chunk(2)
        return objectives.negative_guidance(e_u, e_c, self.config.eta)


def config(**overrides) -> TrustConfig:
    base = TrustConfig(method="esd", targets=("@cross_attention",), localization="dense", forget_objective="esd", eta=1.0,
                       retain_objective="none", alpha=0.0, hessian="none", x0_from="forget", lr=1e-3,
                       adv_prefix=0)
    return base.replace(**overrides)


register_method("esd", config)
