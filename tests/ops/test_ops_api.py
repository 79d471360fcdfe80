"""The op layer as a library: schemas (opcheck), torch.compile, select_rows semantics,
argument errors, the backend registry and the fallback when the extension is missing."""

from __future__ import annotations

import math
import os
import subprocess
import sys

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is first imported (trust_fast imports it)

import numpy as np
import pytest

import trust_fast.ops as ops
from trust_fast.ops import reference


def _adam_args(device="cpu", dtype=torch.float32, penalty=False, diag_dtype=torch.float32):
    gen = torch.Generator().manual_seed(0)
    shapes = [(5, 3), (4,), (2, 3, 3, 3)]
    params = [torch.randn(s, generator=gen).to(device, dtype) for s in shapes]
    grads = [torch.randn(s, generator=gen).to(device, dtype) for s in shapes]
    widths = [reference.row_width(p) for p in params]
    ms = [torch.zeros(3, w, device=device) for w in widths]
    vs = [torch.zeros(3, w, device=device) for w in widths]
    steps = [torch.zeros(3, device=device) for _ in shapes]
    rows = [torch.tensor([0, 4], device=device), torch.tensor([1, 2, 3], device=device, dtype=torch.int32),
            torch.tensor([1], device=device)]
    slots = [torch.tensor([2, 0], device=device), torch.tensor([0, 1, 2], device=device), torch.tensor([0], device=device)]
    hess = ([torch.rand(5, device=device), torch.rand(4, device=device), torch.rand(2, 3, 3, 3, device=device)]
            if penalty else None)
    hess = [h.to(diag_dtype) for h in hess] if hess is not None else None
    p0 = [torch.randn(s, generator=gen).to(device, dtype) for s in shapes] if penalty else None
    return (params, grads, ms, vs, steps, rows, slots, 1e-3, 0.9, 0.999, 1e-8, 0.01, hess, p0, 0.5)


# ----------------------------------------------------------------------------- opcheck


@pytest.mark.parametrize("backend", ["reference", "cpp"])
def test_opcheck_every_op(backend):
    gen = torch.Generator().manual_seed(0)
    gs = [torch.randn(4, 3, generator=gen), torch.randn(2, 2, 3, 3, generator=gen)]
    ws = [torch.randn_like(g) for g in gs]
    with ops.use_backend(backend):
        torch.library.opcheck(torch.ops.trust_fast.row_saliency.default, (gs, None, "g"))
        torch.library.opcheck(torch.ops.trust_fast.row_saliency.default, (gs, ws, "gw"))
        scores = torch.cat([torch.tensor([0.0, 0.0, 0.0, 9.0]), torch.tensor([1.0, 5.0])])
        torch.library.opcheck(torch.ops.trust_fast.select_rows.default, (scores, [4, 2], 1.0, None))
        torch.library.opcheck(torch.ops.trust_fast.select_rows.default, (scores, [4, 2], 0.5, 0.5))
        torch.library.opcheck(torch.ops.trust_fast.masked_adamw_.default, _adam_args())
        torch.library.opcheck(torch.ops.trust_fast.masked_adamw_.default, _adam_args(penalty=True))
        torch.library.opcheck(torch.ops.trust_fast.masked_adamw_.default,
                              _adam_args(penalty=True, diag_dtype=torch.bfloat16))
        hz = [torch.randn(4, 3, generator=gen), torch.randn(3, generator=gen)]
        z = [torch.ones(4, 3), -torch.ones(3)]
        torch.library.opcheck(torch.ops.trust_fast.hutchinson_diag_.default, ([torch.zeros(4, 3), torch.zeros(3)], hz, z, None, 0))
        torch.library.opcheck(
            torch.ops.trust_fast.hutchinson_diag_.default,
            ([torch.zeros(4), torch.zeros(3)], hz, z, [torch.tensor([1, 3]), torch.tensor([0])], 2),
        )
        bf = torch.bfloat16  # a bfloat16 Hessian diagonal (TrustConfig.hessian_dtype)
        torch.library.opcheck(torch.ops.trust_fast.hutchinson_diag_.default,
                              ([torch.zeros(4, 3, dtype=bf), torch.zeros(3, dtype=bf)], hz, z, None, 0))
        torch.library.opcheck(torch.ops.trust_fast.hutchinson_diag_.default,
                              ([torch.ones(4, dtype=bf), torch.ones(3, dtype=bf)], hz, z, None, 2))


# ----------------------------------------------------------------------------- torch.compile


