"""The argument checks of ``masked_adamw_``, shared by every backend, with a cache.

An optimizer passes the same params, state and index tensors step after step:
their per-tensor checks run once per argument set (:func:`check_masked_adamw`),
later steps pay only for the scalar checks and a comparison of each new
gradient with its param.
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence
from itertools import chain

import torch
from torch import Tensor

from .checks import (DIAG_DTYPES, PARAM_DTYPES, arguments_of, check_device, check_finite, check_float_dtype,
                     check_indices, check_tensor_lists, fail)
from .schema import AdamWArgs, row_width, rows_of

_ADAM_MARK = "_trust_fast_adam_checked"


def _adam_state_lists(a: AdamWArgs) -> tuple:
    """The tensor lists whose checks are cached (all but grads, which may be new tensors every step)."""
    return (a.params, a.exp_avgs, a.exp_avg_sqs, a.steps, a.rows, a.slots,
            () if a.hess is None else a.hess, () if a.ref_params is None else a.ref_params)


def _adam_checked_before(a: AdamWArgs) -> bool:
    """Whether these very tensors passed the checks before, the index tensors unmodified since.

    The mark lives on params[0]: weak references to every tensor (so it keeps
    nothing alive) and the version counters of rows and slots.  Gradients may
    be new tensors every step (``zero_grad(set_to_none=True)``): new ones are
    compared with their params (shape, dtype, device) and then remembered.
    """
    mark = getattr(a.params[0], _ADAM_MARK, None)
    if mark is None:
        return False
    refs, lengths, versions, grad_refs = mark
    lists = _adam_state_lists(a)
    if not all(isinstance(xs, (list, tuple)) for xs in lists) or lengths != tuple(map(len, lists)):
        return False
    for ref, t in zip(refs, chain.from_iterable(lists)):
        if ref() is not t:
            return False
    try:
        if versions != tuple(t._version for t in chain(a.rows, a.slots)):
            return False
    except RuntimeError:  # inference tensors have no version counter
        return False
    grads = a.grads
    if not isinstance(grads, (list, tuple)) or len(grads) != len(a.params):
        return False
    if all(ref() is g for ref, g in zip(grad_refs, grads)):
        return True
    if not grads_match_params(a.params, grads):
        return False
    _mark_adam_checked(a)
    return True


def _mark_adam_checked(a: AdamWArgs) -> None:
    lists = _adam_state_lists(a)
    try:
        versions = tuple(t._version for t in chain(a.rows, a.slots))
        refs = tuple(weakref.ref(t) for t in chain.from_iterable(lists))
        grad_refs = tuple(weakref.ref(g) for g in a.grads)
        setattr(a.params[0], _ADAM_MARK, (refs, tuple(map(len, lists)), versions, grad_refs))
    except (RuntimeError, TypeError):
        pass


def grads_match_params(params: Sequence[Tensor], grads: Sequence[Tensor]) -> bool:
    """Every gradient is a tensor of its param's shape, dtype and device."""
    for p, g in zip(params, grads):
        if not (isinstance(g, Tensor) and g.shape == p.shape and g.dtype == p.dtype and g.device == p.device):
            return False
    return True


def check_masked_adamw_scalars(lr, beta1, beta2, eps, weight_decay, lam, hess, ref_params) -> None:
    """The checks of ``masked_adamw_``'s scalar arguments (and of hess/ref_params going together)."""
    for n, v in (("lr", lr), ("eps", eps), ("weight_decay", weight_decay), ("lam", lam)):
        check_finite(n, v)
    for n, b in (("beta1", beta1), ("beta2", beta2)):
        if not 0.0 <= b < 1.0:
            fail(ValueError, f"{n} must be in [0, 1), got {b}")
    if eps < 0:
        fail(ValueError, f"eps must be >= 0, got {eps}")
    if (hess is None) != (ref_params is None):
        fail(ValueError, "hess and ref_params must be given together (the penalty is lam*hess*(param - ref_param))")


@arguments_of("masked_adamw_")
def check_masked_adamw(*args) -> None:
    """Check the arguments of ``masked_adamw_`` (:class:`AdamWArgs` order).

    The per-tensor checks of params, state and indices run once per argument
    set: an optimizer passing the same tensors step after step (rows and slots
    unmodified) pays only for the scalar checks and a shape/dtype comparison
    of each gradient.
    """
    a = AdamWArgs(*args)
    params, grads, exp_avgs, exp_avg_sqs, steps, rows, slots = a[:7]
    hess, ref_params = a.hess, a.ref_params
    check_masked_adamw_scalars(a.lr, a.beta1, a.beta2, a.eps, a.weight_decay, a.lam, hess, ref_params)
    if params and isinstance(params, (list, tuple)) and isinstance(params[0], Tensor) and _adam_checked_before(a):
        return
    check_tensor_lists("masked_adamw_", **a._asdict())
    if not params:
        return
    device = params[0].device
    if not _adam_tensors_ok(params, grads, exp_avgs, exp_avg_sqs, steps, rows, slots, hess, ref_params, device):
        _explain_adam_tensors(params, grads, exp_avgs, exp_avg_sqs, steps, rows, slots, hess, ref_params, device)
    check_indices("rows", rows, [rows_of(p) for p in params], device)
    check_indices("slots", slots, [st.shape[0] for st in exp_avgs], device)
    _mark_adam_checked(a)


