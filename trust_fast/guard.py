"""The finiteness invariant, in one place: no trust_fast run starts from a model with a NaN or an
Inf in its weights, and none saves one (``TrustUnlearner`` checks at construction and before it
writes; the engine also checks every update's rows as it applies them).

A NaN weight spreads: one NaN in ``attn2.to_k`` makes every image NaN, and an unlearning run on
such a model would save it again with more of them.
"""
from __future__ import annotations

import torch

from . import distributed


class NonFiniteWeights(ValueError):
    """A model holds NaN or Inf weights; the message is one line naming the first tensors."""


def _local(t: torch.Tensor) -> torch.Tensor:
    """A DTensor's local shard (FSDP2), or the tensor itself."""
    return t.to_local() if hasattr(t, "to_local") else t


@torch.no_grad()
def non_finite_tensors(modules: dict[str, torch.nn.Module]) -> list[str]:
    """Names (``component.parameter``) of the floating parameters and buffers of `modules` that
    hold a NaN or an Inf: one reduction per tensor, one host sync per module."""
    bad = []
    for prefix, module in modules.items():
        named = [(n, _local(t)) for n, t in [*module.named_parameters(), *module.named_buffers()]
                 if t.is_floating_point() and not t.is_meta]
        named = [(n, t) for n, t in named if t.numel()]
        if not named:
            continue
        device = named[0][1].device
        flags = torch.stack([torch.isfinite(t).all().to(device) for _, t in named])
        if bool(flags.all()):
            continue
        bad += [f"{prefix}.{n}" for (n, _), ok in zip(named, flags.tolist()) if not ok]
    return bad


def pipeline_modules(pipe) -> dict[str, torch.nn.Module]:
    """The torch modules of a diffusers pipeline, by component name."""
    return {k: v for k, v in pipe.components.items() if isinstance(v, torch.nn.Module)}


def check_finite(pipe, what: str, collective: bool = True) -> None:
    """NonFiniteWeights (one line) when any weight of the pipeline is NaN or Inf; `what` says
    what was refused ("cannot unlearn from", "refusing to save"). Under torch.distributed with
    `collective` every rank checks its own shards and all raise when any rank found one; without,
    this rank checks its own model alone (rank 0 before it saves)."""
    bad = non_finite_tensors(pipeline_modules(pipe))
    if distributed.any_rank(bool(bad)) if collective else bad:
        where = (f"{bad[0]}" + (f" and {len(bad) - 1} more tensors" if len(bad) > 1 else "")) if bad else "another rank's shard"
        raise NonFiniteWeights(f"{what} a model with non-finite weights (NaN or Inf in {where})")


__all__ = ["NonFiniteWeights", "non_finite_tensors", "pipeline_modules", "check_finite"]
