"""Pure-PyTorch reference backend and the argument checks shared by every backend.

The reference is the test oracle: plain indexing and float32 math, written
to be read, not to be fast.  ``check_*`` functions run before any backend's
kernel, so every backend rejects the same bad inputs with the same message
naming the op and the argument (:func:`arguments_of`); the Python wrappers in
:mod:`trust_fast.ops` check argument types with the same functions first.
"""

from __future__ import annotations

import contextlib
import math
import numbers
import operator
import weakref
from bisect import bisect_right
from collections.abc import Iterator, Sequence
from itertools import chain
from typing import NamedTuple, NoReturn

import torch
from torch import Tensor

PARAM_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
#: dtypes of a Hessian diagonal (hutchinson_diag_'s diags, masked_adamw_'s hess): math is float32 either way;
#: bfloat16 halves the memory of an estimate whose own noise is far above bfloat16's 0.4% rounding
DIAG_DTYPES = (torch.float32, torch.bfloat16)
INDEX_DTYPES = (torch.int32, torch.int64)
SALIENCY_MODES = ("g", "gw")


def rows_of(t: Tensor) -> int:
    """Number of output rows of a weight-shaped tensor (dim 0; a 0-d tensor has 1)."""
    return t.shape[0] if t.dim() > 0 else 1


def row_width(t: Tensor) -> int:
    """Elements per output row: numel / rows (0 when the tensor has no rows)."""
    r = rows_of(t)
    return t.numel() // r if r > 0 else 0


# ----------------------------------------------------------------------------
# argument checks


_UNNAMED = "_trust_fast_names_no_op"  # set on an argument error until the op's name is put in front


def _fail(cls: type[Exception], msg: str) -> NoReturn:
    err = cls(msg)
    setattr(err, _UNNAMED, True)
    raise err


@contextlib.contextmanager
def arguments_of(op: str) -> Iterator[None]:
    """The argument errors raised inside (by the checks here) start with the op's name:
    "row_saliency: tensors[0] must be ...". Also a decorator, for a check function."""
    try:
        yield
    except (TypeError, ValueError, IndexError, RuntimeError) as e:
        if getattr(e, _UNNAMED, False):
            setattr(e, _UNNAMED, False)
            e.args = (f"{op}: {e}",)
        raise


def check_tensor(name: str, x: object) -> None:
    if not isinstance(x, Tensor):
        _fail(TypeError, f"{name} must be a torch.Tensor, got {type(x).__name__}")


def check_tensor_list(name: str, xs: object, optional: bool = False) -> None:
    """`xs` is a list or tuple of tensors (or None, when `optional`)."""
    if xs is None and optional:
        return
    if not isinstance(xs, (list, tuple)):
        _fail(TypeError, f"{name} must be a list of tensors{' or None' if optional else ''}, got {type(xs).__name__}")
    for i, x in enumerate(xs):
        check_tensor(f"{name}[{i}]", x)


def check_number(name: str, value: object, optional: bool = False) -> None:
    """`value` is a real number: a Python or numpy int or float, or a 0-d real tensor (or None, when
    `optional`); not a bool or a string. Whether it is finite or in range is the op's check."""
    if value is None and optional:
        return
    if isinstance(value, Tensor):
        if value.dim() == 0 and not value.is_complex() and value.dtype != torch.bool:
            return
    elif isinstance(value, numbers.Real) and not isinstance(value, bool):
        return
    _fail(TypeError, f"{name} must be a number{' or None' if optional else ''}, got {type(value).__name__}")


def check_integer(name: str, value: object) -> None:
    """`value` is an integer (Python, numpy or a 0-d integer tensor), not a bool or a float."""
    if not isinstance(value, bool):
        try:
            operator.index(value)
            return
        except TypeError:
            pass
    _fail(TypeError, f"{name} must be an integer, got {type(value).__name__}")


def check_integer_list(name: str, xs: object) -> None:
    """`xs` is a list or tuple of integers."""
    if not isinstance(xs, (list, tuple)):
        _fail(TypeError, f"{name} must be a list of integers, got {type(xs).__name__}")
    for i, x in enumerate(xs):
        check_integer(f"{name}[{i}]", x)


def _check_same_len(ref_name: str, ref: Sequence, name: str, xs: Sequence | None) -> None:
    if xs is not None and len(xs) != len(ref):
        _fail(ValueError, f"{name} has {len(xs)} tensors but {ref_name} has {len(ref)}")


