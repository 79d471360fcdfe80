"""Where to edit: target modules by glob, per-row saliency, dynamic row selection, SalUn's static mask.

A *target* is a module that owns parameters (a Linear, a Conv2d, a norm) whose qualified name
matches one of the glob patterns, e.g. ``"*attn2.to_k"``. A *row* is an index along dim 0 of its
weight (an output neuron); the bias of a target shares the weight's rows.
"""
from __future__ import annotations

import fnmatch
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from . import ops

#: The modules of the paper's reviewed version: the cross-attention projections, where the prompt's
#: tokens are read.
ATTN2_QKV_TARGETS: tuple[str, ...] = ("*attn2.to_q", "*attn2.to_k", "*attn2.to_v")
#: TRUST's default: the cross-attention projections and the feed-forward layers of the same
#: transformer blocks (GEGLU projection and output).  Editing only q/k/v changes how the
#: concept's words are read, and optimized prefix embeddings find another way in (soft-prompt
#: ASR 0.94-0.96 on circle and striped in the shapes world); neurons in the feed-forward layers
#: also carry what is drawn, and selecting among them too brought that ASR to 0.09 (circle) and
#: 0.40-0.42 (striped) at no cost in retain accuracy (BENCHMARKS.md, "Engine").
DEFAULT_TARGETS: tuple[str, ...] = ATTN2_QKV_TARGETS + ("*ff.net.0.proj", "*ff.net.2")


@dataclass
class Target:
    """One target module: its name, weight (rows along dim 0) and optional bias."""

    name: str
    module: nn.Module
    weight: Tensor
    bias: Tensor | None

    @property
    def params(self) -> list[Tensor]:
        return [self.weight] + ([self.bias] if self.bias is not None else [])

    @property
    def rows(self) -> int:
        return self.weight.shape[0]


def find_targets(model: nn.Module, patterns: tuple[str, ...] | list[str]) -> list[Target]:
    """Modules of `model` owning a `weight` whose name matches a glob pattern, in model order.

    ValueError when nothing matches (a typo in a pattern must not silently train nothing)."""
    out = []
    for name, mod in model.named_modules():
        w = mod._parameters.get("weight")
        if w is None or not any(fnmatch.fnmatchcase(name, p) for p in patterns):
            continue
        b = mod._parameters.get("bias")
        out.append(Target(name, mod, w, b if b is not None and b.shape[:1] == w.shape[:1] else None))
    if not out:
        raise ValueError(f"no module of the denoiser matches the target patterns {list(patterns)}")
    return out


def freeze_all_but(model: nn.Module, targets: list[Target]) -> int:
    """requires_grad False for every parameter outside the targets, True inside; returns trainable count."""
    keep = {id(p) for t in targets for p in t.params}
    for p in model.parameters():
        p.requires_grad_(id(p) in keep)
    return sum(p.numel() for t in targets for p in t.params)


def saliency(targets: list[Target], grads: list[Tensor], mode: str = "g") -> Tensor:
    """Per-row score of every target, flat float32 (rows of target 0 first).

    `grads[i]` is the forget-loss gradient of `targets[i].weight`. mode "g": mean |g| per row;
    "gw": mean |g * w| per row."""
    weights = [t.weight for t in targets] if mode == "gw" else None
    return ops.row_saliency(grads, weights, mode)


def select(targets: list[Target], scores: Tensor, xi: float = 2.0,
           max_fraction: float | None = None) -> list[Tensor]:
    """Rows whose z-score within their layer exceeds xi: one int64 index tensor per target.

    A target whose scores are all equal selects no rows; a NaN or +-Inf score is refused
    (ValueError naming the target's index: its z-scores are undefined; the engine skips a step
    whose gradient is not finite before it localizes). See :func:`trust_fast.ops.select_rows`."""
    return ops.select_rows(scores, [t.rows for t in targets], xi, max_fraction)


