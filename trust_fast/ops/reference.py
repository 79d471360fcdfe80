"""Pure-PyTorch reference backend: the test oracle.

Plain indexing and float32 math, written to be read, not to be fast.  Like
every backend's, these kernels run after their op's argument check, defined
in :mod:`.checks` and :mod:`.adamw_checks`.  The routing kernels of
:mod:`.library` call the checks as ``reference.check_<op>``, the name tests
import them by (and replace, to count them).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from itertools import accumulate

import torch
from torch import Tensor

from .adamw_checks import check_masked_adamw  # noqa: F401  (re-exported: see the module docstring)
from .checks import check_hutchinson_diag, check_row_saliency, check_select_rows  # noqa: F401
from .schema import AdamWArgs, row_width, rows_of  # noqa: F401  (row_width: re-exported for tests)



def row_saliency(tensors: Sequence[Tensor], weights: Sequence[Tensor] | None, mode: str) -> Tensor:
    """Per output row mean |g| (mode "g") or mean |g*w| ("gw"); float32, rows of tensor 0 first."""
    out = []
    for i, g in enumerate(tensors):
        x = g.float()
        if mode == "gw":
            x = x * weights[i].float()
        out.append(x.abs().reshape(rows_of(g), -1).mean(1) if g.numel() else x.new_zeros(rows_of(g)))
    if not out:
        return torch.zeros(0, dtype=torch.float32)
    return torch.cat(out).float()


def select_rows(
    scores: Tensor, rows_per_tensor: Sequence[int], xi: float, max_fraction: float | None
) -> list[Tensor]:
    """Rows whose per-tensor z-score exceeds ``xi``; vectorised over tensors (no per-tensor loop).

    z uses the population standard deviation in float64.  A tensor whose scores
    are all equal (std 0) selects nothing.  The scores are finite
    (:func:`check_select_rows` refuses others).  With ``max_fraction`` only the
    ``floor(max_fraction * rows)`` highest-scoring selected rows of each tensor
    are kept (ties: lower row index first).  Returns int64 row indices per
    tensor, ascending, on the scores' device.
    """
    device = scores.device
    counts = [int(n) for n in rows_per_tensor]
    n_t = len(counts)
    if n_t == 0:
        return []
    cnt = torch.tensor(counts, device=device)
    seg = torch.repeat_interleave(torch.arange(n_t, device=device), cnt)
    s = scores.double()
    denom = cnt.clamp(min=1).double()
    mean = torch.zeros(n_t, dtype=torch.float64, device=device).index_add_(0, seg, s) / denom
    dev = s - mean[seg]
    std = (torch.zeros(n_t, dtype=torch.float64, device=device).index_add_(0, seg, dev * dev) / denom).sqrt()
    hi = torch.full((n_t,), -math.inf, dtype=torch.float64, device=device).scatter_reduce(0, seg, s, "amax")
    lo = torch.full((n_t,), math.inf, dtype=torch.float64, device=device).scatter_reduce(0, seg, s, "amin")
    varies = (hi > lo)[seg]
    keep = varies & (dev > xi * std[seg])
    starts = torch.tensor(list(accumulate(counts, initial=0))[:-1], dtype=torch.int64, device=device)
    if max_fraction is not None:
        cap = torch.tensor([math.floor(max_fraction * n) for n in counts], dtype=torch.int64, device=device)
        cand = keep.nonzero().squeeze(1)
        by_score = cand[torch.sort(s[cand], descending=True, stable=True).indices]
        order = by_score[torch.sort(seg[by_score], stable=True).indices]
        oseg = seg[order]
        first = torch.searchsorted(oseg, torch.arange(n_t, device=device))
        rank = torch.arange(order.numel(), device=device) - first[oseg]
        keep = torch.zeros_like(keep)
        keep[order[rank < cap[oseg]]] = True
    idx = keep.nonzero().squeeze(1)
    per = torch.bincount(seg[idx], minlength=n_t).tolist()
    local = idx - starts[seg[idx]]
    # separate storage per output: ops must not return tensors that alias each other
    return [part.clone() for part in torch.split(local, per)]


def masked_adamw_(*args) -> None:
    """AdamW (torch.optim.AdamW's formulas) on ``params[i][rows[i]]`` with state in slots ``slots[i]``.

    Arguments in :class:`AdamWArgs` order.
    """
    params, grads, exp_avgs, exp_avg_sqs, steps, rows, slots, lr, beta1, beta2, eps, weight_decay, hess, ref_params, lam = (
        AdamWArgs(*args)
    )
    for i, p in enumerate(params):
        r = rows[i].long()
        if r.numel() == 0:
            continue
        sl = slots[i].long()
        p2 = p.view(rows_of(p), -1)
        g = grads[i].reshape(rows_of(p), -1)[r].float()
        x = p2[r].float()
        if hess is not None:
            h = hess[i].reshape(rows_of(p), -1)[r].float().clamp(min=0)  # negative curvature: no penalty
            g = g + lam * h * (x - ref_params[i].reshape(rows_of(p), -1)[r].float())
        step = steps[i][sl] + 1
        steps[i][sl] = step
        m = exp_avgs[i][sl].lerp(g, 1 - beta1)
        v = exp_avg_sqs[i][sl] * beta2 + (1 - beta2) * g * g
        exp_avgs[i][sl] = m
        exp_avg_sqs[i][sl] = v
        t = step.double()
        bc1 = (1 - beta1**t).unsqueeze(1)
        bc2_sqrt = (1 - beta2**t).sqrt().unsqueeze(1)
        step_size = (lr / bc1).float()
        denom = v.sqrt() / bc2_sqrt.float() + eps
        x = x * (1 - lr * weight_decay)
        x = x - step_size * m / denom
        p2[r] = x.to(p.dtype)


def hutchinson_diag_(
    diags: Sequence[Tensor], hz: Sequence[Tensor], z: Sequence[Tensor], rows: Sequence[Tensor] | None, count: int
) -> None:
    """Running mean ``diag <- diag * count/(count+1) + z*Hz / (count+1)`` on the given rows (all when None).

    A per-row diag (shape (rows,)) takes the row mean of z*Hz.  ``count == 0``
    stores the estimate without reading the diag, so a NaN/Inf start does not
    survive (NaN * 0 is NaN).
    """
    for i, d in enumerate(diags):
        h = hz[i]
        n = rows_of(h)
        est = (z[i].float() * h.float()).reshape(n, -1)
        per_row = d.shape != h.shape
        if per_row:
            est = est.mean(1)
        d2 = d.view(n, -1) if not per_row else d
        sel = rows[i].long() if rows is not None else torch.arange(n, device=d.device)
        if sel.numel() == 0:
            continue
        # float32 math; a bfloat16 diag is rounded once, when stored
        if count == 0:
            d2[sel] = est[sel].to(d.dtype)
        else:
            d2[sel] = (d2[sel].float() * (count / (count + 1)) + est[sel] / (count + 1)).to(d.dtype)