def _check_device(name: str, i: int, t: Tensor, device: torch.device) -> None:
    if t.device != device:
        _fail(RuntimeError, f"{name}[{i}] is on {t.device} but expected {device}")


def _check_float_dtype(name: str, i: int, t: Tensor) -> None:
    if t.dtype not in PARAM_DTYPES:
        _fail(TypeError, f"{name}[{i}] has dtype {t.dtype}; supported: float32, float16, bfloat16")


def _check_finite(name: str, value: float) -> None:
    if not math.isfinite(value):
        _fail(ValueError, f"{name} must be finite, got {value}")


_VALID_MARK = "_trust_fast_valid_below"


def _marked_valid(r: Tensor, limit: int, device: torch.device) -> bool:
    mark = getattr(r, _VALID_MARK, None)
    if mark is None:
        return False
    try:
        return mark == (r._version, int(limit), device)
    except RuntimeError:  # inference tensors have no version counter
        return False


def _mark_valid(r: Tensor, limit: int, device: torch.device) -> None:
    try:
        setattr(r, _VALID_MARK, (r._version, int(limit), device))
    except RuntimeError:
        pass


def check_indices(
    name: str, idx: Sequence[Tensor], limits: Sequence[int], device: torch.device
) -> None:
    """Check per-tensor index vectors: 1-D, int32/int64, on ``device``, in [0, limit), no duplicates.

    All tensors are checked together with a constant number of torch ops and a
    single host sync, so the cost does not grow with the number of tensors.  A
    tensor that passed is marked with its version counter: passing it again
    unmodified (an optimizer's row list, step after step) costs nothing.
    """
    todo = []
    for i, r in enumerate(idx):
        if _marked_valid(r, limits[i], device):  # checked before, unchanged since (same version)
            continue
        if not (r.dim() == 1 and r.dtype in INDEX_DTYPES and r.device == device):
            if r.dim() != 1:
                _fail(ValueError, f"{name}[{i}] must be 1-D, got shape {tuple(r.shape)}")
            if r.dtype not in INDEX_DTYPES:
                _fail(TypeError, f"{name}[{i}] has dtype {r.dtype}; expected int32 or int64")
            _check_device(name, i, r, device)
        if r.numel():
            todo.append(i)
    if not todo:
        return
    counts = [idx[i].numel() for i in todo]
    lims = [int(limits[i]) for i in todo]
    flat = torch.cat([idx[i] for i in todo]).to(torch.int64)
    seg = torch.repeat_interleave(torch.arange(len(todo), device=device), torch.tensor(counts, device=device))
    lim = torch.tensor(lims, dtype=torch.int64, device=device)[seg]
    bad_range = (flat < 0) | (flat >= lim)
    offsets = torch.tensor([0, *cumsum(lims)][:-1], dtype=torch.int64, device=device)
    glob = torch.sort(flat + offsets[seg]).values
    dup = glob[1:] == glob[:-1]
    flags = torch.stack([bad_range.any(), dup.any()]).tolist()
    if flags[0]:
        j = int(bad_range.nonzero()[0, 0])
        k = int(seg[j])
        _fail(IndexError, f"{name}[{todo[k]}] holds index {int(flat[j])} out of range [0, {lims[k]})")
    if flags[1]:
        g = int(glob[1:][dup][0])
        k = int(torch.searchsorted(offsets, torch.tensor(g, device=device), right=True)) - 1
        _fail(ValueError, f"{name}[{todo[k]}] holds index {g - int(offsets[k])} more than once")
    for i in todo:
        _mark_valid(idx[i], limits[i], device)


def cumsum(xs: Sequence[int]) -> list[int]:
    """Inclusive prefix sums of a list of ints."""
    out, acc = [], 0
    for x in xs:
        acc += int(x)
        out.append(acc)
    return out


def check_saliency_mode(mode: object, weights: Sequence[Tensor] | None) -> None:
    if not isinstance(mode, str):
        _fail(TypeError, f"mode must be a str, one of {SALIENCY_MODES}, got {type(mode).__name__}")
    if mode not in SALIENCY_MODES:
        _fail(ValueError, f"mode must be one of {SALIENCY_MODES}, got {mode!r}")
    if mode == "gw" and weights is None:
        _fail(ValueError, "mode='gw' needs weights (got weights=None)")