def _adam_tensors_ok(params, grads, exp_avgs, exp_avg_sqs, steps, rows, slots, hess, ref_params, device) -> bool:
    """Fast path of the per-tensor checks: one boolean expression per parameter, no messages."""
    f32 = torch.float32
    for i, p in enumerate(params):
        g, m, v, st = grads[i], exp_avgs[i], exp_avg_sqs[i], steps[i]
        shape = p.shape
        if not (
            p.dtype in PARAM_DTYPES and p.device == device and len(shape) > 0 and p.is_contiguous()
            and g.shape == shape and g.dtype == p.dtype and g.device == device
            and m.dtype == f32 and m.dim() == 2 and m.device == device and m.is_contiguous()
            and m.shape[1] * shape[0] == p.numel() and v.shape == m.shape and v.dtype == f32
            and v.device == device and v.is_contiguous()
            and st.dtype == f32 and st.shape == m.shape[:1] and st.device == device and st.is_contiguous()
            and rows[i].shape == slots[i].shape
        ):
            return False
        if hess is not None:
            h, p0 = hess[i], ref_params[i]
            if not (h.dtype in DIAG_DTYPES and h.device == device and (h.shape == shape or h.shape == shape[:1])
                    and p0.shape == shape and p0.dtype == p.dtype and p0.device == device):
                return False
    return True


def _explain_adam_tensors(params, grads, exp_avgs, exp_avg_sqs, steps, rows, slots, hess, ref_params, device) -> None:
    """Slow path: find the first bad tensor and raise an error naming it."""
    for i, p in enumerate(params):
        check_float_dtype("params", i, p)
        check_device("params", i, p, device)
        if p.dim() == 0:
            fail(ValueError, f"params[{i}] must have at least one dimension")
        if not p.is_contiguous():
            fail(ValueError, f"params[{i}] must be contiguous (it is updated in place)")
        g = grads[i]
        check_device("grads", i, g, device)
        if g.shape != p.shape or g.dtype != p.dtype:
            fail(ValueError, f"grads[{i}] is {g.dtype} {tuple(g.shape)} but params[{i}] is {p.dtype} {tuple(p.shape)}")
        width = row_width(p)
        for n, st in (("exp_avgs", exp_avgs[i]), ("exp_avg_sqs", exp_avg_sqs[i])):
            check_device(n, i, st, device)
            if st.dtype != torch.float32 or st.dim() != 2 or st.shape[1] != width or not st.is_contiguous():
                fail(
                    ValueError,
                    f"{n}[{i}] must be a contiguous float32 (slots, {width}) tensor, got {st.dtype} {tuple(st.shape)}",
                )
        if exp_avg_sqs[i].shape != exp_avgs[i].shape:
            fail(ValueError, f"exp_avg_sqs[{i}] has shape {tuple(exp_avg_sqs[i].shape)} but exp_avgs[{i}] has {tuple(exp_avgs[i].shape)}")
        s = steps[i]
        check_device("steps", i, s, device)
        if s.dtype != torch.float32 or s.shape != (exp_avgs[i].shape[0],) or not s.is_contiguous():
            fail(ValueError, f"steps[{i}] must be a float32 ({exp_avgs[i].shape[0]},) tensor, got {s.dtype} {tuple(s.shape)}")
        if rows[i].shape != slots[i].shape:
            fail(ValueError, f"slots[{i}] has shape {tuple(slots[i].shape)} but rows[{i}] has {tuple(rows[i].shape)}")
        if hess is not None:
            h, p0 = hess[i], ref_params[i]
            check_device("hess", i, h, device)
            check_device("ref_params", i, p0, device)
            if h.dtype not in DIAG_DTYPES or h.shape not in (p.shape, (rows_of(p),)):
                fail(
                    ValueError,
                    f"hess[{i}] must be float32 or bfloat16 with the param's shape {tuple(p.shape)} or ({rows_of(p)},), "
                    f"got {h.dtype} {tuple(h.shape)}",
                )
            if p0.shape != p.shape or p0.dtype != p.dtype:
                fail(ValueError, f"ref_params[{i}] is {p0.dtype} {tuple(p0.shape)} but params[{i}] is {p.dtype} {tuple(p.shape)}")
