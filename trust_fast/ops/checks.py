"""The argument checks every backend shares (``masked_adamw_``'s are in :mod:`.adamw_checks`).

A check runs before any backend's kernel, so every backend rejects the same
bad inputs with the same message naming the op and the argument
(:func:`arguments_of`).  The Python wrappers in :mod:`trust_fast.ops` first
check the types of their arguments, from one table (:data:`ARGUMENT_TYPES`);
a direct ``torch.ops.trust_fast`` call has them typed by the op's schema.
"""

from __future__ import annotations

import contextlib
import math
import numbers
import operator
from bisect import bisect_right
from collections.abc import Iterator, Sequence
from itertools import accumulate
from typing import NamedTuple, NoReturn

import torch
from torch import Tensor

from .schema import AdamWArgs, rows_of

PARAM_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
#: dtypes of a Hessian diagonal (hutchinson_diag_'s diags, masked_adamw_'s hess): math is float32 either way;
#: bfloat16 halves the memory of an estimate whose own noise is far above bfloat16's 0.4% rounding
DIAG_DTYPES = (torch.float32, torch.bfloat16)
INDEX_DTYPES = (torch.int32, torch.int64)
SALIENCY_MODES = ("g", "gw")


# ----------------------------------------------------------------------------
# errors that name the op


_UNNAMED = "_trust_fast_names_no_op"  # set on an argument error until the op's name is put in front


def fail(cls: type[Exception], msg: str) -> NoReturn:
    """Raise ``cls(msg)`` as an argument error: :func:`arguments_of` puts the op's name in front."""
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


# ----------------------------------------------------------------------------
# types of arguments, checked from a table


def check_tensor(name: str, x: object) -> None:
    if not isinstance(x, Tensor):
        fail(TypeError, f"{name} must be a torch.Tensor, got {type(x).__name__}")


def check_tensor_list(name: str, xs: object, optional: bool = False) -> None:
    """`xs` is a list or tuple of tensors (or None, when `optional`)."""
    if xs is None and optional:
        return
    if not isinstance(xs, (list, tuple)):
        fail(TypeError, f"{name} must be a list of tensors{' or None' if optional else ''}, got {type(xs).__name__}")
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
    fail(TypeError, f"{name} must be a number{' or None' if optional else ''}, got {type(value).__name__}")


def check_integer(name: str, value: object) -> None:
    """`value` is an integer (Python, numpy or a 0-d integer tensor), not a bool or a float."""
    if not isinstance(value, bool):
        try:
            operator.index(value)
            return
        except TypeError:
            pass
    fail(TypeError, f"{name} must be an integer, got {type(value).__name__}")


def check_integer_list(name: str, xs: object) -> None:
    """`xs` is a list or tuple of integers."""
    if not isinstance(xs, (list, tuple)):
        fail(TypeError, f"{name} must be a list of integers, got {type(xs).__name__}")
    for i, x in enumerate(xs):
        check_integer(f"{name}[{i}]", x)


class Arg(NamedTuple):
    """An argument as the type checks see it."""

    name: str
    kind: str  # a key of _TYPE_CHECKS
    optional: bool = False  # None is allowed


_TYPE_CHECKS = {
    "tensor": check_tensor,
    "tensors": check_tensor_list,
    "number": check_number,
    "integer": check_integer,
    "integers": check_integer_list,
}

#: the arguments of each op whose type the Python wrappers check, in the order they are checked
#: (masked_adamw_: its tensor lists before its numbers); ``row_saliency``'s mode is a choice
#: (:func:`check_saliency_mode`)
ARGUMENT_TYPES: dict[str, tuple[Arg, ...]] = {
    "row_saliency": (Arg("tensors", "tensors"), Arg("weights", "tensors", optional=True)),
    "select_rows": (
        Arg("scores", "tensor"), Arg("rows_per_tensor", "integers"), Arg("xi", "number"),
        Arg("max_fraction", "number", optional=True),
    ),
    "masked_adamw_": (
        *(Arg(name, "tensors") for name in AdamWArgs._fields[:7]),
        Arg("hess", "tensors", optional=True), Arg("ref_params", "tensors", optional=True),
        *(Arg(name, "number") for name in ("lr", "beta1", "beta2", "eps", "weight_decay", "lam")),
    ),
    "hutchinson_diag_": (
        *(Arg(name, "tensors") for name in ("diags", "hz", "z")),
        Arg("rows", "tensors", optional=True), Arg("count", "integer"),
    ),
}


