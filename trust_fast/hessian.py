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
from collections.abc import Callable, Iterator, Sequence

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


class RademacherProbe:
    """A Hutchinson probe (one +-1 tensor per parameter) kept as a seed: each tensor is drawn when it is
    needed (the dot product's forward and backward, the fold), so a probe never holds a full set of
    parameters in memory (0.72 GB for SD-1.5's default targets)."""

    def __init__(self, like: Sequence[Tensor], seed: int):
        self.like, self.seed = list(like), int(seed)

    def __len__(self) -> int:
        return len(self.like)

    def tensor(self, i: int, dtype: torch.dtype | None = None) -> Tensor:
        t = self.like[i]
        gen = torch.Generator(device=t.device).manual_seed((self.seed + i * 0x9E3779B97F4A7C15) % 2 ** 63)
        z = ops.rademacher_like([t], gen)[0]
        return z if dtype is None else z.to(dtype)


class _ProbeDot(torch.autograd.Function):
    """<g, z> for the i-th tensor of a :class:`RademacherProbe`, saving only the probe's seed: the
    backward draws z again instead of the graph holding it."""

    @staticmethod
    def forward(ctx, g: Tensor, probe: RademacherProbe, i: int) -> Tensor:
        ctx.probe, ctx.i = probe, i
        return (g * probe.tensor(i, g.dtype)).sum()

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        return grad_out * ctx.probe.tensor(ctx.i, grad_out.dtype), None, None


def _dot(grads: Sequence[Tensor], v) -> Tensor | None:
    """sum_i <grads[i], v[i]> over the gradients that depend on the params (None if none does)."""
    terms = [_ProbeDot.apply(g, v, i) if isinstance(v, RademacherProbe) else (g * v[i].to(g.dtype)).sum()
             for i, g in enumerate(grads) if g.requires_grad]
    return sum(terms) if terms else None


def grad_and_hvps(loss: Tensor | Sequence[Callable[[], Tensor]], params: Sequence[Tensor], vectors: Sequence,
                  keep=None) -> tuple[list[Tensor], list[list[Tensor]]]:
    """Gradient of `loss` w.r.t. `params` and the products H v for each v in `vectors` (a list of
    tensors shaped like `params`, or a :class:`RademacherProbe`).

    `loss` must have been computed with grad enabled (and attention under
    :func:`double_backward_attention`). It may also be a list of functions, each computing one
    part of it (a micro-batch's share of a mean loss): the parts are computed and differentiated
    one at a time with the same vectors and their results summed, which is the same gradient and
    products with the activations of one part in memory. `keep`, if given, maps the detached
    gradients to what is returned for them (say their selected rows) before the products are
    computed, so the full gradients are freed first. Returns detached tensors; a parameter the
    loss does not depend on gets zeros."""
    params = list(params)
    if not isinstance(loss, Tensor):
        return _grad_and_hvps_in_parts(loss, params, vectors, keep)
    grads = torch.autograd.grad(loss, params, create_graph=True, allow_unused=True)
    grads = [g if g is not None else torch.zeros_like(p) for g, p in zip(grads, params)]
    dots = [_dot(grads, v) for v in vectors]  # they hold the probes' seeds or v, not the gradients
    kept = [g.detach() for g in grads]
    kept = kept if keep is None else keep(kept)
    del grads
    out = []
    for i, dot in enumerate(dots):
        if dot is None:  # the loss is linear in params: H = 0
            out.append([torch.zeros_like(p) for p in params])
            continue
        hv = torch.autograd.grad(dot, params, retain_graph=i < len(dots) - 1, allow_unused=True)
        out.append([h.detach() if h is not None else torch.zeros_like(p) for h, p in zip(hv, params)])
    return kept, out


def _grad_and_hvps_in_parts(parts: Sequence[Callable[[], Tensor]], params: list[Tensor], vectors: Sequence, keep
                            ) -> tuple[list[Tensor], list[list[Tensor]]]:
    """:func:`grad_and_hvps` of a loss given as parts. The first product accumulates in the
    params' ``.grad`` (autograd adds each part's share in place), so the parts cost no second set of
    products in memory; the params' own ``.grad`` is put back afterwards."""
    own = [p.grad for p in params]
    kept = rest = None
    try:
        for p in params:
            p.grad = None
        for part in parts:
            loss = part()
            grads = torch.autograd.grad(loss, params, create_graph=True, allow_unused=True)
            grads = [g if g is not None else torch.zeros_like(p) for g, p in zip(grads, params)]
            dots = [_dot(grads, v) for v in vectors]
            k = [g.detach() for g in grads]
            k = k if keep is None else keep(k)
            kept = k if kept is None else [a.add_(b) for a, b in zip(kept, k)]
            del grads, k, loss
            for i, dot in enumerate(dots):
                if dot is None:
                    continue
                last = i == len(dots) - 1
                if i == 0:
                    torch.autograd.backward(dot, inputs=params, retain_graph=not last)
                    continue
                hv = torch.autograd.grad(dot, params, retain_graph=not last, allow_unused=True)
                hv = [h.detach() if h is not None else torch.zeros_like(p) for h, p in zip(hv, params)]
                rest = rest or {}
                rest[i] = hv if i not in rest else [a.add_(b) for a, b in zip(rest[i], hv)]
                del hv
        first = [p.grad.detach() if p.grad is not None else torch.zeros_like(p) for p in params]
        out = [first] + [(rest or {}).get(i) or [torch.zeros_like(p) for p in params] for i in range(1, len(vectors))]
        return kept, out[:len(vectors)]
    finally:
        for p, g in zip(params, own):
            p.grad = g


