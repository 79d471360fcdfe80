"""Unlearning methods: presets of the one engine's TrustConfig and the pieces they name, each
method one module that registers them (:mod:`trust_fast.methods.base`).

| method | trains | localization | forget objective | retain | optimizer |
| --- | --- | --- | --- | --- | --- |
| trust | attn2 to_q/to_k/to_v + ff.net.0.proj/ff.net.2 | dynamic rows, z > xi every step | anchor mapping (frozen) | self-distillation + Hessian | MaskedAdamW |
| salun | whole UNet | static top-50% weight mask, once | current model on a pseudo prompt | diffusion loss x 0.5 | Adam, grad *= mask |
| esd | all of the cross-attention (esd-x: attn2 on a UNet, the joint attention on SD3) | none (dense) | negative guidance, eta 1 | none | Adam |
"""
from __future__ import annotations

from ..config import TrustConfig
from . import trust, salun, esd  # noqa: F401, I001  (each registers its pieces and its preset, in this order)
from .base import (FORGET_OBJECTIVES, LOCALIZATIONS, METHODS, ForgetObjective, Localization, register_forget_objective,
                   register_localization, register_method)


def config(method: str = "trust", **overrides) -> TrustConfig:
    """The TrustConfig of a method, with field overrides (e.g. steps=100, lr=1e-4)."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    return METHODS[method](**overrides)


__all__ = ["METHODS", "FORGET_OBJECTIVES", "LOCALIZATIONS", "ForgetObjective", "Localization", "config",
           "register_method", "register_forget_objective", "register_localization"]
