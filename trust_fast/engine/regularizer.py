"""The Hessian regularizer of the retain loss: lambda * H_r Delta (hvp) or the Hutchinson diagonal
penalty lambda * max(h, 0) * Delta (diag), Delta = current minus original target weights.

On the steps that differentiate the retain loss twice (every hvp_interval steps after the first
for hvp; every diag_interval steps for diag) the retain gradient comes with the Hessian term; on
the others it is an ordinary gradient. Under FSDP2 the diag probes are finite differences of the
retain gradient."""
from __future__ import annotations

import torch
from torch import Tensor

from ..hessian import HutchinsonDiagonal, double_backward_attention, grad_and_hvps, scaled

SHARDED_HESSIAN_NEEDS_FN = (
    "under FSDP2 the Hessian steps take finite differences of the retain gradient, which needs the retain loss "
    "as a function that recomputes it: on those steps call update(forget_loss, lambda: unlearner.retain_loss(...)) "
    "(not accumulate(), nor a computed loss)")


class HessianTerm:
    """The regularizer's schedule and state (the Hutchinson diagonal) for the unlearner `u`
    (its params, float32 opt_params, theta0, precision, sharding and generator)."""

    def __init__(self, u):
        self.u, self.config = u, u.config
        cfg = u.config
        self.hutchinson = (HutchinsonDiagonal(u.params, u.generator, getattr(torch, cfg.hessian_dtype))
                           if cfg.hessian == "diag" else None)

    @property
    def mode(self) -> str:
        """hvp | diag | none, as the config says now."""
        return self.config.hessian

    def now(self, step: int) -> bool:
        """Whether step `step` differentiates the retain loss twice."""
        cfg = self.config
        return ((self.mode == "hvp" and step % cfg.hvp_interval == 0 and step > 0)
                or (self.mode == "diag" and step % cfg.diag_interval == 0))

    def grad_and_hvp(self, loss: Tensor, keep=None, wrt=None) -> tuple[list[Tensor], list[Tensor]]:
        """Retain gradient and H_r Delta (Delta from the float32 masters when there are any),
        unscaled, both passed through `keep`; differentiated w.r.t. `wrt` (default the params)."""
        u, keep = self.u, keep or list
        delta = [q.detach() - p0.to(q.dtype) for q, p0 in zip(u.opt_params, u.theta0)]
        g_r, (hv,) = grad_and_hvps(scaled(loss, u.precision.loss_scale), wrt or u.params, [delta], keep)
        return u.precision.unscale(g_r), u.precision.unscale(keep(hv))

    def finite_difference_probes(self, retain_loss: Tensor, retain_fn, keep):
        """FSDP2's Hutchinson probes: (retain gradient through `keep`, [(z, H z)]) with
        H z = (g(theta + eps z) - g(theta)) / eps, eps = config.hessian_fd_eps, each z drawn on this
        rank's rows (the ranks' draws make one probe of the whole weights) and the retain loss
        recomputed by `retain_fn` at the shifted weights; the weights are restored bit for bit."""
        if retain_fn is None:
            raise ValueError(SHARDED_HESSIAN_NEEDS_FN)
        u, eps = self.u, self.config.hessian_fd_eps
        g0 = u.gradients(retain_loss)
        pending = []
        for z in self.hutchinson.draw(self.config.diag_samples):
            # a generator: one shifted tensor at a time, not a second full copy beside swapped()'s own
            with u.sharding.swapped(u.params, (p + eps * z.tensor(i, p.dtype) for i, p in enumerate(u.params))):
                g1 = u.gradients(retain_fn())
            pending.append((z, [(a - b).div_(eps) for a, b in zip(g1, g0)]))
            del g1
        return (g0 if keep is None else keep(g0)), pending

    def retain_terms(self, retain_loss: Tensor, step: int, keep_before: bool = True, keep=None, wrt=None):
        """(retain gradient, H_r Delta or None, Hutchinson state before new probes or None) of one
        retain loss at step `step`: the hvp and diag terms on the steps that differentiate twice.
        `keep` maps the gradient and H_r Delta to what is returned of them (the selected rows)."""
        u = self.u
        if not self.now(step) or self.mode == "none":
            g_r = u.gradients(retain_loss)
            return (g_r if keep is None else keep(g_r)), None, None
        if u.sharding is not None:
            raise ValueError(SHARDED_HESSIAN_NEEDS_FN)
        # the backward passes run under the forward's attention backend too: gradient checkpointing
        # recomputes the forward there
        with double_backward_attention():
            if self.mode == "hvp":
                g_r, hv = self.grad_and_hvp(retain_loss, keep, wrt)
                return g_r, hv, None
            before = self.snapshot() if keep_before else None
            return self.hutchinson.update(retain_loss, self.config.diag_samples, u.precision.loss_scale), None, before

    def probe(self, retain_loss, keep, wrt, retain_fn):
        """A diag step's retain gradient (through `keep`) and its pending probes, folded in only if
        the step is kept (FSDP2: finite differences, which recompute the loss with `retain_fn`)."""
        if self.u.sharding is not None:
            return self.finite_difference_probes(retain_loss, retain_fn, keep)
        with double_backward_attention():
            return self.hutchinson.probe(retain_loss, self.config.diag_samples, self.u.precision.loss_scale, keep,
                                         wrt=wrt)

    def snapshot(self) -> tuple | None:
        h = self.hutchinson
        return None if h is None else ([d.clone() for d in h.diags], h.count)

    def restore(self, snapshot: tuple) -> None:
        """A skipped step leaves no Hessian probes behind."""
        for d, old in zip(self.hutchinson.diags, snapshot[0]):
            d.copy_(old)
        self.hutchinson.count = snapshot[1]

    def set_penalty(self) -> None:
        """MaskedAdamW's fused penalty reads the running estimate itself (its kernels clamp h at 0)."""
        u = self.u
        if u.localization.sparse:
            u.masked_optimizer.set_penalty({p: (hp, p0) for p, hp, p0 in
                                            zip(u.opt_params, self.hutchinson.diags, u.theta0)}, self.config.lam)

    def add_dense_penalty(self) -> None:
        """Dense optimizers have no fused penalty: add lam * max(h, 0) * Delta to the gradients."""
        if self.hutchinson is None or self.hutchinson.count == 0:
            return
        for p, hp, p0 in zip(self.u.opt_params, self.hutchinson.diags, self.u.theta0):
            p.grad.add_(self.config.lam * hp.clamp(min=0).to(p.dtype) * (p.detach() - p0.to(p.dtype)))

    # ------------------------------------------------------------- state

    def state_dict(self) -> dict:
        h = self.hutchinson
        return {"hutchinson": None if h is None else {"diags": [d.cpu() for d in h.diags], "count": h.count}}

    def check_state(self, f, state: dict) -> None:
        if self.hutchinson is None:
            return
        hutch = f.of_type(state.get("hutchinson"), "hutchinson", dict, none=True)
        if hutch is not None:
            f.count(hutch.get("count"), "hutchinson.count", 0, state["step_count"] * self.config.diag_samples)
            f.tensors(hutch.get("diags"), "Hessian diagonal", self.hutchinson.diags, floating=True)

    @torch.no_grad()
    def load_state_dict(self, state: dict) -> None:
        if self.hutchinson is None or state["hutchinson"] is None:
            return
        for d, v in zip(self.hutchinson.diags, state["hutchinson"]["diags"], strict=True):
            d.copy_(v.to(d.device))
        self.hutchinson.count = state["hutchinson"]["count"]
        if self.hutchinson.count > 0:
            self.set_penalty()


__all__ = ["HessianTerm", "SHARDED_HESSIAN_NEEDS_FN"]
