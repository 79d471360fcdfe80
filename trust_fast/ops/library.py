"""Registration of the public ops: routing kernels, fake kernels, backends.

Each public op has one Python kernel for CPU and CUDA tensors that runs the
shared argument checks and then the kernel of the backend the registry picks.
Fake kernels let torch.compile trace the ops without running them.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch
from torch import Tensor
from torch.utils._python_dispatch import _get_current_dispatch_mode

from . import _native, reference
from .registry import Backend, kernel_for, register_backend
from .schema import NAMESPACE, NATIVE_OPS, native_name, rows_of

_OP = f"{NAMESPACE}::"


def _device_of(tensors: Sequence[Tensor]) -> torch.device:
    return tensors[0].device if tensors else torch.device("cpu")


# ----------------------------------------------------------------------------
# routing kernels


def route_row_saliency(tensors: list[Tensor], weights: list[Tensor] | None, mode: str) -> Tensor:
    reference.check_row_saliency(tensors, weights, mode)
    if not tensors:
        return torch.zeros(0, dtype=torch.float32)
    return kernel_for("row_saliency", _device_of(tensors))(tensors, weights, mode)


def route_select_rows(
    scores: Tensor, rows_per_tensor: list[int], xi: float, max_fraction: float | None
) -> list[Tensor]:
    reference.check_select_rows(scores, rows_per_tensor, xi, max_fraction)
    return kernel_for("select_rows", scores.device)(scores, rows_per_tensor, xi, max_fraction)


def route_masked_adamw(*args) -> None:
    reference.check_masked_adamw(*args)
    if args[0]:
        kernel_for("masked_adamw_", _device_of(args[0]))(*args)


def route_hutchinson_diag(diags, hz, z, rows, count) -> None:
    reference.check_hutchinson_diag(diags, hz, z, rows, count)
    if diags:
        kernel_for("hutchinson_diag_", _device_of(diags))(diags, hz, z, rows, count)


for _name, _route in (
    ("row_saliency", route_row_saliency),
    ("select_rows", route_select_rows),
    ("masked_adamw_", route_masked_adamw),
    ("hutchinson_diag_", route_hutchinson_diag),
):
    torch.library.impl(_OP + _name, ("CPU", "CUDA"))(_route)


_PLAIN_TENSOR_TYPES = (Tensor, torch.nn.Parameter)


def can_route_directly(*tensor_lists: Sequence[Tensor]) -> bool:
    """Whether a public op may call its routing kernel without the dispatcher round trip.

    True for plain CPU/CUDA tensors in eager mode: the dispatcher would pick
    the routing kernel itself.  Under torch.compile, a dispatch mode (fake
    tensors, functionalization), a functorch transform or with tensor
    subclasses the op goes through ``torch.ops`` so that they see it.
    """
    if not plain_eager_mode():
        return False
    return all(is_plain_tensor(t) for ts in tensor_lists for t in ts)


def plain_eager_mode() -> bool:
    """No torch.compile tracing, dispatch mode or functorch transform is active."""
    return not (
        torch.compiler.is_compiling()
        or _get_current_dispatch_mode() is not None
        or torch._C._are_functorch_transforms_active()
    )


def is_plain_tensor(t) -> bool:
    """A plain Tensor or Parameter (no subclass that would have to see the op)."""
    return type(t) in _PLAIN_TENSOR_TYPES


# ----------------------------------------------------------------------------
# fake kernels


@torch.library.register_fake(_OP + "row_saliency")
def _row_saliency_fake(tensors, weights, mode):
    total = sum(rows_of(t) for t in tensors)
    if not tensors:
        return torch.empty(0, dtype=torch.float32)
    return tensors[0].new_empty(total, dtype=torch.float32)


@torch.library.register_fake(_OP + "select_rows")
def _select_rows_fake(scores, rows_per_tensor, xi, max_fraction):
    ctx = torch.library.get_ctx()
    return [scores.new_empty(ctx.new_dynamic_size(), dtype=torch.int64) for _ in rows_per_tensor]


@torch.library.register_fake(_OP + "masked_adamw_")
def _masked_adamw_fake(*args) -> None:
    return None


@torch.library.register_fake(_OP + "hutchinson_diag_")
def _hutchinson_diag_fake(diags, hz, z, rows, count) -> None:
    return None


# ----------------------------------------------------------------------------
# backends


def _native_kernel(op: str):
    native = getattr(torch.ops.trust_fast, native_name(op)).default

    def run(*args):
        if op == "row_saliency":
            tensors, weights, mode = args
            return native([t.contiguous() for t in tensors], None if weights is None else [w.contiguous() for w in weights], mode)
        if op == "hutchinson_diag_":
            diags, hz, z, rows, count = args
            return native(diags, [h.contiguous() for h in hz], [t.contiguous() for t in z], rows, count)
        args = list(args)
        args[1] = [g.contiguous() for g in args[1]]
        return native(*args)

    return run


def _probe_native(dispatch_key: str, device_type: str, want: str) -> str | None:
    if device_type != want:
        return f"runs on {want} tensors only"
    if want == "cuda" and not torch.cuda.is_available():
        return "no CUDA device"
    reason = _native.load()
    if reason is not None:
        return reason
    if not _native.has_kernel(dispatch_key):
        return f"trust_fast._C was built without {dispatch_key} kernels"
    return None


def _import_kernels():
    """``trust_fast.kernels``; from the source tree's triton_kernels/ when the package is not installed."""
    import importlib
    import importlib.util
    import sys
    from pathlib import Path

    try:
        return importlib.import_module("trust_fast.kernels")
    except ModuleNotFoundError as exc:
        if exc.name != "trust_fast.kernels":
            raise
    src = Path(__file__).resolve().parents[2] / "triton_kernels" / "__init__.py"
    if not src.is_file():
        raise ModuleNotFoundError("trust_fast.kernels is not installed and no triton_kernels/ source tree was found")
    spec = importlib.util.spec_from_file_location("trust_fast.kernels", src, submodule_search_locations=[str(src.parent)])
    module = importlib.util.module_from_spec(spec)
    sys.modules["trust_fast.kernels"] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules["trust_fast.kernels"]
        raise
    return module


