"""The step: losses of a batch, then localization + Hessian term + optimizer step (update), with
gradient accumulation over micro-batches. A mixin of :class:`~trust_fast.engine.TrustUnlearner`."""
from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from .. import distributed, objectives
from ..hessian import double_backward_attention
from .accumulate import Accumulated, RetainParts, differentiated
from .report import SKIP_NO_FORGET, SKIP_NON_FINITE, SKIP_OVERFLOW, SKIP_WEIGHTS


class NonFiniteUpdate(ValueError):
    """A dense optimizer step made weights non-finite (a sparse one is rolled back instead)."""


def check_loss(name: str, loss) -> None:
    """A loss handed to update(): None, or a scalar tensor with a graph to differentiate."""
    if loss is None:
        return
    if not isinstance(loss, Tensor):
        raise TypeError(f"update: {name} must be a scalar torch.Tensor (or None), got {type(loss).__name__}")
    if loss.numel() != 1:
        raise ValueError(f"update: {name} must be a scalar, got shape {tuple(loss.shape)}")
    if not loss.requires_grad:
        raise ValueError(f"update: {name} has no graph to differentiate (computed under no_grad, or not from the "
                         "model's forward pass)")


def all_finite(tensors: list[Tensor]) -> bool:
    """True when no tensor holds a NaN or an Inf (one host sync for the whole list)."""
    flags = [torch.isfinite(t).all() for t in tensors if t.numel()]
    return bool(torch.stack(flags).all()) if flags else True


@dataclass
class _Step:
    """What the phases of one update hand each other."""
    forget_loss: Tensor
    no_forget: bool
    g_f: list[Tensor]
    skip: bool
    reason: str | None
    pre: Accumulated | None = None
    rows: list[Tensor] | None = None
    prev_rows: list[Tensor] | None = None
    keep: Callable | None = None
    retain_loss: Tensor | None = None
    diag_before: tuple | None = None
    times: list[float] = field(default_factory=list)
    t_retain_forward: float = 0.0