@arguments_of("row_saliency")
def check_row_saliency(tensors: Sequence[Tensor], weights: Sequence[Tensor] | None, mode: str) -> None:
    check_tensor_list("tensors", tensors)
    if weights is not None:
        check_tensor_list("weights", weights)
        _check_same_len("tensors", tensors, "weights", weights)
    check_saliency_mode(mode, weights)
    if not tensors:
        return
    device = tensors[0].device
    for i, t in enumerate(tensors):
        _check_float_dtype("tensors", i, t)
        _check_device("tensors", i, t, device)
        if t.dim() == 0:
            _fail(ValueError, f"tensors[{i}] must have at least one dimension")
        if weights is not None:
            w = weights[i]
            _check_device("weights", i, w, device)
            if w.shape != t.shape:
                _fail(ValueError, f"weights[{i}] has shape {tuple(w.shape)} but tensors[{i}] has {tuple(t.shape)}")
            if w.dtype != t.dtype:
                _fail(TypeError, f"weights[{i}] has dtype {w.dtype} but tensors[{i}] has {t.dtype}")


@arguments_of("select_rows")
def check_select_rows(
    scores: Tensor, rows_per_tensor: Sequence[int], xi: float, max_fraction: float | None
) -> None:
    """Also that every score is finite (one isfinite over all of them, one host sync): a NaN or Inf
    makes its tensor's mean and std, and so every z-score of it, undefined."""
    check_tensor("scores", scores)
    if scores.dim() != 1 or scores.dtype != torch.float32:
        _fail(ValueError, f"scores must be a 1-D float32 tensor, got {scores.dtype} shape {tuple(scores.shape)}")
    counts = [int(n) for n in rows_per_tensor]
    for i, n in enumerate(counts):
        if n < 0:
            _fail(ValueError, f"rows_per_tensor[{i}] is negative ({n})")
    if sum(counts) != scores.numel():
        _fail(ValueError, f"rows_per_tensor sums to {sum(counts)} but scores has {scores.numel()} entries")
    _check_finite("xi", xi)
    if max_fraction is not None and not (0.0 <= max_fraction <= 1.0):
        _fail(ValueError, f"max_fraction must be in [0, 1], got {max_fraction}")
    finite = torch.isfinite(scores)
    if not bool(finite.all()):
        j = int((~finite).nonzero()[0, 0])
        ends = cumsum(counts)
        i = bisect_right(ends, j)
        row = j - (ends[i - 1] if i else 0)
        _fail(ValueError, f"the scores of tensor {i} are not finite ({float(scores[j])} at row {row}); "
                          "z-scores need finite scores")


class AdamWArgs(NamedTuple):
    """Arguments of ``trust_fast::masked_adamw_`` in schema order; shapes in ``trust_fast.ops.masked_adamw_``."""

    params: Sequence[Tensor]
    grads: Sequence[Tensor]
    exp_avgs: Sequence[Tensor]
    exp_avg_sqs: Sequence[Tensor]
    steps: Sequence[Tensor]
    rows: Sequence[Tensor]
    slots: Sequence[Tensor]
    lr: float
    beta1: float
    beta2: float
    eps: float
    weight_decay: float
    hess: Sequence[Tensor] | None
    ref_params: Sequence[Tensor] | None
    lam: float


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
        _check_finite(n, v)
    for n, b in (("beta1", beta1), ("beta2", beta2)):
        if not 0.0 <= b < 1.0:
            _fail(ValueError, f"{n} must be in [0, 1), got {b}")
    if eps < 0:
        _fail(ValueError, f"eps must be >= 0, got {eps}")
    if (hess is None) != (ref_params is None):
        _fail(ValueError, "hess and ref_params must be given together (the penalty is lam*hess*(param - ref_param))")


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
    for n, xs in zip(a._fields[:7], a[:7]):
        check_tensor_list(n, xs)
        _check_same_len("params", params, n, xs)
    if hess is not None:
        check_tensor_list("hess", hess)
        check_tensor_list("ref_params", ref_params)
        _check_same_len("params", params, "hess", hess)
        _check_same_len("params", params, "ref_params", ref_params)
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
        _check_float_dtype("params", i, p)
        _check_device("params", i, p, device)
        if p.dim() == 0:
            _fail(ValueError, f"params[{i}] must have at least one dimension")
        if not p.is_contiguous():
            _fail(ValueError, f"params[{i}] must be contiguous (it is updated in place)")
        g = grads[i]
        _check_device("grads", i, g, device)
        if g.shape != p.shape or g.dtype != p.dtype:
            _fail(ValueError, f"grads[{i}] is {g.dtype} {tuple(g.shape)} but params[{i}] is {p.dtype} {tuple(p.shape)}")
        width = row_width(p)
        for n, st in (("exp_avgs", exp_avgs[i]), ("exp_avg_sqs", exp_avg_sqs[i])):
            _check_device(n, i, st, device)
            if st.dtype != torch.float32 or st.dim() != 2 or st.shape[1] != width or not st.is_contiguous():
                _fail(
                    ValueError,
                    f"{n}[{i}] must be a contiguous float32 (slots, {width}) tensor, got {st.dtype} {tuple(st.shape)}",
                )
        if exp_avg_sqs[i].shape != exp_avgs[i].shape:
            _fail(ValueError, f"exp_avg_sqs[{i}] has shape {tuple(exp_avg_sqs[i].shape)} but exp_avgs[{i}] has {tuple(exp_avgs[i].shape)}")
        s = steps[i]
        _check_device("steps", i, s, device)
        if s.dtype != torch.float32 or s.shape != (exp_avgs[i].shape[0],) or not s.is_contiguous():
            _fail(ValueError, f"steps[{i}] must be a float32 ({exp_avgs[i].shape[0]},) tensor, got {s.dtype} {tuple(s.shape)}")
        if rows[i].shape != slots[i].shape:
            _fail(ValueError, f"slots[{i}] has shape {tuple(slots[i].shape)} but rows[{i}] has {tuple(rows[i].shape)}")
        if hess is not None:
            h, p0 = hess[i], ref_params[i]
            _check_device("hess", i, h, device)
            _check_device("ref_params", i, p0, device)
            if h.dtype not in DIAG_DTYPES or h.shape not in (p.shape, (rows_of(p),)):
                _fail(
                    ValueError,
                    f"hess[{i}] must be float32 or bfloat16 with the param's shape {tuple(p.shape)} or ({rows_of(p)},), "
                    f"got {h.dtype} {tuple(h.shape)}",
                )
            if p0.shape != p.shape or p0.dtype != p.dtype:
                _fail(ValueError, f"ref_params[{i}] is {p0.dtype} {tuple(p0.shape)} but params[{i}] is {p.dtype} {tuple(p.shape)}")


