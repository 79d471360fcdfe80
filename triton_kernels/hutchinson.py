"""Triton Hutchinson diagonal: fold z*Hz into running-mean estimates, many tensors per launch.

One program per updated row: per element ``d <- d * count/(count+1) + z*hz/(count+1)``, or
per row with the row mean of z*hz.  The first sample (count 0) stores z*hz without reading d,
so that a NaN/Inf start does not survive (NaN * 0 is NaN).
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
def _stored(x, base):
    """x (float32) in the diag's storage dtype: bfloat16 rounded to nearest even, like the other backends."""
    if base.dtype.element_ty == tl.bfloat16:
        return x.to(tl.bfloat16, fp_downcast_rounding="rtne")
    return x


@triton.jit
def _hutchinson_kernel(
    d_base, h_base, z_base, rows_ptr, table_ptr, n_tensors, keep, n_seen,
    TABLE: tl.constexpr, HAS_ROWS: tl.constexpr, PER_ROW: tl.constexpr, FRESH: tl.constexpr, BLOCK: tl.constexpr,
):
    # table (5, n_tensors): item start, offsets of d, hz, z, width
    k = tl.program_id(0).to(tl.int64)
    idx = tl.arange(0, TABLE)
    starts = tl.load(table_ptr + idx, mask=idx < n_tensors, other=9223372036854775807)
    t = total((starts <= k).to(tl.int32)) - 1
    if HAS_ROWS:
        r = tl.load(rows_ptr + k)
    else:
        r = k - tl.load(table_ptr + t)
    width = tl.load(table_ptr + 4 * n_tensors + t)
    d_off = tl.load(table_ptr + n_tensors + t)
    h_row = h_base + tl.load(table_ptr + 2 * n_tensors + t) + r * width
    z_row = z_base + tl.load(table_ptr + 3 * n_tensors + t) + r * width
    if PER_ROW:
        acc = tl.full([BLOCK], 0.0, tl.float32)
        for c0 in range(0, width, BLOCK):
            cols = c0 + tl.arange(0, BLOCK)
            mask = cols < width
            acc += tl.load(z_row + cols, mask=mask, other=0.0).to(tl.float32) * tl.load(
                h_row + cols, mask=mask, other=0.0
            ).to(tl.float32)
        est = total(acc) / width.to(tl.float32)
        # float32 math; a bfloat16 diag is rounded once, when stored
        if FRESH:
            tl.store(d_base + d_off + r, _stored(est, d_base))
        else:
            d = tl.load(d_base + d_off + r).to(tl.float32)
            tl.store(d_base + d_off + r, _stored(d * keep + tl.div_rn(est, n_seen), d_base))
    else:
        for c0 in range(0, width, BLOCK):
            cols = c0 + tl.arange(0, BLOCK)
            mask = cols < width
            est = tl.load(z_row + cols, mask=mask, other=0.0).to(tl.float32) * tl.load(
                h_row + cols, mask=mask, other=0.0
            ).to(tl.float32)
            d_ptr = d_base + d_off + r * width + cols
            if FRESH:
                tl.store(d_ptr, _stored(est, d_base), mask=mask)
            else:
                d = tl.load(d_ptr, mask=mask, other=0.0).to(tl.float32)
                tl.store(d_ptr, _stored(d * keep + tl.div_rn(est, n_seen), d_base), mask=mask)


def hutchinson_diag_(
    diags: Sequence[Tensor], hz: Sequence[Tensor], z: Sequence[Tensor], rows: Sequence[Tensor] | None, count: int
) -> None:
    """Triton backend of ``trust_fast::hutchinson_diag_`` (arguments already checked)."""
    device = diags[0].device
    groups: dict[tuple, list[int]] = {}
    for i, h in enumerate(hz):
        n_items = rows[i].numel() if rows is not None else h.shape[0]
        if n_items == 0 or h.numel() == 0:
            continue
        per_row = diags[i].shape != h.shape
        groups.setdefault((h.dtype, diags[i].dtype, per_row, block_and_warps(h.numel() // h.shape[0])), []).append(i)
    for (_, _, per_row, (block, warps)), idx in groups.items():
        ds = [diags[i] for i in idx]
        hs = [hz[i].contiguous() for i in idx]
        zs = [z[i].contiguous() for i in idx]
        counts = [rows[i].numel() if rows is not None else hz[i].shape[0] for i in idx]
        table = int64_table(
            [
                prefix_starts(counts),
                element_offsets(ds, ds[0]),
                element_offsets(hs, hs[0]),
                element_offsets(zs, zs[0]),
                [h.numel() // h.shape[0] for h in hs],
            ],
            device,
        )
        rows_cat = torch.cat([rows[i].to(torch.int64) for i in idx]) if rows is not None else table
        _hutchinson_kernel[(sum(counts),)](
            ds[0], hs[0], zs[0], rows_cat, table, len(ds), count / (count + 1), float(count + 1),
            TABLE=table_block(len(ds)), HAS_ROWS=rows is not None, PER_ROW=per_row, FRESH=count == 0, BLOCK=block,
            num_warps=warps,
        )
