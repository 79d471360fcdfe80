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

import contextlib
import hashlib
import os
import pickle
from collections.abc import Callable, Sequence
from typing import ContextManager

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


def broadcast_(tensors: Sequence[Tensor], src: int = 0) -> None:
    """Overwrite `tensors` in place with rank `src`'s values (a no-op outside torch.distributed):
    state every rank must start from alike, drawn from a rank's own generator."""
    if not active():
        return
    import torch.distributed as dist

    for t in tensors:
        dist.broadcast(t, src=src)


def broadcast_object(obj, src: int = 0):
    """Rank `src`'s `obj` (picklable), on every rank; `obj` itself outside torch.distributed."""
    if not active():
        return obj
    import torch.distributed as dist

    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def _portable(error: BaseException | None) -> BaseException | None:
    """`error` itself when it pickles (so other ranks raise the same type), else a RuntimeError
    carrying its text."""
    if error is None:
        return None
    try:
        pickle.dumps(error)
        return error
    except Exception:
        return RuntimeError(f"rank 0: {type(error).__name__}: {error}")


@contextlib.contextmanager
def lead_then_follow(lead: Callable[[], ContextManager], follow: Callable[[], ContextManager] | None = None):
    """Enter `lead()` on rank 0 first; one broadcast then tells the other ranks whether it could.
    They enter `follow()` (when given; else they yield None) only after rank 0 succeeded, and raise
    rank 0's exception when it failed, so a refusal stops every rank at the same point instead of
    leaving some waiting in a collective. Outside torch.distributed: `lead()` alone."""
    if not active():
        with lead() as out:
            yield out
        return
    with contextlib.ExitStack() as stack:
        error, out = None, None
        if rank() == 0:
            try:
                out = stack.enter_context(lead())
            except Exception as e:  # the others must hear of any failure, or they wait for rank 0 forever
                error = e
        shared = broadcast_object(_portable(error))
        if error is not None:
            raise error
        if shared is not None:
            raise shared
        if follow is not None:
            out = stack.enter_context(follow())
        yield out


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


def launched_world_size() -> int:
    """The number of processes `torchrun` / `accelerate launch` started (WORLD_SIZE; 1 without one),
    known before any process group exists."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def init_from_env() -> bool:
    """Join the process group that `torchrun` or `accelerate launch` describe in the environment
    (WORLD_SIZE > 1, RANK, LOCAL_RANK, MASTER_ADDR, MASTER_PORT): NCCL when CUDA is available (each
    process on GPU LOCAL_RANK), gloo otherwise. Returns True when this call created the group (the
    caller then destroys it with :func:`shutdown`); False for a single process or a group that
    already exists."""
    import torch.distributed as dist

    if launched_world_size() <= 1 or not dist.is_available() or dist.is_initialized():
        return False
    for name in ("RANK", "MASTER_ADDR", "MASTER_PORT"):
        if name not in os.environ:
            raise ValueError(f"WORLD_SIZE is {os.environ['WORLD_SIZE']} but {name} is not set: launch with "
                             "torchrun or accelerate launch, which set all of them")
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl")
    else:
        dist.init_process_group("gloo")
    return True


def shutdown() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    if active():
        import torch.distributed as dist

        dist.barrier()


def weights_digest(tensors: Sequence[Tensor]) -> str:
    """SHA-256 of the tensors' bytes, in order: equal digests mean bit-identical weights."""
    h = hashlib.sha256()
    for t in tensors:
        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def gather_digests(tensors: Sequence[Tensor]) -> list[str]:
    """Every rank's :func:`weights_digest` (rank order), on every rank; one entry outside a group."""
    digest = weights_digest(tensors)
    if not active():
        return [digest]
    import torch.distributed as dist

    out: list = [None] * dist.get_world_size()
    dist.all_gather_object(out, digest)
    return out


__all__ = ["active", "rank", "world_size", "average_", "broadcast_", "broadcast_object", "lead_then_follow",
           "rows_checksum", "check_same_rows", "any_rank", "RankMismatchError", "launched_world_size",
           "init_from_env", "shutdown", "barrier", "weights_digest", "gather_digests"]
