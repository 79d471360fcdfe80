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

from typing import TYPE_CHECKING

from ..config import TrustConfig
from .base import Localization, register_forget_objective, register_localization, register_method
from .trust import AnchorMapping

if TYPE_CHECKING:
    from torch import Tensor


@register_forget_objective("pseudo")
class PseudoLabel(AnchorMapping):
    """Target: the current model on the pseudo (anchor) prompt, detached (no frozen copy needed)."""

    needs_frozen = False

    def target(self, u, noisy: Tensor, t: Tensor, cond: Tensor, anchor_cond: Tensor | None) -> Tensor:
        import torch

        anchor_cond = self.anchors(anchor_cond)
        with torch.no_grad():
            return u.denoiser.pred(noisy, t, anchor_cond)


@register_localization("static")
class StaticMask(Localization):
    """SalUn's mask: the top `mask_fraction` of |summed forget gradient| over all target weights,
    computed once on the cached forget images; every step multiplies the gradients by it."""

    needs_forget_images = True

    def __init__(self, u):
        super().__init__(u)
        self.mask: list[Tensor] | None = None

    def prepare(self, u) -> None:
        """Sum the gradient of the diffusion loss on the forget data over one pass of the cached
        forget images, then keep the top `mask_fraction` of |sum| over all weights."""
        import torch

        from .. import objectives
        from ..localize import static_mask

        pool = u.data.pools["forget"]
        x0_all = pool.flatten(0, 1)
        cond_all = u.emb_forget.repeat_interleave(pool.shape[1], 0)
        sums = [torch.zeros_like(p) for p in u.params]
        bs = self.config.batch_size
        for k in range(0, x0_all.shape[0], bs):
            x0 = x0_all[k:k + bs]
            noisy, t, noise = u.noising.noised(x0, u.generator)
            loss = objectives.mse(u.denoiser.pred(noisy, t, cond_all[k:k + bs]), u.noising.target(x0, noise, t))
            for s, g in zip(sums, torch.autograd.grad(loss, u.params, allow_unused=True)):
                if g is not None:
                    s.add_(g)
        self.mask = static_mask(sums, self.config.mask_fraction)

    def mask_gradients(self, opt_params: list[Tensor]) -> None:
        if self.mask is not None:
            for p, m in zip(opt_params, self.mask):
                p.grad.mul_(m)

    def state_bytes(self) -> int:
        return sum(m.numel() * m.element_size() for m in self.mask or [])

    def report(self) -> dict:
        return {"mask_fraction": (sum(float(m.sum()) for m in self.mask) / sum(m.numel() for m in self.mask)
                                  if self.mask else None)}

    def state_dict(self) -> dict:
        return {"localizer_rows": None, "mask": None if self.mask is None else [m.cpu() for m in self.mask]}

    def check_state(self, f, state: dict, u) -> None:
        super().check_state(f, state, u)
        if state["step_count"] > 0 and state.get("mask") is None:
            f.damaged("'mask'", "is missing, and a SalUn run has one from its first step")

    def load_state_dict(self, state: dict, u) -> None:
        if state["mask"] is not None:
            self.mask = [m.to(u.device) for m in state["mask"]]


def config(**overrides) -> TrustConfig:
    base = TrustConfig(method="salun", targets=("*",), localization="static", mask_fraction=0.5,
                       forget_objective="pseudo", retain_objective="diffusion", alpha=0.5, hessian="none",
                       retain_batch_size=16, retain_neighbors=0.0,
                       x0_from="forget", lr=3e-4, adv_prefix=0)
    return base.replace(**overrides)


register_method("salun", config)
