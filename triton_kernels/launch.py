"""Launch helpers shared by the Triton kernels: block sizes and multi-tensor tables.

Multi-tensor pattern: all tensors of one dtype are addressed from one base
pointer (the first tensor) plus a per-tensor element offset, so a single
launch covers every parameter without copying them into one buffer.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import triton
from torch import Tensor

MAX_BLOCK = 2048


def block_and_warps(width: int) -> tuple[int, int]:
    """Column block (power of two, 16..MAX_BLOCK) and warp count for rows of ``width`` elements."""
    block = min(MAX_BLOCK, max(16, triton.next_power_of_2(max(1, width))))
    warps = 1 if block <= 256 else 2 if block <= 512 else 4 if block <= 1024 else 8
    return block, warps


def table_block(n: int) -> int:
    """Power-of-two block that holds a per-tensor table of ``n`` entries."""
    return max(16, triton.next_power_of_2(max(1, n)))


def element_offsets(tensors: Sequence[Tensor], base: Tensor) -> list[int]:
    """Offset of each tensor's first element from ``base``'s, in elements of ``base``'s dtype."""
    size = base.element_size()
    out = []
    for t in tensors:
        delta = t.data_ptr() - base.data_ptr()
        if t.dtype != base.dtype or delta % size:
            raise ValueError(f"tensor of dtype {t.dtype} cannot be addressed from a {base.dtype} base pointer")
        out.append(delta // size)
    return out


def int64_table(columns: Sequence[Sequence[int]], device: torch.device) -> Tensor:
    """Columns of per-tensor ints as one contiguous int64 (n_columns, n_tensors) device tensor (one copy)."""
    host = torch.tensor([list(c) for c in columns], dtype=torch.int64)
    if device.type == "cuda":
        return host.pin_memory().to(device, non_blocking=True)
    return host.to(device)


def prefix_starts(counts: Sequence[int]) -> list[int]:
    """Exclusive prefix sums: where each tensor's items start in the concatenation."""
    out, acc = [], 0
    for c in counts:
        out.append(acc)
        acc += int(c)
    return out
