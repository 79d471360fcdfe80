"""Data-parallel helpers: the engine under torch.distributed (DDP-style, launched by torchrun or
`accelerate launch`), every rank drawing its own batches.

TRUST must select the same rows on every rank, or the ranks' weights drift apart. The engine
therefore averages the target gradients over the ranks *before* localization
(:func:`average_`), so every rank scores the same gradient, and after selecting checks the
selection with one small all-reduce (:func:`check_same_rows`): a rank whose rows differ fails
loudly instead of training a different model. Outside an initialised process group every helper
is a no-op, so single-process code pays nothing.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor


def active() -> bool:
    """True inside an initialised process group with more than one rank."""
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if active() else 0


def world_size() -> int:
    import torch.distributed as dist

    return dist.get_world_size() if active() else 1


@torch.no_grad()
def average_(tensors: Sequence[Tensor]) -> None:
    """All-reduce `tensors` in place to their mean over the ranks, one collective per dtype/device.

    The tensors are packed into one flat buffer, so N parameters cost one all-reduce, not N. The
    result is bitwise the same on every rank (the collective returns one sum to all of them)."""
    if not active() or not tensors:
        return
    import torch.distributed as dist

    n = dist.get_world_size()
    groups: dict[tuple, list[Tensor]] = {}
    for t in tensors:
        groups.setdefault((t.dtype, t.device), []).append(t)
    for ts in groups.values():
        flat = torch.cat([t.reshape(-1) for t in ts])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        flat.div_(n)
        offset = 0
        for t in ts:
            t.copy_(flat[offset:offset + t.numel()].view_as(t))
            offset += t.numel()


class RankMismatchError(RuntimeError):
    """Ranks selected different rows: their models would drift apart."""


def rows_checksum(rows: Sequence[Tensor]) -> Tensor:
    """A float64 (2,) fingerprint of a selection: (number of rows, sum over tensors k and rows r of
    a pseudo-random odd weight of (k, r)). Equal selections give equal checksums; a differing row
    changes the second entry unless two hash values collide exactly."""
    count = torch.zeros((), dtype=torch.float64)
    total = torch.zeros((), dtype=torch.float64)
    for k, r in enumerate(rows):
        r = r.detach().to("cpu", torch.int64)
        # multiplicative hash of (tensor, row) kept below 2**31 so float64 sums stay exact
        h = ((r + 1) * 2654435761 + (k + 1) * 40503) % 2147483647
        count += r.numel()
        total += h.to(torch.float64).sum()
    return torch.stack([count, total])


def check_same_rows(rows: Sequence[Tensor], step: int | None = None) -> None:
    """Raise :class:`RankMismatchError` on every rank when any two ranks selected different rows.

    One all-reduce of 4 float64 numbers (min and max of the checksum), so it is cheap enough for
    every step."""
    if not active():
        return
    import torch.distributed as dist

    c = rows_checksum(rows)
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    lo_hi = torch.cat([c, -c]).to(device)
    dist.all_reduce(lo_hi, op=dist.ReduceOp.MAX)
    hi, neg_lo = lo_hi[:2].cpu(), lo_hi[2:].cpu()
    if not torch.equal(hi, -neg_lo):
        at = f" at step {step}" if step is not None else ""
        raise RankMismatchError(
            f"ranks selected different rows{at} (rank {dist.get_rank()}: {int(c[0])} rows, checksum {int(c[1])}; "
            f"max over ranks {int(hi[0])} rows, checksum {int(hi[1])}): gradients were not averaged identically "
            "on every rank (is every rank calling update() each step with the same config?)")


def any_rank(flag: bool) -> bool:
    """True on every rank when `flag` is True on at least one (e.g. a non-finite loss)."""
    if not active():
        return flag
    import torch.distributed as dist

    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


__all__ = ["active", "rank", "world_size", "average_", "rows_checksum", "check_same_rows", "any_rank",
           "RankMismatchError"]