def test_torch_compile_fullgraph_calls_every_op():
    """One compiled step: saliency -> rows -> masked AdamW -> Hutchinson update, no graph breaks."""

    def step(ws, gs, ms, vs, steps, rows, slots, diags, z):
        scores = ops.row_saliency(gs, ws, "gw")
        ops.masked_adamw_(ws, gs, ms, vs, steps, rows, slots, lr=1e-2, weight_decay=0.1)
        ops.hutchinson_diag_(diags, gs, z, rows, count=1)
        return scores * 2

    def make():
        gen = torch.Generator().manual_seed(5)
        ws = [torch.randn(6, 4, generator=gen), torch.randn(3, 2, 3, 3, generator=gen)]
        gs = [torch.randn(w.shape, generator=gen) for w in ws]
        ms = [torch.zeros(6, 4), torch.zeros(3, 18)]
        vs = [torch.zeros(6, 4), torch.zeros(3, 18)]
        steps = [torch.zeros(6), torch.zeros(3)]
        rows = [torch.tensor([1, 4]), torch.tensor([2])]
        slots = [torch.tensor([0, 1]), torch.tensor([0])]
        diags = [torch.ones(6, 4), torch.ones(3)]
        z = [torch.ones(6, 4), -torch.ones(3, 2, 3, 3)]
        return ws, gs, ms, vs, steps, rows, slots, diags, z

    eager_args, compiled_args = make(), make()
    want = step(*eager_args)
    torch._dynamo.reset()
    got = torch.compile(step, fullgraph=True, backend="inductor")(*compiled_args)
    torch.testing.assert_close(got, want)
    for a, b in zip(eager_args, compiled_args):
        for x, y in zip(a, b):
            torch.testing.assert_close(x, y)


def test_torch_compile_select_rows_dynamic_output():
    def pick(scores):
        rows = ops.select_rows(scores, [5, 3], 1.0)
        return [r + 0 for r in rows]

    scores = torch.tensor([0.0, 0.0, 0.0, 0.0, 10.0, 1.0, 1.0, 1.0])
    torch._dynamo.reset()
    with torch._dynamo.config.patch(capture_dynamic_output_shape_ops=True):
        got = torch.compile(pick, fullgraph=True, backend="aot_eager")(scores)
    assert [g.tolist() for g in got] == [[4], []]


# ----------------------------------------------------------------------------- select_rows


def _select_oracle(scores: np.ndarray, counts, xi, max_fraction):
    out, start = [], 0
    for n in counts:
        s = scores[start : start + n].astype(np.float64)
        start += n
        if n == 0 or s.max() == s.min():
            out.append([])
            continue
        z = (s - s.mean()) / s.std()
        chosen = [j for j in range(n) if z[j] > xi]
        if max_fraction is not None:
            k = math.floor(max_fraction * n)
            chosen = sorted(sorted(chosen, key=lambda j: (-s[j], j))[:k])
        out.append(chosen)
    return out


@pytest.mark.parametrize("max_fraction", [None, 0.0, 0.05, 0.5, 1.0])
@pytest.mark.parametrize("xi", [-0.5, 0.0, 1.0, 2.0])
def test_select_rows_matches_oracle(xi, max_fraction):
    gen = torch.Generator().manual_seed(7)
    counts = [1, 40, 0, 7, 300, 3]
    scores = torch.rand(sum(counts), generator=gen) ** 3
    got = ops.select_rows(scores, counts, xi, max_fraction)
    want = _select_oracle(scores.numpy(), counts, xi, max_fraction)
    assert [g.tolist() for g in got] == want
    for g in got:
        assert g.dtype == torch.int64


def test_select_rows_constant_scores_select_nothing():
    got = ops.select_rows(torch.full((10,), 3.5), [4, 6], -10.0)
    assert [g.numel() for g in got] == [0, 0]


def test_select_rows_cap_breaks_ties_by_lower_index():
    scores = torch.tensor([0.0] * 16 + [5.0, 5.0, 5.0, 5.0])
    got = ops.select_rows(scores, [20], 0.0, max_fraction=0.1)
    assert got[0].tolist() == [16, 17]


def test_select_rows_planted_rows_found():
    gen = torch.Generator().manual_seed(3)
    scores = torch.rand(1000, generator=gen)
    scores[[5, 500, 999]] = 50.0
    assert ops.select_rows(scores, [600, 400], 2.0)[0].tolist() == [5, 500]


# ----------------------------------------------------------------------------- argument errors