def _probe_triton(device_type: str) -> str | None:
    kernels = _import_kernels()
    if kernels.TRITON_ERROR is not None:
        return kernels.TRITON_ERROR
    if device_type == "cuda":
        return None if torch.cuda.is_available() else "no CUDA device"
    if device_type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1":
        if not kernels.INTERPRETED:
            return ("trust_fast.kernels was imported before TRITON_INTERPRET=1 was set, so its kernels "
                    "are compiled for a GPU: set the variable before using the triton backend")
        return None
    return "triton runs on CUDA tensors (on a CPU only with TRITON_INTERPRET=1)"


class _LazyTriton(dict):
    """Triton kernels, imported on first use so that importing trust_fast never imports triton."""

    def get(self, op, default=None):
        return _import_kernels().KERNELS.get(op, default)


register_backend(
    Backend(
        "reference",
        probe=lambda device_type: None,
        kernels={
            "row_saliency": reference.row_saliency,
            "select_rows": reference.select_rows,
            "masked_adamw_": reference.masked_adamw_,
            "hutchinson_diag_": reference.hutchinson_diag_,
        },
    )
)
register_backend(
    Backend(
        "cpp",
        probe=lambda device_type: _probe_native("CPU", device_type, "cpu"),
        kernels={op: _native_kernel(op) for op in NATIVE_OPS},
    )
)
register_backend(
    Backend(
        "cuda",
        probe=lambda device_type: _probe_native("CUDA", device_type, "cuda"),
        kernels={op: _native_kernel(op) for op in NATIVE_OPS},
    )
)
register_backend(Backend("triton", probe=_probe_triton, kernels=_LazyTriton()))
