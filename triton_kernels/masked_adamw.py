"""Triton masked AdamW: AdamW on selected rows of many parameters in one launch.

One program per selected row (so each slot's step count has one writer).  It
finds its tensor from the table of item starts, bumps the slot's step count,
computes the bias corrections in float64 (powers by repeated squaring) and
streams the row in column blocks with float32 math, in torch.optim.AdamW's
operation order.  Rows not listed are never touched.

The host side is a :class:`MaskedAdamWPlan`: the tables that depend only on
the state, rows, slots and penalty are built and uploaded once, so a caller
that keeps those (MaskedAdamW, per row set) pays per step only for reading
the params' and gradients' addresses.  The stateless backend kernel builds a
plan per call.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from trust_fast.ops.schema import AdamWArgs

from .reduce import total
from .launch import block_and_warps, element_offsets, int64_table, prefix_starts, table_block


@triton.jit
def _masked_adamw_kernel(
    p_base, g_base, m_base, v_base, s_base, h_base, p0_base,
    rows_ptr, slots_ptr, table_ptr, pg_ptr, hyper_ptr, n_tensors,
    TABLE: tl.constexpr, PENALTY: tl.constexpr, H_PER_ROW: tl.constexpr, BF16: tl.constexpr, BLOCK: tl.constexpr,
):
    # table (7, n_tensors): item start, offsets of m, v, step, h, p0, width (fixed for a row set);
    # pg (2, n_tensors): offsets of p and g (of this call)
    k = tl.program_id(0).to(tl.int64)
    idx = tl.arange(0, TABLE)
    starts = tl.load(table_ptr + idx, mask=idx < n_tensors, other=9223372036854775807)
    t = total((starts <= k).to(tl.int32)) - 1
    r = tl.load(rows_ptr + k)
    s = tl.load(slots_ptr + k)
    width = tl.load(table_ptr + 6 * n_tensors + t)
    p_row = p_base + tl.load(pg_ptr + t) + r * width
    g_row = g_base + tl.load(pg_ptr + n_tensors + t) + r * width
    m_row = m_base + tl.load(table_ptr + n_tensors + t) + s * width
    v_row = v_base + tl.load(table_ptr + 2 * n_tensors + t) + s * width
    step_ptr = s_base + tl.load(table_ptr + 3 * n_tensors + t) + s

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
            h_off = tl.load(table_ptr + 4 * n_tensors + t)
            p0_row = p0_base + tl.load(table_ptr + 5 * n_tensors + t) + r * width
            if H_PER_ROW:  # float32 or bfloat16 storage, float32 math
                h = tl.load(h_base + h_off + r).to(tl.float32)
            else:
                h = tl.load(h_base + h_off + r * width + cols, mask=mask, other=0.0).to(tl.float32)
            x0 = tl.load(p0_row + cols, mask=mask, other=0.0).to(tl.float32)
            h = tl.where(h < 0.0, 0.0, h)  # negative curvature: no penalty (NaN stays NaN)
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


class _Launch:
    """One launch of a plan: the params of one dtype, penalty kind and column block."""

    def __init__(self, idx, per_row, block, warps, params, exp_avgs, exp_avg_sqs, steps, rows, slots,
                 hess, ref_params, device):
        self.idx, self.per_row, self.block, self.warps = idx, per_row, block, warps
        self.ms = [exp_avgs[i] for i in idx]
        self.vs = [exp_avg_sqs[i] for i in idx]
        self.ss = [steps[i] for i in idx]
        self.hs = [hess[i].contiguous() for i in idx] if hess is not None else self.ms
        self.p0s = [ref_params[i].contiguous() for i in idx] if ref_params is not None else None
        counts = [rows[i].numel() for i in idx]
        widths = [params[i].numel() // params[i].shape[0] for i in idx]
        self.table = int64_table(
            [
                prefix_starts(counts),
                element_offsets(self.ms, self.ms[0]),
                element_offsets(self.vs, self.vs[0]),
                element_offsets(self.ss, self.ss[0]),
                element_offsets(self.hs, self.hs[0]),
                element_offsets(self.p0s, self.p0s[0]) if self.p0s is not None else [0] * len(idx),
                widths,
            ],
            device,
        )
        self.rows_cat = torch.cat([rows[i].to(torch.int64) for i in idx])
        self.slots_cat = torch.cat([slots[i].to(torch.int64) for i in idx])
        self.bf16 = params[idx[0]].dtype == torch.bfloat16
        self.pg_ptrs: tuple[int, ...] = ()
        self.pg: torch.Tensor | None = None

    def run(self, params, grads, hyper, device) -> None:
        ps = [params[i] for i in self.idx]
        gs = [grads[i].contiguous() for i in self.idx]
        ptrs = tuple(t.data_ptr() for t in ps) + tuple(t.data_ptr() for t in gs)
        if ptrs != self.pg_ptrs:  # new gradient tensors (or moved params): one small upload
            self.pg = int64_table([element_offsets(ps, ps[0]), element_offsets(gs, gs[0])], device)
            self.pg_ptrs = ptrs
        p0s = self.p0s if self.p0s is not None else ps
        _masked_adamw_kernel[(self.rows_cat.numel(),)](
            ps[0], gs[0], self.ms[0], self.vs[0], self.ss[0], self.hs[0], p0s[0],
            self.rows_cat, self.slots_cat, self.table, self.pg, hyper, len(ps),
            TABLE=table_block(len(ps)), PENALTY=self.p0s is not None, H_PER_ROW=self.per_row,
            BF16=self.bf16, BLOCK=self.block, num_warps=self.warps,
        )


class MaskedAdamWPlan:
    """The launches of ``masked_adamw_`` for fixed state, rows, slots and penalty.

    Building it does the host work that depends only on those: grouping, the
    per-tensor offset tables, the concatenated rows and slots, all uploaded
    once.  Each call then only reads the params' and gradients' addresses (one
    small upload when they moved) and the hyperparameters (one when they
    changed).  The caller keeps the state, rows, slots and penalty tensors
    unchanged while it reuses the plan (MaskedAdamW builds one per row set).
    """

    def __init__(self, params, exp_avgs, exp_avg_sqs, steps, rows, slots, hess=None, ref_params=None):
        self.device = params[0].device
        groups: dict[tuple, list[int]] = {}
        for i, p in enumerate(params):
            if rows[i].numel() == 0 or p.numel() == 0:
                continue
            width = p.numel() // p.shape[0]
            per_row = hess is not None and hess[i].numel() != p.numel()
            h_dtype = hess[i].dtype if hess is not None else None  # one base pointer per launch: one dtype
            groups.setdefault((p.dtype, h_dtype, per_row, block_and_warps(width)), []).append(i)
        self.launches = [
            _Launch(idx, per_row, block, warps, params, exp_avgs, exp_avg_sqs, steps, rows, slots,
                    hess, ref_params, self.device)
            for (_, _, per_row, (block, warps)), idx in groups.items()
        ]
        self._hyper_key: tuple = ()
        self._hyper: torch.Tensor | None = None

    def __call__(self, params, grads, lr, beta1, beta2, eps, weight_decay, lam) -> None:
        key = (lr, beta1, beta2, eps, weight_decay, lam)
        if key != self._hyper_key:
            host = torch.tensor(key, dtype=torch.float64)
            self._hyper = host.pin_memory().to(self.device, non_blocking=True) if self.device.type == "cuda" else host.to(self.device)
            self._hyper_key = key
        for launch in self.launches:
            launch.run(params, grads, self._hyper, self.device)


def masked_adamw_(*args) -> None:
    """Triton backend of ``trust_fast::masked_adamw_`` (arguments in ``AdamWArgs`` order, already checked)."""
    a = AdamWArgs(*args)
    plan = MaskedAdamWPlan(a.params, a.exp_avgs, a.exp_avg_sqs, a.steps, a.rows, a.slots, a.hess, a.ref_params)
    plan(a.params, a.grads, a.lr, a.beta1, a.beta2, a.eps, a.weight_decay, a.lam)


# MaskedAdamW's direct step prepares one plan per row set: prepare(params, *state, hess, ref_params)
masked_adamw_.prepare = MaskedAdamWPlan
