"""Hypothesis fuzzing of shapes and row sets: every CPU backend against the reference.

The compiled backend gets hundreds of cases; the Triton interpreter (slow, one
launch per case costs ~0.1 s) a few dozen.
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import trust_fast.ops as ops

EXAMPLES = {"cpp": 250, "triton": 60}
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
TOL = {torch.float32: 2e-6, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


@st.composite
def problems(draw):
    """Up to 4 weight-shaped tensors (1-D, 2-D or 4-D), a row subset of each, a dtype, a seed."""
    n = draw(st.integers(1, 4))
    shapes = []
    for _ in range(n):
        kind = draw(st.sampled_from(["1d", "2d", "4d"]))
        rows = draw(st.integers(1, 9))
        if kind == "1d":
            shapes.append((rows,))
        elif kind == "2d":
            shapes.append((rows, draw(st.integers(1, 70))))
        else:
            shapes.append((rows, draw(st.integers(1, 4)), draw(st.integers(1, 3)), draw(st.integers(1, 3))))
    subsets = [draw(st.lists(st.integers(0, s[0] - 1), unique=True, max_size=s[0])) for s in shapes]
    return shapes, subsets, draw(st.sampled_from(sorted(DTYPES))), draw(st.integers(0, 2**31 - 1)), draw(st.booleans())


def _run_both(backend, fn):
    with ops.use_backend(backend):
        got = fn()
    with ops.use_backend("reference"):
        want = fn()
    return got, want


@pytest.mark.parametrize("backend", ["cpp", "triton"])
def test_fuzz_row_saliency_and_masked_adamw(backend):
    if backend == "triton" and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("triton on CPU tensors needs TRITON_INTERPRET=1 (this run has a GPU)")
    reason = ops.registry.get_backend(backend).unavailable_reason("cpu")
    assert reason is None, f"backend {backend} should be available on cpu: {reason}"

    @settings(max_examples=EXAMPLES[backend], deadline=None, derandomize=True,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(problems())
    def check(problem):
        shapes, subsets, dtype_name, seed, use_int32 = problem
        dtype = DTYPES[dtype_name]
        gen = torch.Generator().manual_seed(seed)
        gs = [torch.randn(s, generator=gen).to(dtype) for s in shapes]
        ws = [torch.randn(s, generator=gen).to(dtype) for s in shapes]
        got, want = _run_both(backend, lambda: ops.row_saliency(gs, ws, "gw"))
        torch.testing.assert_close(got, want, rtol=TOL[dtype], atol=1e-6)

        idx_dtype = torch.int32 if use_int32 else torch.int64
        rows = [torch.tensor(sub, dtype=idx_dtype) for sub in subsets]
        slots = [torch.randperm(len(sub), generator=gen).to(idx_dtype) for sub in subsets]
        widths = [g.numel() // g.shape[0] for g in gs]

        def step(params=[p.clone() for p in ws]):
            ms = [torch.full((len(sub), w), 0.01) for sub, w in zip(subsets, widths)]
            vs = [torch.full((len(sub), w), 0.02) for sub, w in zip(subsets, widths)]
            steps = [torch.full((len(sub),), 2.0) for sub in subsets]
            ps = [p.clone() for p in params]
            ops.masked_adamw_(ps, gs, ms, vs, steps, rows, slots, lr=0.05, weight_decay=0.1)
            return ps + ms + vs + steps

        got, want = _run_both(backend, step)
        for a, b in zip(got, want):
            # one rounding step of the storage dtype apart at most
            torch.testing.assert_close(a.float(), b.float(), rtol=TOL[a.dtype], atol=TOL[a.dtype] * 1e-2)
        for p, p_new, sub in zip(ws, got, subsets):
            keep = torch.ones(p.shape[0], dtype=torch.bool)
            keep[list(sub)] = False
            assert torch.equal(p[keep], p_new[keep])

    check()


@settings(max_examples=200, deadline=None, derandomize=True)
@given(
    counts=st.lists(st.integers(0, 40), min_size=1, max_size=5),
    xi=st.floats(-1.5, 3.0),
    max_fraction=st.one_of(st.none(), st.floats(0.0, 1.0)),
    seed=st.integers(0, 2**31 - 1),
    ties=st.booleans(),
)
def test_fuzz_select_rows(counts, xi, max_fraction, seed, ties):
    """select_rows against a per-tensor numpy loop: z > xi, cap keeps the top scores, lower index wins ties."""
    import math

    import numpy as np

    gen = torch.Generator().manual_seed(seed)
    scores = torch.rand(sum(counts), generator=gen)
    if ties:
        scores = (scores * 4).round() / 4  # many equal scores
    got = [g.tolist() for g in ops.select_rows(scores, counts, xi, max_fraction)]
    s_all, start, want = scores.numpy().astype(np.float64), 0, []
    for n in counts:
        s = s_all[start : start + n]
        start += n
        if n == 0 or s.max() == s.min():
            want.append([])
            continue
        dev = s - s.mean()
        std = np.sqrt((dev * dev).mean())
        chosen = [j for j in range(n) if dev[j] > xi * std]
        if max_fraction is not None:
            chosen = sorted(sorted(chosen, key=lambda j: (-s[j], j))[: math.floor(max_fraction * n)])
        want.append(chosen)
    assert got == want