@arguments_of("hutchinson_diag_")
def check_hutchinson_diag(
    diags: Sequence[Tensor], hz: Sequence[Tensor], z: Sequence[Tensor], rows: Sequence[Tensor] | None, count: int
) -> None:
    for n, xs in (("diags", diags), ("hz", hz), ("z", z)):
        check_tensor_list(n, xs)
        _check_same_len("diags", diags, n, xs)
    if rows is not None:
        check_tensor_list("rows", rows)
        _check_same_len("diags", diags, "rows", rows)
    if count < 0:
        _fail(ValueError, f"count must be >= 0, got {count}")
    if not diags:
        return
    device = diags[0].device
    for i, (d, h, zz) in enumerate(zip(diags, hz, z)):
        _check_float_dtype("hz", i, h)
        _check_device("hz", i, h, device)
        _check_device("diags", i, d, device)
        _check_device("z", i, zz, device)
        if h.dim() == 0:
            _fail(ValueError, f"hz[{i}] must have at least one dimension")
        if zz.shape != h.shape or zz.dtype != h.dtype:
            _fail(ValueError, f"z[{i}] is {zz.dtype} {tuple(zz.shape)} but hz[{i}] is {h.dtype} {tuple(h.shape)}")
        if d.dtype not in DIAG_DTYPES or d.shape not in (h.shape, (rows_of(h),)) or not d.is_contiguous():
            _fail(
                ValueError,
                f"diags[{i}] must be a contiguous float32 or bfloat16 tensor of shape {tuple(h.shape)} (per element) or "
                f"({rows_of(h)},) (per row), got {d.dtype} {tuple(d.shape)}",
            )
    if rows is not None:
        check_indices("rows", rows, [rows_of(h) for h in hz], device)


@arguments_of("rademacher_like")
def check_rademacher_like(tensors: Sequence[Tensor], generator: torch.Generator | None) -> None:
    check_tensor_list("tensors", tensors)
    for i, t in enumerate(tensors):
        if not t.is_floating_point():
            _fail(TypeError, f"tensors[{i}] has dtype {t.dtype}; +-1 probes need a floating dtype")
    if generator is not None and not isinstance(generator, torch.Generator):
        _fail(TypeError, f"generator must be a torch.Generator or None, got {type(generator).__name__}")


# ----------------------------------------------------------------------------
# reference kernels


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
    starts = torch.tensor([0, *cumsum(counts)][:-1], dtype=torch.int64, device=device)
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