def check_types(op: str, **arguments: object) -> None:
    """The types of ``op``'s arguments (given by name), as :data:`ARGUMENT_TYPES` lists them."""
    with arguments_of(op):
        for arg in ARGUMENT_TYPES[op]:
            check = _TYPE_CHECKS[arg.kind]
            if arg.optional:
                check(arg.name, arguments[arg.name], optional=True)
            else:
                check(arg.name, arguments[arg.name])


def check_tensor_lists(op: str, **arguments: object) -> None:
    """``op``'s tensor-list arguments (given by name; an optional one given as None is skipped)
    are lists of tensors, each with as many tensors as the first."""
    (first, ref), *rest = [(arg, arguments[arg.name]) for arg in ARGUMENT_TYPES[op] if arg.kind == "tensors"]
    check_tensor_list(first.name, ref)
    for arg, xs in rest:
        if xs is None and arg.optional:
            continue
        check_tensor_list(arg.name, xs)
        if len(xs) != len(ref):
            fail(ValueError, f"{arg.name} has {len(xs)} tensors but {first.name} has {len(ref)}")


# ----------------------------------------------------------------------------
# tensors: device, dtype, index vectors


def check_device(name: str, i: int, t: Tensor, device: torch.device) -> None:
    if t.device != device:
        fail(RuntimeError, f"{name}[{i}] is on {t.device} but expected {device}")


def check_float_dtype(name: str, i: int, t: Tensor) -> None:
    if t.dtype not in PARAM_DTYPES:
        fail(TypeError, f"{name}[{i}] has dtype {t.dtype}; supported: float32, float16, bfloat16")


def check_finite(name: str, value: float) -> None:
    if not math.isfinite(value):
        fail(ValueError, f"{name} must be finite, got {value}")


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
                fail(ValueError, f"{name}[{i}] must be 1-D, got shape {tuple(r.shape)}")
            if r.dtype not in INDEX_DTYPES:
                fail(TypeError, f"{name}[{i}] has dtype {r.dtype}; expected int32 or int64")
            check_device(name, i, r, device)
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
    offsets = torch.tensor(list(accumulate(lims, initial=0))[:-1], dtype=torch.int64, device=device)
    glob = torch.sort(flat + offsets[seg]).values
    dup = glob[1:] == glob[:-1]
    flags = torch.stack([bad_range.any(), dup.any()]).tolist()
    if flags[0]:
        j = int(bad_range.nonzero()[0, 0])
        k = int(seg[j])
        fail(IndexError, f"{name}[{todo[k]}] holds index {int(flat[j])} out of range [0, {lims[k]})")
    if flags[1]:
        g = int(glob[1:][dup][0])
        k = int(torch.searchsorted(offsets, torch.tensor(g, device=device), right=True)) - 1
        fail(ValueError, f"{name}[{todo[k]}] holds index {g - int(offsets[k])} more than once")
    for i in todo:
        _mark_valid(idx[i], limits[i], device)


# ----------------------------------------------------------------------------
# the ops' checks (masked_adamw_'s: .adamw_checks)


@arguments_of("row_saliency")
def check_saliency_mode(mode: object, weights: Sequence[Tensor] | None) -> None:
    if not isinstance(mode, str):
        fail(TypeError, f"mode must be a str, one of {SALIENCY_MODES}, got {type(mode).__name__}")
    if mode not in SALIENCY_MODES:
        fail(ValueError, f"mode must be one of {SALIENCY_MODES}, got {mode!r}")
    if mode == "gw" and weights is None:
        fail(ValueError, "mode='gw' needs weights (got weights=None)")


