"""TRUST: dynamic neuron localization in the cross-attention projections, anchor mapping,
retain self-distillation, Hessian regularizer, row-sparse AdamW.

Its pieces: the anchor-mapping forget objective (the frozen model's prediction for the concept's
anchor prompt) and dynamic localization (rows whose forget-gradient saliency z-score exceeds xi,
re-estimated every loc_interval steps, stepped by :class:`trust_fast.optim.MaskedAdamW`)."""
from __future__ import annotations

from typing import TYPE_CHECKING

from ..config import TrustConfig
from .base import ForgetObjective, Localization, register_forget_objective, register_localization, register_method

if TYPE_CHECKING:
    from torch import Tensor


@register_forget_objective("anchor")
class AnchorMapping(ForgetObjective):
    """Target: eps_0(x_t, anchor), what the original model draws for the concept's anchor."""

    def target(self, u, noisy: Tensor, t: Tensor, cond: Tensor, anchor_cond: Tensor | None) -> Tensor:
        return u.denoiser.frozen_pred(noisy, t, self.anchors(anchor_cond))

    def anchors(self, anchor_cond: Tensor | None) -> Tensor:
        if anchor_cond is None:
            raise ValueError(f"the {self.name!r} forget objective needs anchor_cond (embeddings of the anchor prompts)")
        return anchor_cond


@register_localization("dynamic")
class DynamicRows(Localization):
    """TRUST's localization: the salient rows of the forget gradient, re-estimated during training
    (FSDP2: saliency gathered over the ranks, selection on whole layers, this rank's rows kept)."""

    def __init__(self, u):
        from ..localize import DynamicLocalizer
        from ..optim import MaskedAdamW

        cfg = self.config = u.config
        self.optimizer = MaskedAdamW(u.opt_params, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps,
                                     weight_decay=cfg.weight_decay, compile=cfg.compile)
        self.localizer = DynamicLocalizer(u.targets, cfg.xi, cfg.loc_interval, cfg.saliency, cfg.max_fraction,
                                          compile=cfg.compile,
                                          localize=u.sharding.localizer() if u.sharding else None)

    def select(self, step: int, weight_grads: list[Tensor]) -> list[Tensor]:
        return self.localizer(step, weight_grads)

    def state_dict(self) -> dict:
        rows = self.localizer.rows
        return {"localizer_rows": None if rows is None else [r.cpu() for r in rows], "mask": None}

    def check_state(self, f, state: dict, u) -> None:
        """The saved rows (indices below each target's row count), MaskedAdamW's own checks, and
        no row stepped more often than the run applied steps."""
        rows = f.of_type(state.get("localizer_rows"), "localizer_rows", list, none=True)
        if rows is not None:
            if len(rows) != len(u.targets):
                f.misfit("localizer rows per target", f": {len(rows)}, expected {len(u.targets)}")
            for k, (r, t) in enumerate(zip(rows, u.targets)):
                f.rows(r, f"localizer rows of target {k}", t.weight.shape[0])
        try:  # MaskedAdamW's own checks, with the file named
            u.masked_optimizer.check_state_dict(state["optimizer"])
        except ValueError as e:
            f.damaged("'optimizer':", str(e))
        f.slot_steps(state["optimizer"], state["step_count"] - state["skipped_steps"])
        mask = f.of_type(state.get("mask"), "mask", list, none=True)
        if mask is not None:
            f.tensors(mask, "SalUn mask", u.params)

    def load_state_dict(self, state: dict, u) -> None:
        if state["localizer_rows"] is not None:
            self.localizer.rows = [r.to(u.device) for r in state["localizer_rows"]]


def config(**overrides) -> TrustConfig:
    return TrustConfig(method="trust").replace(**overrides)


register_method("trust", config)
