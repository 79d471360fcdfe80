"""Schemas of every ``torch.ops.trust_fast`` op, written once.

Public ops (called by the engine, traced by torch.compile, checked by opcheck):
``row_saliency``, ``select_rows``, ``masked_adamw_``, ``hutchinson_diag_``.

Native ops (``*_native``) carry the same schemas; they are the entry points of
the compiled backends.  ``csrc/`` registers their CPU kernels and
``csrc/cuda/`` their CUDA kernels with ``TORCH_LIBRARY_IMPL(trust_fast, ...)``;
the public ops route to them through the backend registry.  Defining the
schemas here, not in C++, keeps the library importable without a compiler.
"""

from __future__ import annotations

import torch

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
