"""Fully sharded data parallel (FSDP2, ``torch.distributed.fsdp.fully_shard``) for denoisers that do
not fit one device.

FSDP2 shards every parameter along dim 0, which is TRUST's row axis: each rank holds a contiguous
block of every target's rows (``torch.chunk`` of the rows over the ranks) and trains those. The
engine (:class:`trust_fast.TrustUnlearner`) recognises a denoiser whose target weights are FSDP2
DTensors and then works on this rank's shards (:class:`Sharding`):

- gradients come from ``loss.backward()``: FSDP2 reduce-scatters them, so each rank receives the
  mean over the ranks of its own rows' gradient (no all-reduce of its own);
- localization scores this rank's rows, all-gathers the per-row scores (one float per row, not the
  gradients) and selects on the whole layer, identically on every rank, then keeps its own rows;
- MaskedAdamW, the frozen copy theta_0 and the Hutchinson diagonal exist for this rank's rows only,
  so all three shrink with the number of ranks;
- the frozen model's passes copy theta_0 into the local shards for the pass (FSDP2 all-gathers the
  shards afresh for each forward) and back afterwards;
- the Hessian term's products H z are finite differences of the retain gradient,
  (g(theta + eps z) - g(theta)) / eps, because gradients that FSDP2 reduce-scatters cannot be
  differentiated again; the retain loss must then be given as a function (:meth:`update`'s callable
  form, which :meth:`step` uses).

:func:`shard_denoiser` shards a diffusers denoiser the usual way (each block, then the root);
:func:`gather_module` brings a plain copy back to rank 0 for saving and evaluation.
"""
from __future__ import annotations

import contextlib
from collections.abc import Sequence

import torch
from torch import Tensor, nn


def is_sharded(t) -> bool:
    """True for an FSDP2 parameter (a DTensor)."""
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # a torch without distributed
        return False
    return isinstance(t, DTensor)


def _blocks(module: nn.Module) -> list[nn.Module]:
    """The denoiser's repeated blocks: the entries of its ModuleLists of blocks (UNet down/up
    blocks, transformer blocks) and its mid block, outermost first."""
    out = []
    for name, child in module.named_children():
        if isinstance(child, nn.ModuleList) and name.endswith("blocks"):
            out.extend(child)
        elif name == "mid_block" and child is not None:
            out.append(child)
    return out