@arguments_of("row_saliency")
def check_row_saliency(tensors: Sequence[Tensor], weights: Sequence[Tensor] | None, mode: str) -> None:
    check_tensor_lists("row_saliency", tensors=tensors, weights=weights)
    check_saliency_mode(mode, weights)
    if not tensors:
        return
    device = tensors[0].device
    for i, t in enumerate(tensors):
        check_float_dtype("tensors", i, t)
        check_device("tensors", i, t, device)
        if t.dim() == 0:
            fail(ValueError, f"tensors[{i}] must have at least one dimension")
        if weights is not None:
            w = weights[i]
            check_device("weights", i, w, device)
            if w.shape != t.shape:
                fail(ValueError, f"weights[{i}] has shape {tuple(w.shape)} but tensors[{i}] has {tuple(t.shape)}")
            if w.dtype != t.dtype:
                fail(TypeError, f"weights[{i}] has dtype {w.dtype} but tensors[{i}] has {t.dtype}")


@arguments_of("select_rows")
def check_select_rows(
    scores: Tensor, rows_per_tensor: Sequence[int], xi: float, max_fraction: float | None
) -> None:
    """Also that every score is finite (one isfinite over all of them, one host sync): a NaN or Inf
    makes its tensor's mean and std, and so every z-score of it, undefined."""
    check_tensor("scores", scores)
    if scores.dim() != 1 or scores.dtype != torch.float32:
        fail(ValueError, f"scores must be a 1-D float32 tensor, got {scores.dtype} shape {tuple(scores.shape)}")
    counts = [int(n) for n in rows_per_tensor]
    for i, n in enumerate(counts):
        if n < 0:
            fail(ValueError, f"rows_per_tensor[{i}] is negative ({n})")
    if sum(counts) != scores.numel():
        fail(ValueError, f"rows_per_tensor sums to {sum(counts)} but scores has {scores.numel()} entries")
    check_finite("xi", xi)
    if max_fraction is not None and not (0.0 <= max_fraction <= 1.0):
        fail(ValueError, f"max_fraction must be in [0, 1], got {max_fraction}")
    finite = torch.isfinite(scores)
    if not bool(finite.all()):
        j = int((~finite).nonzero()[0, 0])
        ends = list(accumulate(counts))
        i = bisect_right(ends, j)
        row = j - (ends[i - 1] if i else 0)
        fail(ValueError, f"the scores of tensor {i} are not finite ({float(scores[j])} at row {row}); "
                         "z-scores need finite scores")


@arguments_of("hutchinson_diag_")
def check_hutchinson_diag(
    diags: Sequence[Tensor], hz: Sequence[Tensor], z: Sequence[Tensor], rows: Sequence[Tensor] | None, count: int
) -> None:
    check_tensor_lists("hutchinson_diag_", diags=diags, hz=hz, z=z, rows=rows)
    if count < 0:
        fail(ValueError, f"count must be >= 0, got {count}")
    if not diags:
        return
    device = diags[0].device
    for i, (d, h, zz) in enumerate(zip(diags, hz, z)):
        check_float_dtype("hz", i, h)
        check_device("hz", i, h, device)
        check_device("diags", i, d, device)
        check_device("z", i, zz, device)
        if h.dim() == 0:
            fail(ValueError, f"hz[{i}] must have at least one dimension")
        if zz.shape != h.shape or zz.dtype != h.dtype:
            fail(ValueError, f"z[{i}] is {zz.dtype} {tuple(zz.shape)} but hz[{i}] is {h.dtype} {tuple(h.shape)}")
        if d.dtype not in DIAG_DTYPES or d.shape not in (h.shape, (rows_of(h),)) or not d.is_contiguous():
            fail(
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
            fail(TypeError, f"tensors[{i}] has dtype {t.dtype}; +-1 probes need a floating dtype")
    if generator is not None and not isinstance(generator, torch.Generator):
        fail(TypeError, f"generator must be a torch.Generator or None, got {type(generator).__name__}")
