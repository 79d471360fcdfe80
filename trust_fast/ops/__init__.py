"""The op layer: ``torch.ops.trust_fast.*`` and the Python functions the engine calls.

Ops (one schema each, fake kernels for torch.compile, kernels per backend):

- :func:`row_saliency`   per-row mean |g| or |g*w| of many tensors, one flat float32 vector
- :func:`select_rows`    per-tensor z-score threshold (optional cap) -> row indices
- :func:`masked_adamw_`  in-place AdamW on selected rows of many params, compact slot state
- :func:`hutchinson_diag_`  running-mean Hutchinson estimate z*Hz of a Hessian diagonal

Backends: reference (pure torch), cpp (CPU), cuda, triton; see :mod:`.registry`.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from torch import Tensor

from . import library as _library  # registers kernels and backends
from . import checks, reference
from .registry import BACKEND_NAMES, available_backends, backend_for, use_backend

__all__ = [
    "BACKEND_NAMES",
    "available_backends",
    "backend_for",
    "use_backend",
    "row_saliency",
    "select_rows",
    "masked_adamw_",
    "hutchinson_diag_",
    "rademacher_like",
    "reference",
]


def _as_list(xs: Iterable[Tensor] | None) -> list[Tensor] | None:
    """An iterable of tensors (a tuple, a generator, a ParameterList) as a list; a list, None or
    anything else (a tensor, a number) as it is, for the checks to name."""
    if isinstance(xs, (list, Tensor)) or not isinstance(xs, Iterable):
        return xs
    return list(xs)


def _checking() -> bool:
    """Whether the Python-level argument checks run: not while torch.compile traces, when the ops'
    schemas type the arguments and the kernels check their values at run time."""
    return not torch.compiler.is_compiling()


def _detached(xs: list[Tensor]) -> list[Tensor]:
    """``xs`` itself when no tensor in it requires grad (the common case: no new objects)."""
    if any(isinstance(x, Tensor) and x.requires_grad for x in xs):
        return [x.detach() if isinstance(x, Tensor) else x for x in xs]
    return xs


def row_saliency(
    tensors: Sequence[Tensor], weights: Sequence[Tensor] | None = None, mode: str = "g"
) -> Tensor:
    """Per output row saliency of many weight-shaped tensors in one pass.

    Args:
        tensors: gradients, each (rows, ...) - 2-D Linear, 4-D Conv2d or 1-D;
            float32/float16/bfloat16, all on one device.
        weights: same shapes and dtypes as ``tensors``; needed for mode "gw".
        mode: "g" -> mean |g| over the rest of each row; "gw" -> mean |g * w|.

    Returns:
        float32 vector of length sum(rows), rows of tensor 0 first, on the
        tensors' device.  Accumulation is float32 whatever the input dtype.
    """
    tensors, weights = _as_list(tensors), _as_list(weights)
    if _checking():
        checks.check_types("row_saliency", tensors=tensors, weights=weights)
        checks.check_saliency_mode(mode, weights)
    if not tensors:
        reference.check_row_saliency(tensors, weights, mode)
        return torch.zeros(0, dtype=torch.float32)
    tensors = [t.detach() for t in tensors]
    weights = None if weights is None else [w.detach() for w in weights]
    return torch.ops.trust_fast.row_saliency(tensors, weights, mode)


def select_rows(
    scores: Tensor, rows_per_tensor: Sequence[int], xi: float, max_fraction: float | None = None
) -> list[Tensor]:
    """Rows whose z-score within their tensor exceeds ``xi``.

    Args:
        scores: float32 (sum(rows_per_tensor),), e.g. from :func:`row_saliency`.
        rows_per_tensor: rows of each tensor, in the order of ``scores``.
        xi: z-score threshold; z = (s - mean) / std with the population std in float64.
        max_fraction: keep at most floor(max_fraction * rows) highest-scoring rows per tensor.

    Returns:
        one int64 tensor of row indices per tensor, ascending, on the scores'
        device.  A tensor whose scores are all equal selects nothing.  The op has
        no compiled kernel: every backend runs the same vectorised torch.

    Raises:
        ValueError naming the tensor when a score is NaN or +-Inf (its z-scores
        are undefined), TypeError/ValueError naming any other bad argument.
    """
    if _checking():
        checks.check_types("select_rows", scores=scores, rows_per_tensor=rows_per_tensor, xi=xi,
                           max_fraction=max_fraction)
    return list(
        torch.ops.trust_fast.select_rows(
            scores.detach(), [int(n) for n in rows_per_tensor], float(xi),
            None if max_fraction is None else float(max_fraction),
        )
    )


def masked_adamw_(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    exp_avgs: Sequence[Tensor],
    exp_avg_sqs: Sequence[Tensor],
    steps: Sequence[Tensor],
    rows: Sequence[Tensor],
    slots: Sequence[Tensor],
    *,
    lr: float,
    beta1: float = 0.9,
    beta2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    hess: Sequence[Tensor] | None = None,
    ref_params: Sequence[Tensor] | None = None,
    lam: float = 0.0,
) -> None:
    """In-place AdamW on rows ``rows[i]`` of ``params[i]``, all tensors in one launch.

    For each param i, with R rows of C = numel / R elements (a 1-D bias has C = 1):

    - params[i]: (R, ...) float32/float16/bfloat16, contiguous; updated in place
      on the given rows only (other rows untouched bit for bit); math in float32.
    - grads[i]: same shape and dtype as params[i].
    - exp_avgs[i], exp_avg_sqs[i]: float32 (S, C) compact state; row rows[i][k]
      uses slot slots[i][k].  Updated in place.
    - steps[i]: float32 (S,) per-slot step counts, incremented for the used slots;
      bias correction of a row uses its own slot's count.
    - rows[i], slots[i]: int32/int64 (n,), in range, no duplicates.
    - hess[i]: optional float32 or bfloat16 Hessian diagonal (read as float32), param shape
      (per element) or (R,) (per row);
      with ref_params[i] (param shape and dtype) it adds lam * max(hess, 0) * (p - ref) to the
      gradient (a negative curvature estimate adds no penalty; NaN stays NaN).

    Formulas are torch.optim.AdamW's (decoupled weight decay, bias correction).
    """
    params, grads, exp_avgs, exp_avg_sqs, steps, rows, slots, hess, ref_params = [
        _as_list(xs) for xs in (params, grads, exp_avgs, exp_avg_sqs, steps, rows, slots, hess, ref_params)
    ]
    if _checking():
        checks.check_types(
            "masked_adamw_", params=params, grads=grads, exp_avgs=exp_avgs, exp_avg_sqs=exp_avg_sqs, steps=steps,
            rows=rows, slots=slots, hess=hess, ref_params=ref_params, lr=lr, beta1=beta1, beta2=beta2, eps=eps,
            weight_decay=weight_decay, lam=lam,
        )
    args = (
        params, _detached(grads), exp_avgs, exp_avg_sqs, steps, rows, slots, float(lr), float(beta1), float(beta2),
        float(eps), float(weight_decay), hess, None if ref_params is None else _detached(ref_params), float(lam),
    )
    if not params:  # nothing to update; the op needs a tensor to dispatch on
        reference.check_masked_adamw(*args)
        return
    with torch.no_grad():
        if _library.can_route_directly(params, grads):
            _library.route_masked_adamw(*args)
        else:
            torch.ops.trust_fast.masked_adamw_(*args)


def hutchinson_diag_(
    diags: Sequence[Tensor],
    hz: Sequence[Tensor],
    z: Sequence[Tensor],
    rows: Sequence[Tensor] | None = None,
    count: int = 0,
) -> None:
    """Fold one Hutchinson sample into running-mean Hessian-diagonal estimates, in place.

    ``diag <- diag * count/(count+1) + z*Hz/(count+1)``, where ``count`` is the number
    of samples already in the estimate (0 for the first, which overwrites exactly, whatever
    the diag held: NaN and Inf included).

    Args:
        diags: float32 or bfloat16 (float32 math, rounded to nearest once per store), per element
            (param shape) or per row ((R,): the row mean of z*Hz).
        hz: Hessian-vector products H z, param shape, float32/float16/bfloat16.
        z: the probe vectors (Rademacher, see :func:`rademacher_like`), same shape and dtype as hz.
        rows: optional int32/int64 row indices per tensor; only those rows are updated.
        count: samples already averaged into ``diags``.
    """
    diags, hz, z, rows = [_as_list(xs) for xs in (diags, hz, z, rows)]
    if _checking():
        checks.check_types("hutchinson_diag_", diags=diags, hz=hz, z=z, rows=rows, count=count)
    if not diags:  # nothing to update; the op needs a tensor to dispatch on
        reference.check_hutchinson_diag(diags, hz, z, rows, int(count))
        return
    with torch.no_grad():
        torch.ops.trust_fast.hutchinson_diag_(
            diags, [h.detach() for h in hz], [t.detach() for t in z], rows, int(count),
        )


def rademacher_like(
    tensors: Sequence[Tensor], generator: torch.Generator | None = None
) -> list[Tensor]:
    """Random +-1 tensors shaped like ``tensors`` (same dtype and device): Hutchinson probes."""
    tensors = _as_list(tensors)
    if _checking():
        checks.check_rademacher_like(tensors, generator)
    out = []
    for t in tensors:
        bits = torch.randint(0, 2, t.shape, device=t.device, generator=generator, dtype=torch.int8)
        out.append((bits * 2 - 1).to(t.dtype))
    return out
