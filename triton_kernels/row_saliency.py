"""Triton row saliency: per output row mean |g| or |g*w| over many tensors in one launch.

One program per output row.  The program finds its tensor by comparing its
row against the table of tensor row starts (one vector load, no search loop),
then streams the row in column blocks with float32 accumulation.  Tensors are
grouped by dtype and by row-width class (so narrow rows do not run in wide
blocks): usually one to three launches in all.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import triton
import triton.language as tl
from torch import Tensor

from .reduce import total
from .launch import block_and_warps, element_offsets, int64_table, prefix_starts, table_block


@triton.jit
def _row_saliency_kernel(
    g_base, w_base, out_ptr, table_ptr, n_tensors,
    TABLE: tl.constexpr, USE_W: tl.constexpr, BLOCK: tl.constexpr,
):
    # table (5, n_tensors): row start in this launch, g offset, w offset, width, row start in out
    row = tl.program_id(0).to(tl.int64)
    idx = tl.arange(0, TABLE)
    starts = tl.load(table_ptr + idx, mask=idx < n_tensors, other=9223372036854775807)
    t = total((starts <= row).to(tl.int32)) - 1
    local = row - tl.load(table_ptr + t)
    width = tl.load(table_ptr + 3 * n_tensors + t)
    g_row = g_base + tl.load(table_ptr + n_tensors + t) + local * width
    w_row = w_base + tl.load(table_ptr + 2 * n_tensors + t) + local * width
    acc = tl.full([BLOCK], 0.0, tl.float32)
    for c0 in range(0, width, BLOCK):
        cols = c0 + tl.arange(0, BLOCK)
        mask = cols < width
        x = tl.load(g_row + cols, mask=mask, other=0.0).to(tl.float32)
        if USE_W:
            x = x * tl.load(w_row + cols, mask=mask, other=0.0).to(tl.float32)
        acc += tl.abs(x)
    out_row = tl.load(table_ptr + 4 * n_tensors + t) + local
    tl.store(out_ptr + out_row, total(acc) / width.to(tl.float32))


def row_saliency(tensors: Sequence[Tensor], weights: Sequence[Tensor] | None, mode: str) -> Tensor:
    """Triton backend of ``trust_fast::row_saliency`` (arguments already checked)."""
    device = tensors[0].device
    rows = [t.shape[0] for t in tensors]
    out_starts = prefix_starts(rows)
    out = torch.empty(sum(rows), dtype=torch.float32, device=device)
    use_w = mode == "gw"
    groups: dict[tuple, list[int]] = {}
    for i, t in enumerate(tensors):
        if t.numel() == 0:
            out[out_starts[i] : out_starts[i] + rows[i]] = 0.0
            continue
        groups.setdefault((t.dtype, block_and_warps(t.numel() // rows[i])), []).append(i)
    for (_, (block, warps)), idx in groups.items():
        gs = [tensors[i].contiguous() for i in idx]
        ws = [weights[i].contiguous() for i in idx] if use_w else gs
        group_rows = [rows[i] for i in idx]
        table = int64_table(
            [
                prefix_starts(group_rows),
                element_offsets(gs, gs[0]),
                element_offsets(ws, ws[0]),
                [g.numel() // g.shape[0] for g in gs],
                [out_starts[i] for i in idx],
            ],
            device,
        )
        _row_saliency_kernel[(sum(group_rows),)](
            gs[0], ws[0], out, table, len(gs),
            TABLE=table_block(len(gs)), USE_W=use_w, BLOCK=block, num_warps=warps,
        )
    return out
