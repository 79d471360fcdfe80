"""Loading the compiled backends (csrc/ -> ``trust_fast._C``).

The prebuilt extension from ``pip install`` is tried first; when it is missing
the sources are built once with ``torch.utils.cpp_extension.load`` (ninja),
unless ``TRUST_FAST_NO_JIT=1``.  Failure is not an error: the probe returns the
reason and the registry falls back to the reference backend, logging once.
"""

from __future__ import annotations

import importlib
import os
import shutil
from pathlib import Path

import torch

from .schema import NATIVE_OPS, NAMESPACE, native_name

_CSRC = Path(__file__).resolve().parents[2] / "csrc"
_result: list[str | None] = []


def _jit_build() -> None:
    from torch.utils import cpp_extension

    sources = sorted(str(p) for p in _CSRC.glob("*.cpp"))
    cuda = bool(torch.version.cuda) and torch.cuda.is_available() and cpp_extension.CUDA_HOME is not None
    if cuda:
        sources += sorted(str(p) for p in (_CSRC / "cuda").glob("*.cu")) + sorted(str(p) for p in (_CSRC / "cuda").glob("*.cpp"))
    cpp_extension.load(
        name="trust_fast_C_jit",
        sources=sources,
        extra_cflags=["-O3", "-fno-math-errno", "-fopenmp"],
        extra_cuda_cflags=["-O3", "--use_fast_math"] if cuda else None,
        extra_ldflags=["-fopenmp"],
        extra_include_paths=[str(_CSRC)],
        is_python_module=False,
        verbose=False,
    )


def load() -> str | None:
    """Load the native kernels once; None on success, else why they are unavailable."""
    if _result:
        return _result[0]
    reason = None
    try:
        importlib.import_module("trust_fast._C")
    except ImportError as exc:
        reason = f"trust_fast._C not built ({exc})"
        if os.environ.get("TRUST_FAST_NO_JIT", "") not in ("", "0"):
            reason += "; JIT build disabled by TRUST_FAST_NO_JIT"
        elif not _CSRC.is_dir():
            reason += f"; no sources at {_CSRC} for a JIT build"
        elif shutil.which("ninja") is None and not _has_ninja_module():
            reason += "; JIT build needs ninja"
        else:
            try:
                _jit_build()
                reason = None
            except Exception as jit_exc:  # compiler missing or broken: stay importable
                reason += f"; JIT build failed ({type(jit_exc).__name__}: {str(jit_exc)[-300:]})"
    _result.append(reason)
    return reason


def _has_ninja_module() -> bool:
    try:
        import ninja  # noqa: F401
    except ImportError:
        return False
    return True


def has_kernel(dispatch_key: str) -> bool:
    """Whether every native op has a kernel for ``dispatch_key`` ("CPU" or "CUDA")."""
    return all(
        torch._C._dispatch_has_kernel_for_dispatch_key(f"{NAMESPACE}::{native_name(op)}", dispatch_key)
        for op in NATIVE_OPS
    )
