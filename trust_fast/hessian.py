"""Second-order regularizer R = (lambda/2) Delta^T H_r Delta on the retain loss, Delta = theta - theta_0.

Two estimators of grad R = lambda * H_r Delta:

- ``hvp``: exact Hessian-vector product by double backward of the retain loss.
- ``diag``: a Hutchinson estimate of diag(H_r) (mean of z * H_r z over Rademacher probes z),
  refreshed every few steps; the penalty lambda * h * Delta is then fused into the optimizer.

Double backward does not run through PyTorch's fused scaled-dot-product-attention kernels, so the
forward pass whose graph is differentiated twice must run under :func:`double_backward_attention`.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch
from torch import Tensor

from . import ops

HESSIAN_MODES = ("hvp", "diag", "none")


@contextlib.contextmanager
def double_backward_attention() -> Iterator[None]:
    """Route scaled-dot-product attention to the math backend, which supports double backward."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel(SDPBackend.MATH):
        yield


def grad_and_hvps(loss: Tensor, params: Sequence[Tensor], vectors: Sequence[Sequence[Tensor]]
                  ) -> tuple[list[Tensor], list[list[Tensor]]]:
    """Gradient of `loss` w.r.t. `params` and the products H v for each list v in `vectors`.

    `loss` must have been computed with grad enabled (and attention under
    :func:`double_backward_attention`). Each v matches `params` in shapes. Returns detached tensors;
    a parameter the loss does not depend on gets zeros."""
    params = list(params)
    grads = torch.autograd.grad(loss, params, create_graph=True, allow_unused=True)
    grads = [g if g is not None else torch.zeros_like(p) for g, p in zip(grads, params)]
    out = []
    for i, v in enumerate(vectors):
        dot = sum((g * vi.to(g.dtype)).sum() for g, vi in zip(grads, v) if g.requires_grad)
        if not isinstance(dot, Tensor):  # the loss is linear in params: H = 0
            out.append([torch.zeros_like(p) for p in params])
            continue
        hv = torch.autograd.grad(dot, params, retain_graph=i < len(vectors) - 1, allow_unused=True)
        out.append([h.detach() if h is not None else torch.zeros_like(p) for h, p in zip(hv, params)])
    return [g.detach() for g in grads], out


def hvp(loss_fn, params: Sequence[Tensor], vector: Sequence[Tensor]) -> list[Tensor]:
    """H v of the scalar `loss_fn()` at the current parameters (runs the forward itself, under the
    math attention backend)."""
    with torch.enable_grad(), double_backward_attention():
        loss = loss_fn()
    return grad_and_hvps(loss, params, [vector])[1][0]


class HutchinsonDiagonal:
    """Running Hutchinson estimate of diag(H) for a list of parameters, per element, float32.

    Each :meth:`update` folds `samples` probes into the running mean through the
    ``hutchinson_diag_`` op. :meth:`penalty` gives the non-negative diagonal the optimizer uses
    (a single probe can give negative entries; a negative curvature penalty would push weights
    away from the original, so it is clipped at zero)."""

    def __init__(self, params: Sequence[Tensor], generator: torch.Generator | None = None):
        self.params = list(params)
        self.diags = [torch.zeros(p.shape, dtype=torch.float32, device=p.device) for p in self.params]
        self.count = 0
        self.generator = generator
        self._penalty: list[Tensor] | None = None

    def update(self, loss: Tensor, samples: int = 1, scale: float | None = None) -> list[Tensor]:
        """Fold `samples` probes of the Hessian of `loss` into the estimate; returns grad of `loss`.
        `scale` (float16 loss scaling): differentiate ``loss * scale`` and divide the gradient and
        the Hessian products by it, in float32, before anything is folded in."""
        grads, pending = self.probe(loss, samples, scale)
        self.fold(pending)
        return grads

    def probe(self, loss: Tensor, samples: int = 1, scale: float | None = None
              ) -> tuple[list[Tensor], list[tuple[list[Tensor], list[Tensor]]]]:
        """(grad of `loss`, [(z, H z) per probe]) without touching the estimate: a caller that may
        discard the probes (a skipped step) folds them with :meth:`fold` once they are kept,
        instead of holding a copy of the estimate to restore."""
        probes = [ops.rademacher_like(self.params, self.generator) for _ in range(samples)]
        grads, hzs = grad_and_hvps(loss if scale is None else loss * scale, self.params, probes)
        if scale is not None:
            grads = [g.float() / scale for g in grads]
            hzs = [[h.float() / scale for h in hz] for hz in hzs]
            probes = [[zz.float() for zz in z] for z in probes]  # +-1: exact in float32
        return grads, list(zip(probes, hzs))

    def fold(self, pending: list[tuple[list[Tensor], list[Tensor]]]) -> None:
        """Fold probes from :meth:`probe` into the running mean."""
        for z, hz in pending:
            ops.hutchinson_diag_(self.diags, hz, z, None, self.count)
            self.count += 1

    def penalty(self) -> list[Tensor]:
        """max(diag, 0), written into the same buffers on every call: an optimizer holding the
        previous penalty sees the new one without a second copy in memory."""
        if self._penalty is None:
            self._penalty = [torch.empty_like(d) for d in self.diags]
        for d, out in zip(self.diags, self._penalty):
            torch.clamp(d, min=0, out=out)
        return self._penalty

    def state_bytes(self) -> int:
        return sum(d.numel() * d.element_size() for d in self.diags + (self._penalty or []))
