"""Schemas of every ``torch.ops.trust_fast`` op, written once.

Public ops (called by the engine, traced by torch.compile, checked by opcheck):
``row_saliency``, ``select_rows``, ``masked_adamw_``, ``hutchinson_diag_``.

Native ops (``*_native``) carry the same schemas; they are the entry points of
the compiled backends.  ``csrc/`` registers their CPU kernels and
``csrc/cuda/`` their CUDA kernels with ``TORCH_LIBRARY_IMPL(trust_fast, ...)``;
the public ops route to them through the backend registry.  Defining the
schemas here, not in C++, keeps the library importable without a compiler.
Also here: the conventions the ops' arguments follow (rows of a weight-shaped
tensor, masked_adamw_'s arguments by name), shared by the checks and every backend.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import Tensor

NAMESPACE = "trust_fast"

SCHEMAS: dict[str, str] = {
    "row_saliency": "(Tensor[] tensors, Tensor[]? weights, str mode) -> Tensor",
    "select_rows": (
        "(Tensor scores, int[] rows_per_tensor, float xi, float? max_fraction) -> Tensor[]"
    ),
    "masked_adamw_": (
        "(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avgs, Tensor(c!)[] exp_avg_sqs, "
        "Tensor(d!)[] steps, Tensor[] rows, Tensor[] slots, float lr, float beta1, float beta2, "
        "float eps, float weight_decay, Tensor[]? hess, Tensor[]? ref_params, float lam) -> ()"
    ),
    "hutchinson_diag_": (
        "(Tensor(a!)[] diags, Tensor[] hz, Tensor[] z, Tensor[]? rows, int count) -> ()"
    ),
}

# Ops with a compiled (C++/CUDA) kernel; select_rows is sort-bound and runs as
# vectorised torch on every device.
NATIVE_OPS = ("row_saliency", "masked_adamw_", "hutchinson_diag_")

_LIB = torch.library.Library(NAMESPACE, "DEF")
for _name, _schema in SCHEMAS.items():
    _LIB.define(_name + _schema)
for _name in NATIVE_OPS:
    _LIB.define(_name.rstrip("_") + "_native" + ("_" if _name.endswith("_") else "") + SCHEMAS[_name])


def native_name(op: str) -> str:
    """Name of the native op that backs public op ``op`` (``masked_adamw_`` -> ``masked_adamw_native_``)."""
    if op.endswith("_"):
        return op[:-1] + "_native_"
    return op + "_native"


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


def rows_of(t: Tensor) -> int:
    """Number of output rows of a weight-shaped tensor (dim 0; a 0-d tensor has 1)."""
    return t.shape[0] if t.dim() > 0 else 1


def row_width(t: Tensor) -> int:
    """Elements per output row: numel / rows (0 when the tensor has no rows)."""
    r = rows_of(t)
    return t.numel() // r if r > 0 else 0
