"""Gradient accumulation and micro-batched retain losses: sums kept between the micro-batches of one
step (TrustUnlearner.accumulate), and a retain loss computed part by part on the steps that
differentiate it twice."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor


class RetainParts:
    """The retain loss of a batch as micro-batch parts, for the steps that differentiate it twice:
    each part computes its share of the mean loss (weighted by its size) and records the value.
    Called as a whole, it is the whole batch's loss in one pass."""

    def __init__(self, part: Callable[[slice], Tensor], n: int, size: int):
        self.part, self.values = part, []
        self.parts = [self._part(part, slice(i, min(i + size, n)), n) for i in range(0, n, size)]

    def _part(self, part, sl: slice, n: int):
        def run() -> Tensor:
            loss = part(sl) * ((sl.stop - sl.start) / n)
            self.values.append(loss.detach())
            return loss
        return run

    def __call__(self) -> Tensor:
        return self.part(slice(None))

    def total(self) -> Tensor:
        return torch.stack(self.values).sum()


def differentiated(retain_loss):
    """What the Hessian terms differentiate: the loss, or the functions computing its parts."""
    return retain_loss.parts if isinstance(retain_loss, RetainParts) else retain_loss


@dataclass
class Accumulated:
    """Sums over the micro-batches of one accumulated step (TrustUnlearner.accumulate)."""
    n_forget: int = 0
    n_retain: int = 0
    loss_f: Tensor | None = None
    loss_r: Tensor | None = None
    g_f: list[Tensor] | None = None
    g_r: list[Tensor] | None = None
    hv: list[Tensor] | None = None
    diag_before: tuple | None = None

    @staticmethod
    def _add(total, new):
        return list(new) if total is None else [a + b for a, b in zip(total, new)]

    def add_forget(self, loss: Tensor, grads: list[Tensor]) -> None:
        self.n_forget += 1
        self.loss_f = loss if self.loss_f is None else self.loss_f + loss
        self.g_f = self._add(self.g_f, grads)

    def add_retain(self, loss: Tensor, grads: list[Tensor], hv: list[Tensor] | None) -> None:
        self.n_retain += 1
        self.loss_r = loss if self.loss_r is None else self.loss_r + loss
        self.g_r = self._add(self.g_r, grads)
        if hv is not None:
            self.hv = self._add(self.hv, hv)

    def mean(self) -> "Accumulated":
        f, r = max(1, self.n_forget), max(1, self.n_retain)
        div = lambda ts, n: None if ts is None else [t / n for t in ts]  # noqa: E731
        return Accumulated(self.n_forget, self.n_retain,
                           None if self.loss_f is None else self.loss_f / f,
                           None if self.loss_r is None else self.loss_r / r,
                           div(self.g_f, f), div(self.g_r, r), div(self.hv, r), self.diag_before)