def shard_denoiser(denoiser: nn.Module, mp_policy=None, reshard_after_forward: bool = True) -> nn.Module:
    """``fully_shard`` every block of `denoiser` and then the denoiser itself (in place; returns it).
    Call it under an initialised process group, before building the unlearner. `mp_policy`: an
    FSDP2 ``MixedPrecisionPolicy`` (say param_dtype=torch.bfloat16 on GPUs); the sharded
    parameters stay in their dtype (float32), which the unlearner's optimizer steps."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    kw = {"reshard_after_forward": reshard_after_forward, "mp_policy": mp_policy or MixedPrecisionPolicy()}
    for block in _blocks(denoiser):
        fully_shard(block, **kw)
    fully_shard(denoiser, **kw)
    return denoiser


def plain_class(module) -> type:
    """The class `module` had before ``fully_shard`` (which swaps in a subclass named FSDP<class>)."""
    if not type(module).__name__.startswith("FSDP"):
        return type(module)
    from torch.distributed.fsdp import FSDPModule

    for cls in type(module).__mro__:
        if not issubclass(cls, FSDPModule):
            return cls
    return type(module)


def gather_module(module: nn.Module) -> nn.Module | None:
    """A plain, unsharded copy of an FSDP2 diffusers model on rank 0 (None on the other ranks),
    built from its config and loaded with the full state dict. Every rank must call it."""
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    full = get_model_state_dict(module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if dist.get_rank() != 0:
        return None
    cls = plain_class(module)
    plain = cls.from_config(module.config)
    plain.load_state_dict(full)
    dtype = next(iter(full.values())).dtype
    if plain.dtype != dtype:
        plain = plain.to(dtype)
    return plain.eval().requires_grad_(False)


class Sharding:
    """This rank's shard of every target weight of an FSDP2 denoiser: where its rows sit in the
    whole weight, and the collectives that make localization and checks act on whole weights.

    Build it with :meth:`of` (None when the targets are not sharded)."""

    def __init__(self, weights: Sequence[Tensor]):
        import torch.distributed as dist

        self.world, self.rank = dist.get_world_size(), dist.get_rank()
        self.global_rows, self.starts, self.local_rows, self.chunks = [], [], [], []
        for w in weights:
            placements = getattr(w, "placements", ())
            if len(placements) != 1 or not placements[0].is_shard(0):
                raise ValueError(f"an FSDP2 target weight must be sharded along dim 0 over one mesh dimension, "
                                 f"got placements {placements}")
            n = w.shape[0]
            chunk = -(-n // self.world)
            start = min(self.rank * chunk, n)
            local = w.to_local().shape[0]
            if local != max(0, min(chunk, n - start)):
                raise ValueError(f"an FSDP2 shard of {local} rows of {n} on rank {self.rank} is not torch.chunk's")
            self.global_rows.append(n)
            self.starts.append(start)
            self.local_rows.append(local)
            self.chunks.append(chunk)
        self.selected = 0  # rows of the whole targets in the last selection

    @classmethod
    def of(cls, weights: Sequence[Tensor]) -> "Sharding | None":
        flags = [is_sharded(w) for w in weights]
        if not any(flags):
            return None
        if not all(flags):
            raise ValueError("some target weights are FSDP2-sharded and some are not: shard the whole denoiser "
                             "(trust_fast.fsdp.shard_denoiser)")
        return cls(weights)

    @staticmethod
    def local(t: Tensor | None) -> Tensor | None:
        """This rank's rows of a sharded parameter, as a plain tensor sharing its storage."""
        return None if t is None else t.to_local().detach()

    # ------------------------------------------------------------------ gradients

    @staticmethod
    def grads(loss: Tensor, params: Sequence[Tensor]) -> list[Tensor]:
        """The mean over the ranks of d loss / d param, this rank's rows (float32 like the params):
        one backward, reduce-scattered by FSDP2; the params' .grad is left empty."""
        for p in params:
            p.grad = None
        loss.backward()
        out = []
        for p in params:
            g = p.grad
            out.append(g.to_local() if g is not None else torch.zeros_like(p.to_local()).detach())
            p.grad = None
        return out

    # ----------------------------------------------------------------- selection

    def gather_scores(self, scores: Tensor) -> Tensor:
        """Per-row scores of this rank's rows (flat, targets in order) -> the whole targets' scores
        (flat, the same on every rank): one all-gather of (targets' chunk sizes) floats."""
        import torch.distributed as dist

        padded = scores.new_zeros(sum(self.chunks))
        src = dst = 0
        for n, c in zip(self.local_rows, self.chunks):
            padded[dst:dst + n] = scores[src:src + n]
            src, dst = src + n, dst + c
        parts = [torch.empty_like(padded) for _ in range(self.world)]
        dist.all_gather(parts, padded)
        out, dst = [], 0
        for n, c in zip(self.global_rows, self.chunks):
            for r, part in enumerate(parts):
                take = max(0, min(c, n - r * c))
                out.append(part[dst:dst + take])
            dst += c
        return torch.cat(out)

    def to_local_rows(self, rows: Sequence[Tensor]) -> list[Tensor]:
        """Selected rows of the whole targets -> this rank's rows, as indices into its shards."""
        out = []
        for r, start, n in zip(rows, self.starts, self.local_rows):
            keep = (r >= start) & (r < start + n)
            out.append(r[keep] - start)
        return out

    def localizer(self):
        """A drop-in for :func:`trust_fast.localize.localize_rows` on this rank's shards: local
        saliency, gathered scores, selection on the whole layers (checked identical across ranks),
        this rank's rows returned."""
        from . import distributed, ops

        def localize(grads, weights, rows_per_tensor, mode, xi, max_fraction):
            scores = self.gather_scores(ops.row_saliency(grads, weights, mode))
            rows = ops.select_rows(scores, self.global_rows, xi, max_fraction)
            distributed.check_same_rows(rows)
            self.selected = sum(int(r.numel()) for r in rows)
            return self.to_local_rows(rows)

        return localize

    # -------------------------------------------------------------- frozen model

    @staticmethod
    @contextlib.contextmanager
    def swapped(params: Sequence[Tensor], values: Sequence[Tensor], rows: Sequence[Tensor | None] | None = None):
        """`values` (a sequence, or an iterable made one tensor at a time) in the local shards
        `params` for the duration (the frozen model's passes), the params' own values back
        afterwards, bit for bit. With `rows` (per param: the rows that may differ, or None for
        all of them) only those rows are swapped and saved, so a pass that puts theta_0 back into
        a row-sparse edit copies the edited rows, not whole shards."""
        whole = rows is None
        rows = [None] * len(params) if whole else list(rows)
        if len(rows) != len(params):
            raise ValueError(f"swapped: {len(rows)} row sets for {len(params)} params")
        # inside a whole-shard swap of the same params (a finite-difference probe shifts every row),
        # every row differs from what the caller's rows describe: swap those params whole
        rows = [None if id(p) in _WHOLE else r for p, r in zip(params, rows)]
        if whole:
            for p in params:
                _WHOLE[id(p)] = _WHOLE.get(id(p), 0) + 1
        try:
            with Sharding._swap(params, values, rows):
                yield
        finally:
            if whole:
                for p in params:
                    _WHOLE[id(p)] -= 1
                    if not _WHOLE[id(p)]:
                        del _WHOLE[id(p)]

    @staticmethod
    @contextlib.contextmanager
    def _swap(params, values, rows):
        with torch.no_grad():
            own = [p.clone() if r is None else p[r] for p, r in zip(params, rows)]
            for p, v, r in zip(params, values, rows):
                if r is None:
                    p.copy_(v)
                elif r.numel():
                    p[r] = v[r]
        try:
            yield
        finally:
            with torch.no_grad():
                for p, v, r in zip(params, own, rows):
                    if r is None:
                        p.copy_(v)
                    elif r.numel():
                        p[r] = v


# ids of the params under a whole-shard Sharding.swapped (and how deeply nested)
_WHOLE: dict[int, int] = {}


__all__ = ["is_sharded", "shard_denoiser", "plain_class", "gather_module", "Sharding"]