def test_bad_arguments_name_the_argument():
    g = [torch.randn(3, 4)]
    with pytest.raises(ValueError, match="mode"):
        ops.row_saliency(g, mode="abs")
    with pytest.raises(ValueError, match="needs weights"):
        ops.row_saliency(g, mode="gw")
    with pytest.raises(ValueError, match=r"weights\[0\] has shape"):
        ops.row_saliency(g, [torch.randn(3, 5)], "gw")
    with pytest.raises(TypeError, match=r"weights\[0\] has dtype"):
        ops.row_saliency(g, [torch.randn(3, 4, dtype=torch.float64)], "gw")
    with pytest.raises(TypeError, match=r"tensors\[1\] has dtype torch.int64"):
        ops.row_saliency([torch.randn(3, 4), torch.ones(2, 2, dtype=torch.int64)])
    with pytest.raises(ValueError, match="weights has 2 tensors but tensors has 1"):
        ops.row_saliency(g, [torch.randn(3, 4)] * 2, "gw")
    with pytest.raises(RuntimeError, match=r"tensors\[1\] is on meta"):
        reference.check_row_saliency([torch.randn(2, 2), torch.empty(2, 2, device="meta")], None, "g")

    with pytest.raises(ValueError, match="rows_per_tensor sums to 5"):
        ops.select_rows(torch.rand(6), [2, 3], 1.0)
    with pytest.raises(ValueError, match="scores must be a 1-D float32"):
        ops.select_rows(torch.rand(6, dtype=torch.float64), [6], 1.0)
    with pytest.raises(ValueError, match="max_fraction"):
        ops.select_rows(torch.rand(6), [6], 1.0, 1.5)


@pytest.mark.parametrize("backend", ["reference", "cpp"])
def test_masked_adamw_bad_arguments(backend):
    def call(**change):
        args = list(_adam_args())
        names = ["params", "grads", "exp_avgs", "exp_avg_sqs", "steps", "rows", "slots"]
        for k, v in change.items():
            args[names.index(k)] = v
        ops.masked_adamw_(*args[:7], lr=1e-3)

    with ops.use_backend(backend):
        with pytest.raises(IndexError, match=r"rows\[0\] holds index 5 out of range \[0, 5\)"):
            call(rows=[torch.tensor([0, 5]), torch.tensor([1, 2, 3]), torch.tensor([1])])
        with pytest.raises(IndexError, match=r"rows\[2\] holds index -1"):
            call(rows=[torch.tensor([0, 4]), torch.tensor([1, 2, 3]), torch.tensor([-1])])
        with pytest.raises(ValueError, match=r"rows\[1\] holds index 2 more than once"):
            call(rows=[torch.tensor([0, 4]), torch.tensor([2, 2, 3]), torch.tensor([1])])
        with pytest.raises(ValueError, match=r"slots\[0\] holds index 2 more than once"):
            call(slots=[torch.tensor([2, 2]), torch.tensor([0, 1, 2]), torch.tensor([0])])
        with pytest.raises(TypeError, match=r"rows\[0\] has dtype torch.float32"):
            call(rows=[torch.tensor([0.0, 4.0]), torch.tensor([1, 2, 3]), torch.tensor([1])])
        with pytest.raises(ValueError, match=r"grads\[1\] is torch.float16"):
            call(grads=[torch.randn(5, 3), torch.randn(4).half(), torch.randn(2, 3, 3, 3)])
        with pytest.raises(ValueError, match=r"exp_avgs\[0\] must be a contiguous float32 \(slots, 3\)"):
            call(exp_avgs=[torch.zeros(3, 4), torch.zeros(3, 1), torch.zeros(3, 27)])
        with pytest.raises(ValueError, match=r"steps\[2\] must be a float32 \(3,\)"):
            call(steps=[torch.zeros(3), torch.zeros(3), torch.zeros(3, dtype=torch.int64)])
        with pytest.raises(ValueError, match=r"slots has 2 tensors but params has 3"):
            call(slots=[torch.tensor([2, 0]), torch.tensor([0, 1, 2])])
        with pytest.raises(ValueError, match=r"params\[0\] must be contiguous"):
            call(params=[torch.randn(3, 5).t(), torch.randn(4), torch.randn(2, 3, 3, 3)])
        with pytest.raises(ValueError, match="beta1"):
            ops.masked_adamw_(*_adam_args()[:7], lr=1e-3, beta1=1.0)
        with pytest.raises(ValueError, match="hess and ref_params must be given together"):
            ops.masked_adamw_(*_adam_args()[:7], lr=1e-3, hess=[torch.zeros(5), torch.zeros(4), torch.zeros(2)])
        with pytest.raises(ValueError, match=r"hess\[0\] must be float32"):
            a = _adam_args(penalty=True)
            ops.masked_adamw_(*a[:7], lr=1e-3, hess=[torch.zeros(4)] + a[12][1:], ref_params=a[13], lam=1.0)


