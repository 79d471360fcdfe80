"""pytest-benchmark micro benchmarks of the trust_fast ops on the SD 1.5 attn2 q/k/v shapes (set a).

    pytest benchmarks/bench_ops.py --benchmark-only --benchmark-group-by=group

Runs at one thread (BENCH_THREADS=n to change); groups compare, at that thread count: row_saliency against the eager
loop; one optimizer step of MaskedAdamW at 5% / 100% of the rows against
torch.optim.AdamW(fused=True) over the same tensors.  The full table over
sets a/b/c and all fractions is benchmarks/ops_table.py.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from sd15_shapes import HARDCODED_A  # noqa: E402

import trust_fast.ops as ops  # noqa: E402
from trust_fast.optim import MaskedAdamW  # noqa: E402


@pytest.fixture(scope="module")
def weights():
    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "1")))
    gen = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s, generator=gen) * 0.02) for s in HARDCODED_A]
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen)
    return params


@pytest.mark.benchmark(group="row_saliency")
def test_saliency_eager_loop(benchmark, weights):
    grads = [p.grad for p in weights]
    benchmark(lambda: [g.abs().flatten(1).mean(1) for g in grads])


@pytest.mark.benchmark(group="row_saliency")
@pytest.mark.parametrize("backend", ["reference", "cpp"])
def test_saliency_ops(benchmark, weights, backend):
    grads = [p.grad for p in weights]
    with ops.use_backend(backend):
        out = benchmark(ops.row_saliency, grads)
    assert out.shape == (sum(p.shape[0] for p in weights),)


@pytest.mark.benchmark(group="optimizer_step")
@pytest.mark.parametrize("kind", ["fused", "foreach"])
def test_adamw_dense(benchmark, weights, kind):
    opt = torch.optim.AdamW(weights, lr=1e-5, **{kind: True})
    benchmark(opt.step)


@pytest.mark.benchmark(group="optimizer_step")
@pytest.mark.parametrize("fraction", [0.05, 1.0])
def test_masked_adamw(benchmark, weights, fraction):
    gen = torch.Generator().manual_seed(1)
    opt = MaskedAdamW(weights, lr=1e-5)
    opt.set_rows({p: torch.randperm(p.shape[0], generator=gen)[: round(fraction * p.shape[0])] for p in weights})
    benchmark(opt.step)
    dense = 2 * 4 * sum(p.numel() for p in weights)
    assert opt.state_bytes() <= (fraction + 0.01) * dense