class UpdateMixin:
    # ------------------------------------------------------------------ losses

    def forget_loss(self, noisy: Tensor, timesteps: Tensor, cond: Tensor, anchor_cond: Tensor | None = None,
                    target: Tensor | None = None) -> Tensor:
        """The forget loss of a batch you provide.

        noisy: (N, C, H, W) noised images/latents; timesteps: (N,) int64; cond: (N, L, D) embeddings
        of the forget prompts; anchor_cond: (N, L, D) embeddings of their anchors (objectives
        "anchor" and "pseudo"; the esd objective uses the empty prompt). `target` overrides the
        regression target (computed without grad otherwise). Returns a float32 scalar, or None for
        an empty batch (N = 0: a batch of yours without forget examples; :meth:`update` skips it)."""
        if noisy.shape[0] == 0:
            return None
        if target is None:
            target = self.forget_target(noisy, timesteps, cond, anchor_cond)
        return objectives.mse(self.pred(noisy, timesteps, cond), target)

    def forget_target(self, noisy: Tensor, timesteps: Tensor, cond: Tensor, anchor_cond: Tensor | None) -> Tensor:
        """The method's forget target (trust_fast.methods: its registered ForgetObjective)."""
        return self.forget_objective.target(self, noisy, timesteps, cond, anchor_cond)

    def retain_loss(self, noisy: Tensor, timesteps: Tensor, cond: Tensor, target: Tensor | None = None,
                    x0: Tensor | None = None, noise: Tensor | None = None) -> Tensor:
        """The retain loss of a batch you provide: self-distillation against the frozen model
        ("distill"), or the ordinary diffusion loss ("diffusion", needs x0 and noise). On steps
        that differentiate it twice (Hessian term), its forward runs under the math attention backend.
        None for an empty batch (:meth:`update` then steps without the retain term)."""
        if noisy.shape[0] == 0:
            return None
        if target is None:
            if self.config.retain_objective == "diffusion":
                if x0 is None or noise is None:
                    raise ValueError("the diffusion retain objective needs x0 and noise")
                target = self.noising.target(x0, noise, timesteps)
            else:
                target = self.frozen_pred(noisy, timesteps, cond)
        if self.hessian.now(self.step_count) and self.sharding is None:
            with double_backward_attention():
                return objectives.mse(self.denoiser.pred_with(noisy, timesteps, cond, self.precision.leaves), target)
        return objectives.mse(self.pred(noisy, timesteps, cond), target)

    # ------------------------------------------------------------------ update

    def _row_keeper(self, rows: list[Tensor] | None):
        """None without selected rows, else a function taking a gradient set (one tensor per target
        param) to its selected rows: MaskedAdamW reads nothing else, so a step past localization
        holds its gradients (forget, retain, H_r Delta) on those rows only, not three full sets."""
        if rows is None:
            return None
        per_param = self._param_rows(rows)
        return lambda gs: [g.index_select(0, r) for g, r in zip(gs, per_param)]

    def accumulate(self, forget_loss: Tensor | None, retain_loss: Tensor | None = None) -> None:
        """Gradient accumulation: fold one micro-batch's losses into the current step. Call it for
        every micro-batch but the last and :meth:`update` with the last; localization, the
        Hessian term and the optimizer step then run once, on the mean forget and retain gradients
        (and Hessian products) over the micro-batches, exactly as :meth:`update` on the mean
        losses would, without holding every micro-batch's graph. Under the diag Hessian each
        retain micro-batch folds its own probes into the running estimate."""
        check_loss("forget_loss", forget_loss)
        check_loss("retain_loss", retain_loss)
        acc = self._acc = self._acc or Accumulated()
        if forget_loss is not None:
            acc.add_forget(forget_loss.detach(), self.gradients(forget_loss))
        if retain_loss is not None and self.config.alpha > 0:
            g_r, hv, before = self.hessian.retain_terms(retain_loss, self.step_count,
                                                        keep_before=acc.diag_before is None)
            acc.diag_before = acc.diag_before or before  # the state before the step's first probes
            acc.add_retain(retain_loss.detach(), g_r, hv)

    def update(self, forget_loss: Tensor | None, retain_loss: Tensor | Callable[[], Tensor | None] | None = None
               ) -> dict:
        """Localization + Hessian term + optimizer step for losses you computed (with
        :meth:`forget_loss` / :meth:`retain_loss`). Returns the step's stats (see :meth:`step`).
        A forget loss of None (a batch without forget examples) skips the step: there is nothing to
        localize on (under torch.distributed, on every rank if any rank has none).

        `retain_loss` may be a function returning it: it is then called once the forget gradient is
        taken, so the forget pass's graph is freed before the retain pass builds its own (on
        Hessian steps, the largest of the run)."""
        check_loss("forget_loss", forget_loss)
        if not callable(retain_loss):
            check_loss("retain_loss", retain_loss)
        t0 = time.perf_counter()
        retain_fn = retain_loss if callable(retain_loss) else None
        if retain_fn is not None:
            retain_loss = None
        pre = None
        if self._acc is not None:  # the last micro-batch of an accumulated step
            if retain_fn is not None:
                retain_loss, retain_fn = retain_fn(), None
            self.accumulate(forget_loss, retain_loss)
            pre, self._acc = self._acc.mean(), None
            forget_loss, retain_loss = pre.loss_f, pre.loss_r
        s = self._forget_phase(forget_loss, pre)
        s.times.append(t0)
        s.times.append(time.perf_counter())
        self._localize_phase(s)
        s.times.append(time.perf_counter())
        grads = self._retain_phase(s, retain_loss, retain_fn)
        s.times.append(time.perf_counter())
        self._apply_phase(s, grads)
        s.times.append(time.perf_counter())
        return self._stats(s)

    def _forget_phase(self, forget_loss: Tensor | None, pre: Accumulated | None) -> _Step:
        """The forget gradient, averaged over data-parallel ranks (every rank then localizes on the
        same gradient and selects the same rows); a non-finite loss or gradient on any rank skips
        the step on all ranks: weights, optimizer, localization and Hessian state stay as they were."""
        no_forget = forget_loss is None
        if no_forget:
            forget_loss = torch.zeros((), device=self.device)
            g_f = [torch.zeros_like(p) for p in self.params]
        else:
            g_f = pre.g_f if pre is not None else self.gradients(forget_loss)
        self._average(g_f)
        skip = distributed.any_rank(no_forget or not all_finite([forget_loss.detach(), *g_f]))
        reason = SKIP_NO_FORGET if no_forget else self._skip_reason(forget_loss) if skip else None
        return _Step(forget_loss, no_forget, g_f, skip, reason, pre)

    def _localize_phase(self, s: _Step) -> None:
        """The rows this step updates; from here on, gradients are held on those rows only."""
        loc = self.localization.localizer
        s.prev_rows = loc.rows if loc is not None else None
        if loc is not None and not s.skip:
            s.rows = self.localization.select(self.step_count, [s.g_f[i] for i in self._weight_pos])
            if self.sharding is None:  # a sharded localizer checks the rows of the whole layers itself
                distributed.check_same_rows(s.rows, self.step_count)
        s.keep = self._row_keeper(s.rows)
        if s.keep is not None:
            s.g_f = s.keep(s.g_f)

    def _retain_phase(self, s: _Step, retain_loss, retain_fn) -> list[Tensor]:
        """The retain loss (computed now when given as a function) and its gradient with the
        Hessian term, added to the forget gradient; a non-finite one skips the step."""
        cfg, t2 = self.config, time.perf_counter()
        hessian_now = not s.skip and cfg.alpha > 0 and cfg.hessian != "none" and self.hessian.now(self.step_count)
        # a retain pass this step computes (not one computed before, nor in parts) may run on half-precision leaves
        leaves = contextlib.ExitStack()
        wrt = leaves.enter_context(self.precision.hessian_leaves(
            retain_fn is not None and hessian_now and not isinstance(retain_fn, RetainParts)))
        if retain_fn is not None:
            if isinstance(retain_fn, RetainParts) and hessian_now:
                retain_loss = retain_fn  # computed part by part with its Hessian terms below
            else:
                retain_loss = retain_fn()
                s.t_retain_forward = time.perf_counter() - t2
        s.retain_loss, grads = retain_loss, s.g_f
        s.diag_before = s.pre.diag_before if s.pre is not None else None  # Hutchinson state to restore on a skip
        if retain_loss is not None and cfg.alpha > 0 and not s.skip:
            grads = self._retain_gradient(s, retain_fn, wrt, leaves)
        leaves.close()
        if s.skip and s.diag_before is not None:
            self.hessian.restore(s.diag_before)
        return grads

    def _retain_gradient(self, s: _Step, retain_fn, wrt, leaves) -> list[Tensor]:
        cfg, pending, keep = self.config, None, s.keep  # pending: this step's Hutchinson probes, folded in if kept
        if s.pre is not None:
            g_r, hv, s.diag_before = s.pre.g_r, s.pre.hv, s.pre.diag_before
            if keep is not None:
                g_r, hv = keep(g_r), (keep(hv) if hv is not None else None)
        elif cfg.hessian == "diag" and self.hessian.now(self.step_count):
            g_r, pending = self.hessian.probe(differentiated(s.retain_loss), keep, wrt, retain_fn)
            hv = None
        else:
            g_r, hv, s.diag_before = self.hessian.retain_terms(differentiated(s.retain_loss), self.step_count,
                                                               keep=keep, wrt=wrt)
        leaves.close()
        g_r = [g.float() for g in g_r]
        hv = [h.float() for h in hv] if hv is not None else None
        if isinstance(s.retain_loss, RetainParts):
            s.retain_loss = s.retain_loss.total()
        diags = self.hessian.hutchinson.diags if s.diag_before is not None else []
        for tensors in (hv, diags or None, g_r):
            if tensors is not None:
                self._average(tensors)
        fresh = [*g_r, *(hv or []), *diags, *(h for _, hz in pending or [] for h in hz)]
        s.skip = distributed.any_rank(not all_finite([s.retain_loss.detach(), *fresh]))
        if s.skip:
            s.reason = self._skip_reason(s.retain_loss)
            if self.localization.localizer is not None:
                self.localization.localizer.rows = s.prev_rows
            s.rows = None
            return s.g_f
        if pending is not None:
            self.hessian.hutchinson.fold(pending)
            self._average(self.hessian.hutchinson.diags)
        if s.diag_before is not None or pending is not None:
            self.hessian.set_penalty()
        # in place: a dense step holds at most two gradient sets (three were 10 GB for SalUn on SD-1.5)
        grads = [gf.add_(gr, alpha=cfg.alpha) for gf, gr in zip(s.g_f, g_r)]
        if hv is not None:
            grads = [g.add_(h, alpha=cfg.lam) for g, h in zip(grads, hv)]
        s.pre = None
        return grads

    def _apply_phase(self, s: _Step, grads: list[Tensor]) -> None:
        """The optimizer step on the selected rows (or every row), checked: a step that makes a
        weight or moment non-finite is rolled back and counted as skipped."""
        if not s.skip:
            if s.keep is not None:  # the selected rows' gradients into otherwise zero gradients
                for p, g, r in zip(self.opt_params, grads, self._param_rows(s.rows)):
                    p.grad = torch.zeros_like(p).index_copy_(0, r, g.to(p.dtype))
            else:
                for p, g in zip(self.opt_params, grads):
                    p.grad = g.to(p.dtype)
            snapshot = None
            if s.rows is not None:
                opt = dict(zip(map(id, self.params), self.opt_params))
                self.masked_optimizer.set_rows({opt[id(p)]: r for t, r in zip(self.targets, s.rows) for p in t.params})
                snapshot = self.masked_optimizer.snapshot_rows()
            else:
                self.hessian.add_dense_penalty()
                self.localization.mask_gradients(self.opt_params)
            self.optimizer.step()
            for p in self.opt_params:
                p.grad = None
            self.precision.refresh_from_master(None if s.rows is None else self._param_rows(s.rows))
            if not self._updated_rows_finite(s.rows):
                self._undo_update(s.rows, snapshot)
                if self.localization.localizer is not None:
                    self.localization.localizer.rows = s.prev_rows
                s.skip, s.reason, s.rows = True, SKIP_WEIGHTS, None
        self.precision.update_loss_scale(s.skip and s.reason != SKIP_WEIGHTS)
        if s.skip:
            self.record.skipped(s.reason)

    def _stats(self, s: _Step) -> dict:
        t0, t1, t2, t3, t4 = s.times
        n_sel = (0 if s.skip else self.total_rows if s.rows is None
                 else self.sharding.selected if self.sharding is not None else sum(r.numel() for r in s.rows))
        self.selected_rows = s.rows if s.rows is not None else []
        stats = {"step": self.step_count, "loss_forget": None if s.no_forget else float(s.forget_loss.detach()),
                 "loss_retain": float(s.retain_loss.detach()) if s.retain_loss is not None else None,
                 "selected_rows": n_sel, "selected_fraction": n_sel / max(1, self.total_rows), "skipped": s.skip,
                 **({"skip_reason": s.reason} if s.skip else {}),
                 **({"loss_scale": self.loss_scale} if self.loss_scale is not None else {}),
                 "time_forget_backward": t1 - t0, "time_localize": t2 - t1,
                 "time_retain_backward": t3 - t2 - s.t_retain_forward, "time_retain_forward": s.t_retain_forward,
                 "time_optimizer": t4 - t3}
        self.record.step_count += 1
        return stats

    def _skip_reason(self, loss: Tensor) -> str:
        """Why a step with a non-finite loss or gradient is skipped: under a float16 loss scale a
        finite loss with non-finite gradients is an overflow the lowered scale fixes."""
        if self.loss_scale is not None and bool(torch.isfinite(loss.detach()).all()):
            return SKIP_OVERFLOW
        return SKIP_NON_FINITE

    @torch.no_grad()
    def _updated_rows_finite(self, rows: list[Tensor] | None) -> bool:
        """Whether the weights this step updated are finite: the selected rows (of the float32
        masters and the model's half-precision copies), every target weight after a dense step.
        One host sync; all ranks agree."""
        master = self.precision.master
        if rows is not None:
            flags = [self.masked_optimizer.set_rows_finite()]
            if master is not None:
                flags += [torch.isfinite(p.index_select(0, r)).all()
                          for t, r in zip(self.targets, rows) if r.numel() for p in t.params]
            ok = bool(torch.stack(flags).all())
        else:
            ok = all_finite([*self.opt_params, *(self.params if master is not None else [])])
        return not distributed.any_rank(not ok)

    @torch.no_grad()
    def _undo_update(self, rows: list[Tensor] | None, snapshot: list | None) -> None:
        """Roll back a step whose update made weights non-finite: the selected rows and their
        optimizer state as they were (a copy the size of the selection, taken before the step). A
        dense optimizer's state is the size of the model and is not copied every step: its run stops."""
        if snapshot is None:
            raise NonFiniteUpdate(f"step {self.step_count} made target weights non-finite (NaN or Inf) with a dense "
                                  f"optimizer, which cannot be rolled back; the run stops (lower lr, now "
                                  f"{self.config.lr:g})")
        self.masked_optimizer.undo_step(snapshot)
        self.precision.refresh_from_master(self._param_rows(rows))
