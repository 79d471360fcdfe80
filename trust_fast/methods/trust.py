"""TRUST: dynamic neuron localization in the cross-attention projections, anchor mapping,
retain self-distillation, Hessian regularizer, row-sparse AdamW."""
from __future__ import annotations

from ..config import TrustConfig


def config(**overrides) -> TrustConfig:
    return TrustConfig(method="trust").replace(**overrides)
