"""Triton masked AdamW: AdamW on selected rows of many parameters in one launch.

One program per selected row (so each slot's step count has one writer).  It
finds its tensor from the table of item starts, bumps the slot's step count,
computes the bias corrections in float64 (powers by repeated squaring) and
streams the row in column blocks with float32 math, in torch.optim.AdamW's
operation order.  Rows not listed are never touched.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from trust_fast.ops.reference import AdamWArgs

from .reduce import total
from .launch import block_and_warps, element_offsets, int64_table, prefix_starts, table_block


@triton.jit
def _masked_adamw_kernel(
    p_base, g_base, m_base, v_base, s_base, h_base, p0_base,
    rows_ptr, slots_ptr, table_ptr, hyper_ptr, n_tensors,
    TABLE: tl.constexpr, PENALTY: tl.constexpr, H_PER_ROW: tl.constexpr, BF16: tl.constexpr, BLOCK: tl.constexpr,
):
    # table (9, n_tensors): item start, offsets of p, g, m, v, step, h, p0, width
    k = tl.program_id(0).to(tl.int64)
    idx = tl.arange(0, TABLE)
    starts = tl.load(table_ptr + idx, mask=idx < n_tensors, other=9223372036854775807)
    t = total((starts <= k).to(tl.int32)) - 1
    r = tl.load(rows_ptr + k)
    s = tl.load(slots_ptr + k)
    width = tl.load(table_ptr + 8 * n_tensors + t)
    p_row = p_base + tl.load(table_ptr + n_tensors + t) + r * width
    g_row = g_base + tl.load(table_ptr + 2 * n_tensors + t) + r * width
    m_row = m_base + tl.load(table_ptr + 3 * n_tensors + t) + s * width
    v_row = v_base + tl.load(table_ptr + 4 * n_tensors + t) + s * width
    step_ptr = s_base + tl.load(table_ptr + 5 * n_tensors + t) + s

    lr = tl.load(hyper_ptr)
    beta1 = tl.load(hyper_ptr + 1)
    beta2 = tl.load(hyper_ptr + 2)
    eps = tl.load(hyper_ptr + 3).to(tl.float32)
    weight_decay = tl.load(hyper_ptr + 4)
    lam = tl.load(hyper_ptr + 5).to(tl.float32)

    step = tl.load(step_ptr) + 1.0
    tl.store(step_ptr, step)
    # beta ** step in float64 by repeated squaring (exact enough for any step count)
    n = step.to(tl.int64)
    pow1 = beta1 * 0.0 + 1.0
    pow2 = beta2 * 0.0 + 1.0
    base1 = beta1
    base2 = beta2
    while n > 0:
        odd = n % 2 == 1
        pow1 = tl.where(odd, pow1 * base1, pow1)
        pow2 = tl.where(odd, pow2 * base2, pow2)
        base1 = base1 * base1
        base2 = base2 * base2
        n = n // 2
    bc1 = 1.0 - pow1
    bc2 = 1.0 - pow2
    step_size = (lr / bc1).to(tl.float32)
    bc2_sqrt = tl.sqrt_rn(bc2.to(tl.float32))
    decay = (1.0 - lr * weight_decay).to(tl.float32)
    one_m_b1 = (1.0 - beta1).to(tl.float32)
    one_m_b2 = (1.0 - beta2).to(tl.float32)
    b2 = beta2.to(tl.float32)

    for c0 in range(0, width, BLOCK):
        cols = c0 + tl.arange(0, BLOCK)
        mask = cols < width
        x = tl.load(p_row + cols, mask=mask, other=0.0).to(tl.float32)
        g = tl.load(g_row + cols, mask=mask, other=0.0).to(tl.float32)
        if PENALTY:
            h_off = tl.load(table_ptr + 6 * n_tensors + t)
            p0_row = p0_base + tl.load(table_ptr + 7 * n_tensors + t) + r * width
            if H_PER_ROW:
                h = tl.load(h_base + h_off + r)
            else:
                h = tl.load(h_base + h_off + r * width + cols, mask=mask, other=0.0)
            x0 = tl.load(p0_row + cols, mask=mask, other=0.0).to(tl.float32)
            g = g + lam * h * (x - x0)
        m = tl.load(m_row + cols, mask=mask, other=0.0)
        v = tl.load(v_row + cols, mask=mask, other=0.0)
        m = m + one_m_b1 * (g - m)
        v = b2 * v + one_m_b2 * g * g
        tl.store(m_row + cols, m, mask=mask)
        tl.store(v_row + cols, v, mask=mask)
        denom = tl.div_rn(tl.sqrt_rn(v), bc2_sqrt) + eps
        x = x * decay - tl.div_rn(step_size * m, denom)
        if BF16:
            # round to nearest even with integer ops: Triton's interpreter truncates in
            # its own float32 -> bfloat16 conversion; on a GPU this equals cvt.rn.bf16.f32
            u = x.to(tl.uint32, bitcast=True)
            rounded = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).to(tl.uint16)
            bits = tl.where(x != x, ((u >> 16) | 0x40).to(tl.uint16), rounded)
            tl.store(p_row + cols, bits.to(tl.bfloat16, bitcast=True), mask=mask)
        else:
            tl.store(p_row + cols, x.to(p_base.dtype.element_ty), mask=mask)


def masked_adamw_(*args) -> None:
    """Triton backend of ``trust_fast::masked_adamw_`` (arguments in ``AdamWArgs`` order, already checked)."""
    params, grads, exp_avgs, exp_avg_sqs, steps, rows, slots, lr, beta1, beta2, eps, weight_decay, hess, ref_params, lam = (
        AdamWArgs(*args)
    )
    device = params[0].device
    hyper = torch.tensor([lr, beta1, beta2, eps, weight_decay, lam], dtype=torch.float64)
    hyper = hyper.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else hyper.to(device)
    groups: dict[tuple, list[int]] = {}
    for i, p in enumerate(params):
        if rows[i].numel() == 0 or p.numel() == 0:
            continue
        width = p.numel() // p.shape[0]
        per_row = hess is not None and hess[i].numel() != p.numel()
        groups.setdefault((p.dtype, per_row, block_and_warps(width)), []).append(i)
    for (_, per_row, (block, warps)), idx in groups.items():
        ps = [params[i] for i in idx]
        gs = [grads[i].contiguous() for i in idx]
        ms = [exp_avgs[i] for i in idx]
        vs = [exp_avg_sqs[i] for i in idx]
        ss = [steps[i] for i in idx]
        hs = [hess[i].contiguous() for i in idx] if hess is not None else ms
        p0s = [ref_params[i].contiguous() for i in idx] if ref_params is not None else ps
        counts = [rows[i].numel() for i in idx]
        table = int64_table(
            [
                prefix_starts(counts),
                element_offsets(ps, ps[0]),
                element_offsets(gs, gs[0]),
                element_offsets(ms, ms[0]),
                element_offsets(vs, vs[0]),
                element_offsets(ss, ss[0]),
                element_offsets(hs, hs[0]),
                element_offsets(p0s, p0s[0]),
                [p.numel() // p.shape[0] for p in ps],
            ],
            device,
        )
        rows_cat = torch.cat([rows[i].to(torch.int64) for i in idx])
        slots_cat = torch.cat([slots[i].to(torch.int64) for i in idx])
        _masked_adamw_kernel[(rows_cat.numel(),)](
            ps[0], gs[0], ms[0], vs[0], ss[0], hs[0], p0s[0],
            rows_cat, slots_cat, table, hyper, len(ps),
            TABLE=table_block(len(ps)), PENALTY=hess is not None, H_PER_ROW=per_row,
            BF16=ps[0].dtype == torch.bfloat16, BLOCK=block, num_warps=warps,
        )
