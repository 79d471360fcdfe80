"""Backend registry: which kernel runs an op for a device.

Backends are ``reference`` (pure torch, always there), ``cpp`` (csrc/, CPU),
``cuda`` (csrc/cuda/, CUDA devices) and ``triton`` (triton_kernels/, CUDA devices;
on a CPU only under ``TRITON_INTERPRET=1`` and only when forced).  The
environment variable ``TRUST_FAST_BACKEND`` or :func:`use_backend` forces one;
a forced backend that cannot run raises, an automatic choice falls back to the
next one and logs the reason once.  This registry is the library's only
global mutable state.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch

log = logging.getLogger("trust_fast.ops")

BACKEND_NAMES = ("reference", "cpp", "cuda", "triton")
ENV_VAR = "TRUST_FAST_BACKEND"

# Automatic choice per device type, best first.  On CUDA the order follows
# the GPU benchmark (benchmarks/gpu_check.sh, BENCHMARKS.md "## Kernels"): on an
# H100 the cuda kernels beat triton on every op and set measured (time ratio
# cuda/triton, geometric mean: row_saliency 0.21, masked_adamw_ 0.41,
# hutchinson_diag_ 0.73).
PREFERENCE: dict[str, tuple[str, ...]] = {
    "cpu": ("cpp", "reference"),
    "cuda": ("cuda", "triton", "reference"),
}


@dataclass
class Backend:
    """A set of kernels for some device types.

    ``probe(device_type)`` returns None when the backend can run there, else
    the reason it cannot.  It may be expensive the first time (building or
    loading a library) and is cached per device type.
    """

    name: str
    probe: Callable[[str], str | None]
    kernels: dict[str, Callable] = field(default_factory=dict)
    _status: dict[str, str | None] = field(default_factory=dict)

    def unavailable_reason(self, device_type: str) -> str | None:
        if device_type not in self._status:
            try:
                self._status[device_type] = self.probe(device_type)
            except Exception as exc:  # a broken optional backend must not break the library
                self._status[device_type] = f"{type(exc).__name__}: {exc}"
        return self._status[device_type]


_BACKENDS: dict[str, Backend] = {}
_FORCED: list[str] = []
_LOGGED: set[tuple[str, str]] = set()


def register_backend(backend: Backend) -> None:
    _BACKENDS[backend.name] = backend


def get_backend(name: str) -> Backend:
    if not isinstance(name, str):
        raise TypeError(f"a trust_fast backend name must be a str, got {type(name).__name__}")
    if name not in _BACKENDS:
        raise ValueError(f"unknown trust_fast backend {name!r}; known: {', '.join(BACKEND_NAMES)}")
    return _BACKENDS[name]


def forced_backend() -> str | None:
    """The backend forced by :func:`use_backend` or ``TRUST_FAST_BACKEND`` (None when not forced)."""
    if _FORCED:
        return _FORCED[-1]
    name = os.environ.get(ENV_VAR, "").strip()
    if not name:
        return None
    if name not in BACKEND_NAMES:
        raise ValueError(f"{ENV_VAR}={name!r} is not a backend; choose one of {', '.join(BACKEND_NAMES)}")
    return name


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Force backend ``name`` inside the ``with`` block (takes precedence over the env var)."""
    get_backend(name)
    _FORCED.append(name)
    try:
        yield
    finally:
        _FORCED.pop()


def _device_type(fn: str, device: torch.device | str) -> str:
    """The type of ``device`` ("cpu", "cuda", ...); TypeError/ValueError naming the argument otherwise."""
    if not isinstance(device, (torch.device, str, int)) or isinstance(device, bool):
        raise TypeError(f"{fn}: device must be a torch.device or a str such as 'cuda:0', got {type(device).__name__}")
    try:
        return torch.device(device).type
    except RuntimeError:
        raise ValueError(f"{fn}: device {device!r} is not a torch device") from None


def available_backends(device: torch.device | str | None = None) -> list[str]:
    """Names of the backends that can run on ``device`` (any device type when None)."""
    types = [_device_type("available_backends", device)] if device is not None else ["cpu", "cuda"]
    out = []
    for name in BACKEND_NAMES:
        b = _BACKENDS.get(name)
        if b is not None and any(b.unavailable_reason(t) is None for t in types):
            out.append(name)
    return out


def backend_for(device: torch.device | str) -> str:
    """Name of the backend that runs ops on ``device`` now."""
    dtype_ = _device_type("backend_for", device)
    forced = forced_backend()
    if forced is not None:
        reason = get_backend(forced).unavailable_reason(dtype_)
        if reason is not None:
            raise RuntimeError(f"trust_fast backend {forced!r} was forced but cannot run on {dtype_}: {reason}")
        return forced
    for name in PREFERENCE.get(dtype_, ("reference",)):
        b = _BACKENDS.get(name)
        if b is None:
            continue
        reason = b.unavailable_reason(dtype_)
        if reason is None:
            return name
        if (name, dtype_) not in _LOGGED:
            _LOGGED.add((name, dtype_))
            log.warning("trust_fast: backend %r unavailable on %s (%s); falling back", name, dtype_, reason)
    return "reference"


def kernel_for(op: str, device: torch.device | str) -> Callable:
    """The kernel of ``op`` in the backend chosen for ``device`` (the reference when it has none)."""
    b = _BACKENDS[backend_for(device)]
    return b.kernels.get(op) or _BACKENDS["reference"].kernels[op]