def hvp(loss_fn, params: Sequence[Tensor], vector: Sequence[Tensor]) -> list[Tensor]:
    """H v of the scalar `loss_fn()` at the current parameters (runs the forward itself, under the
    math attention backend)."""
    with torch.enable_grad(), double_backward_attention():
        loss = loss_fn()
    return grad_and_hvps(loss, params, [vector])[1][0]


def scaled(loss, scale: float | None):
    """``loss * scale`` for a loss or a list of functions computing its parts (see
    :func:`grad_and_hvps`); `loss` itself when scale is None."""
    if scale is None:
        return loss
    if isinstance(loss, Tensor):
        return loss * scale
    return [lambda part=part: part() * scale for part in loss]


class HutchinsonDiagonal:
    """Running Hutchinson estimate of diag(H) for a list of parameters, per element, stored in
    `dtype` (float32, or bfloat16 for half the memory: the ops fold and read it with float32
    math, and one probe's own noise is far above bfloat16's 0.4% rounding).

    Each :meth:`update` folds `samples` probes into the running mean through the
    ``hutchinson_diag_`` op. The optimizer's fused penalty reads :attr:`diags` as they are: its
    kernels use max(h, 0) (a single probe can give negative entries, and a negative curvature
    penalty would push weights away from the original), so no clamped copy is held."""

    def __init__(self, params: Sequence[Tensor], generator: torch.Generator | None = None,
                 dtype: torch.dtype = torch.float32):
        self.params = list(params)
        self.diags = [torch.zeros(p.shape, dtype=dtype, device=p.device) for p in self.params]
        self.count = 0
        self.generator = generator

    def update(self, loss: Tensor, samples: int = 1, scale: float | None = None) -> list[Tensor]:
        """Fold `samples` probes of the Hessian of `loss` into the estimate; returns grad of `loss`.
        `scale` (float16 loss scaling): differentiate ``loss * scale`` and divide the gradient and
        the Hessian products by it, in float32, before anything is folded in."""
        grads, pending = self.probe(loss, samples, scale)
        self.fold(pending)
        return grads

    def probe(self, loss: Tensor | Sequence[Callable[[], Tensor]], samples: int = 1, scale: float | None = None,
              keep=None, wrt: Sequence[Tensor] | None = None
              ) -> tuple[list[Tensor], list[tuple[RademacherProbe, list[Tensor]]]]:
        """(grad of `loss`, [(z, H z) per probe]) without touching the estimate: a caller that may
        discard the probes (a skipped step) folds them with :meth:`fold` once they are kept,
        instead of holding a copy of the estimate to restore. `loss` (a loss or the functions
        computing its parts) and `keep` as in :func:`grad_and_hvps`. `wrt`: the tensors to
        differentiate w.r.t. in place of the params (the same values in another dtype, say
        half-precision leaves the loss was computed on); the products come back in their dtype."""
        probes = self.draw(samples)
        grads, hzs = grad_and_hvps(scaled(loss, scale), self.params if wrt is None else list(wrt), probes, keep)
        if scale is not None:
            grads = [g.float() / scale for g in grads]
            hzs = [[h.float() / scale for h in hz] for hz in hzs]
        return grads, list(zip(probes, hzs))

    def draw(self, samples: int = 1) -> list[RademacherProbe]:
        """`samples` new probes shaped like the params (seeds from the estimator's generator)."""
        seeds = torch.randint(0, 2 ** 62, (samples,), generator=self.generator,
                              device=self.generator.device if self.generator is not None else "cpu")
        return [RademacherProbe(self.params, int(s)) for s in seeds.tolist()]

    def fold(self, pending: list[tuple[RademacherProbe, list[Tensor]]], chunk: int = 1 << 24) -> None:
        """Fold probes from :meth:`probe` into the running mean, drawing each probe tensor again
        (about `chunk` elements of it at a time)."""
        for z, hz in pending:
            start = size = 0
            for i, h in enumerate(hz):
                size += h.numel()
                if size >= chunk or i == len(hz) - 1:
                    idx = range(start, i + 1)
                    ops.hutchinson_diag_([self.diags[k] for k in idx], [hz[k] for k in idx],
                                         [z.tensor(k, hz[k].dtype) for k in idx], None, self.count)
                    start, size = i + 1, 0
            self.count += 1

    def state_bytes(self) -> int:
        return sum(d.numel() * d.element_size() for d in self.diags)
