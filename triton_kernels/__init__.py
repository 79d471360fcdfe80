"""Triton kernels of the trust_fast ops (installed as ``trust_fast.kernels``).

Triton is optional: without it ``KERNELS`` is empty, ``TRITON_ERROR`` says why,
and the op layer reports the triton backend as unavailable.
"""

from __future__ import annotations

from collections.abc import Callable

KERNELS: dict[str, Callable] = {}
TRITON_ERROR: str | None = None
INTERPRETED = False  # decorated for Triton's interpreter (TRITON_INTERPRET=1 at import)

try:
    import triton  # noqa: F401
except ImportError as exc:  # the triton backend is then simply unavailable
    TRITON_ERROR = f"triton is not installed ({exc})"
else:
    from .hutchinson import hutchinson_diag_
    from .masked_adamw import masked_adamw_
    from .row_saliency import _row_saliency_kernel, row_saliency

    INTERPRETED = type(_row_saliency_kernel).__name__ == "InterpretedFunction"

    KERNELS = {
        "row_saliency": row_saliency,
        "masked_adamw_": masked_adamw_,
        "hutchinson_diag_": hutchinson_diag_,
    }

__all__ = ["INTERPRETED", "KERNELS", "TRITON_ERROR"]