def localize_rows(grads: list[Tensor], weights: list[Tensor] | None, rows_per_tensor: list[int], mode: str,
                  xi: float, max_fraction: float | None) -> list[Tensor]:
    """The op-layer part of localization, saliency then selection, as one function of tensors:
    what :class:`DynamicLocalizer` compiles (one graph, no break) with ``compile=True``.

    grads[i] (and weights[i] for mode "gw"): (rows_i, ...) float tensors on one device. Returns
    one ascending int64 index tensor per input; ValueError when a saliency is not finite (see
    :func:`select`)."""
    return ops.select_rows(ops.row_saliency(grads, weights, mode), rows_per_tensor, xi, max_fraction)


def compile_op_layer(fn):
    """torch.compile `fn` (a function of op-layer calls) as one graph: fullgraph, dynamic sizes,
    data-dependent output sizes (select_rows) captured instead of breaking the graph."""
    compiled = torch.compile(fn, fullgraph=True, dynamic=True)

    def run(*args, **kwargs):
        with torch._dynamo.config.patch(capture_dynamic_output_shape_ops=True):
            return compiled(*args, **kwargs)

    return run


class DynamicLocalizer:
    """Re-estimates the concept rows every `interval` steps from the forget gradient (TRUST).

    Between re-estimations the previous selection is reused. With `compile`, saliency and
    selection run as one torch.compile graph (:func:`localize_rows`); `localize` replaces that
    function (same signature), e.g. by one that gathers scores over ranks. A NaN or Inf saliency
    is refused (see :func:`select`)."""

    def __init__(self, targets: list[Target], xi: float = 2.0, interval: int = 1, mode: str = "g",
                 max_fraction: float | None = None, compile: bool = False, localize=None):
        if interval < 1:
            raise ValueError(f"loc_interval must be >= 1, got {interval}")
        self.targets, self.xi, self.interval, self.mode, self.max_fraction = targets, xi, interval, mode, max_fraction
        self.rows: list[Tensor] | None = None
        self.total_rows = sum(t.rows for t in targets)
        # `localize`: a function like localize_rows in its place (FSDP2: trust_fast.fsdp.Sharding.localizer)
        self._localize = localize or (compile_op_layer(localize_rows) if compile else localize_rows)

    def __call__(self, step: int, grads: list[Tensor]) -> list[Tensor]:
        if self.rows is None or step % self.interval == 0:
            weights = [t.weight.detach() for t in self.targets] if self.mode == "gw" else None
            self.rows = self._localize([g.detach() for g in grads], weights, [t.rows for t in self.targets],
                                       self.mode, self.xi, self.max_fraction)
        return self.rows


def _kth_largest_abs(tensors: list[Tensor], k: int) -> Tensor:
    """The k-th largest |x| over all `tensors` (float32 scalar), without concatenating them:
    bisection on the int32 bit patterns of |x|, which order like the non-negative floats they
    encode (31 counting passes; a sort or kthvalue of all 860M SD-1.5 weights needs 7 GB more)."""
    def count_at_least(bits: int) -> int:
        return sum(int((t.detach().abs().float().view(torch.int32) >= bits).sum()) for t in tensors)

    lo, hi = 0, 0x7F800001  # count(>= lo) >= k always; count(>= hi) < k unless NaNs fill the top
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if count_at_least(mid) >= k:
            lo = mid
        else:
            hi = mid
    return torch.tensor(lo, dtype=torch.int32).view(torch.float32).to(tensors[0].device)


def static_mask(grad_sums: list[Tensor], fraction: float = 0.5) -> list[Tensor]:
    """SalUn's weight saliency mask: 1 for the `fraction` of elements with the largest |summed
    forget gradient|, ranked over all tensors together (one global threshold), else 0.

    Returns boolean masks shaped like the gradients (a quarter of float32's memory)."""
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"mask fraction must be in (0, 1], got {fraction}")
    total = sum(g.numel() for g in grad_sums)
    k = max(1, int(round(fraction * total)))
    threshold = _kth_largest_abs(grad_sums, k)
    return [g.detach().abs().float() >= threshold for g in grad_sums]