def test_hutchinson_bad_arguments():
    hz = [torch.randn(4, 3)]
    with pytest.raises(ValueError, match=r"diags\[0\] must be a contiguous float32 or bfloat16 tensor of shape \(4, 3\)"):
        ops.hutchinson_diag_([torch.zeros(3)], hz, [torch.ones(4, 3)])
    with pytest.raises(ValueError, match=r"z\[0\] is torch.float32 \(4, 2\)"):
        ops.hutchinson_diag_([torch.zeros(4)], hz, [torch.ones(4, 2)])
    with pytest.raises(IndexError, match=r"rows\[0\] holds index 4 out of range"):
        ops.hutchinson_diag_([torch.zeros(4)], hz, [torch.ones(4, 3)], [torch.tensor([4])])
    with pytest.raises(ValueError, match="count must be >= 0"):
        ops.hutchinson_diag_([torch.zeros(4)], hz, [torch.ones(4, 3)], count=-1)


def test_state_untouched_when_arguments_are_rejected():
    args = _adam_args()
    before = [p.clone() for p in args[0]]
    bad_rows = [torch.tensor([0, 4]), torch.tensor([1, 2, 3]), torch.tensor([7])]
    with pytest.raises(IndexError):
        ops.masked_adamw_(*args[:5], bad_rows, args[6], lr=1.0)
    assert all(torch.equal(a, b) for a, b in zip(args[0], before))


# ----------------------------------------------------------------------------- registry


def test_registry_introspection_and_forcing(monkeypatch):
    assert "reference" in ops.available_backends()
    assert ops.available_backends("cpu")[0] == "reference"
    assert ops.backend_for("cpu") == "cpp"  # the extension is built for the test run
    monkeypatch.setenv("TRUST_FAST_BACKEND", "reference")
    assert ops.backend_for("cpu") == "reference"
    with ops.use_backend("cpp"):  # the context manager wins over the variable
        assert ops.backend_for("cpu") == "cpp"
    monkeypatch.setenv("TRUST_FAST_BACKEND", "cuda")
    with pytest.raises(RuntimeError, match="backend 'cuda' was forced but cannot run on cpu"):
        ops.row_saliency([torch.randn(2, 2)])
    monkeypatch.setenv("TRUST_FAST_BACKEND", "fastest")
    with pytest.raises(ValueError, match="TRUST_FAST_BACKEND='fastest' is not a backend"):
        ops.backend_for("cpu")
    with pytest.raises(ValueError, match="unknown trust_fast backend"):
        with ops.use_backend("numba"):
            pass


def test_forced_backend_is_the_one_that_runs(monkeypatch):
    calls = []
    cpp = ops.registry.get_backend("cpp")
    real = cpp.kernels["row_saliency"]
    monkeypatch.setitem(cpp.kernels, "row_saliency", lambda *a: calls.append(1) or real(*a))
    ops.row_saliency([torch.randn(2, 3)])
    with ops.use_backend("reference"):
        ops.row_saliency([torch.randn(2, 3)])
    assert calls == [1]


def test_missing_extension_falls_back_to_reference_and_logs_once():
    code = (
        "import sys, logging, io; sys.modules['trust_fast._C'] = None\n"
        "stream = io.StringIO(); logging.basicConfig(stream=stream, level=logging.WARNING)\n"
        "import torch, trust_fast.ops as ops\n"
        "g = [torch.randn(3, 4)]\n"
        "a = ops.row_saliency(g); b = ops.row_saliency(g)\n"
        "assert ops.backend_for('cpu') == 'reference', ops.backend_for('cpu')\n"
        "assert torch.allclose(a, g[0].abs().mean(1))\n"
        "log = stream.getvalue(); assert log.count(\"backend 'cpp' unavailable\") == 1, log\n"
        "assert 'JIT build disabled' in log, log\n"
        "print('ok')\n"
    )
    env = dict(os.environ, TRUST_FAST_NO_JIT="1")
    env.pop("TRUST_FAST_BACKEND", None)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]
